"""The ``LinearizeAttention`` pass: Hugging Face attention modules are swapped, other code rewritten in FX.

Module path: every module with query/key/value projections (see ``attention_layout``) is a site,
named by its path; ``layers`` picks by decoder-layer index. FX path (models without such modules):
hand-written ``softmax(q @ kᵀ · s) @ v`` / ``F.scaled_dot_product_attention`` call sites.

Example:
    >>> import torch, transformers, surgeon
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> s = surgeon.apply(transformers.LlamaForCausalLM(cfg), LinearizeAttention(window=8, layers=[1, 2]))
    >>> [r["site"] for r in s.report["LinearizeAttention"].rows]
    ['model.layers.1.self_attn', 'model.layers.2.self_attn']
"""
from __future__ import annotations

from types import SimpleNamespace

import torch.nn as nn

from surgeon.core.errors import ConfigError, PlanError
from surgeon.fx.tracing import get_submodule, set_submodule
from surgeon.core.handler import PassContext, PassHandler, choose_sites, register_pass
from surgeon.passes.attention.checks import check_modules, linearized_modules, match_original, unwrap_peft
from surgeon.passes.attention.config import LinearizeAttention
from surgeon.passes.attention.costs import AttentionShape, cost_rows
from surgeon.passes.attention.layout import (
    FUSED_QKV,
    SEPARATE_QKV,
    AttentionLayout,
    find_attention_modules,
    is_transformers_module,
    layer_index,
    module_types,
)
from surgeon.core.report import Report, format_table
from surgeon.core.sites import Plan, Site

REPORT_CONTEXTS = (1024, 8192, 32768)


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _check_against_model(model: nn.Module, config: LinearizeAttention, found: list[tuple[str, AttentionLayout]]
                         ) -> None:
    causal = {lay.causal for _, lay in found}
    where = found[0][0]
    if config.causal is True and False in causal:
        raise ConfigError(f"causal decoding was asked for, but {where} ({len(found)} attention modules) is "
                          "bidirectional (an encoder such as BERT / ViT); use causal=None (take it from the model)")
    if config.causal is False and True in causal:
        raise ConfigError(f"causal=False on a causal model ({where}): a decoder's attention must stay causal; "
                          "use causal=None")
    if True in causal and config.local:
        raise ConfigError(f"local=True is for bidirectional models, but {where} is causal; use window=... "
                          "(softmax over the last `window` tokens) instead")
    if False in causal and config.gate != "none":
        raise ConfigError(f"gate={config.gate!r} decays the past of causal attention, but {where} is "
                          "bidirectional; use gate='none'")
    if False in causal and config.window > 0 and not config.local:
        raise ConfigError(f"{where} is bidirectional: a sliding window over past tokens has no meaning there; "
                          "use local=True (softmax inside a local window) or window=0")
    limit = _max_positions(model)
    if limit is not None and config.window > limit:
        raise ConfigError(f"window={config.window} is larger than the model's maximum positions ({limit}); "
                          f"choose window <= {limit}")


@register_pass(LinearizeAttention)
class LinearizeAttentionHandler(PassHandler):
    """Module swap for attention modules with q/k/v projections; FX rewrite for hand-written attention."""

    def plan(self, model: nn.Module, config: LinearizeAttention, ctx: PassContext) -> Plan:
        try:
            found = find_attention_modules(model)
        except ConfigError as refusal:   # e.g. queries packed with an output gate: the model's own code applies it
            return self._plan_kernel(model, config, ctx, refusal)
        done = linearized_modules(model)
        if done and not found:
            raise PlanError(f"{type(model).__name__} is already linearized: {len(done)} LinearAttention modules "
                            f"({done[0]}, ...) and no softmax attention left to convert; apply the pass to the "
                            "original model instead")
        if not found and is_transformers_module(unwrap_peft(model)):
            attention_like = sorted({type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()})
            return self._plan_kernel(model, config, ctx, PlanError(
                f"no attention module with a known q/k/v layout in {type(model).__name__}: looked for children "
                f"{[names[0] + '/' + names[1] + '/' + names[2] for names in SEPARATE_QKV]} or a fused {list(FUSED_QKV)} "
                f"projection. Attention-like modules found: {attention_like or 'none'}; module types: "
                f"{module_types(model)}. Select a module with a standard layout, or open an issue with this message."))
        if not found:
            return self._plan_fx(model, config, ctx)
        sites = []
        for position, (fqn, lay) in enumerate(found):
            layer = layer_index(fqn, lay, position)
            sites.append(Site(name=fqn, base=fqn, kind="module", op=type(get_submodule(model, fqn)).__name__,
                              scope=fqn.rpartition(".")[0], data={"layer": layer}))
        chosen = choose_sites(sites, config, ctx, resolve_module=lambda s: get_submodule(model, s.name),
                              what="attention module", narrow=lambda s: self._select_layers(s, config))
        layouts = dict(found)
        picked = [(s.name, layouts[s.name]) for s in chosen]
        try:
            corrected, unverified = check_modules(model, picked, config.window, verify=True,
                                                  layer_of={s.name: s.data["layer"] for s in chosen})
        except ConfigError as refusal:   # a feature the swapped module would drop: convert at the kernel instead
            return self._plan_kernel(model, config, ctx, refusal)
        layouts.update(corrected)
        _check_against_model(model, config, [(s.name, layouts[s.name]) for s in chosen])
        return Plan(chosen, state={"layouts": {s.name: layouts[s.name] for s in chosen}, "unverified": unverified})

    @staticmethod
    def _select_layers(sites: list[Site], config: LinearizeAttention) -> list[Site]:
        if config.layers is None:
            return sites
        by_layer = {s.data["layer"]: s for s in sites}
        missing = [i for i in config.layers if i not in by_layer]
        if missing:
            raise ConfigError(f"LinearizeAttention.layers {missing} out of range: the model has no softmax attention "
                              f"module at these layers; its convertible layers are {sorted(by_layer)}")
        return [by_layer[i] for i in sorted(config.layers)]

    def live_config(self, model: nn.Module, config: LinearizeAttention, sites: list[Site]) -> LinearizeAttention:
        """``config`` with the memory slots the live model has now (``set_memory`` after apply)."""
        from surgeon.passes.attention.memory_slots import live_memory_config

        return live_memory_config(model, config, sites)

    def needs_recipe(self, config: LinearizeAttention) -> str | None:
        """Why a compile backend must load this config's new parameters from a recipe (None: they need no training)."""
        trained = []
        if config.feature_map == "hedgehog":
            trained.append("hedgehog feature maps")
        if config.window > 0:
            trained.append("softmax-window mixing factors")
        if config.gate == "learned":
            trained.append("learned gates")
        return ", ".join(trained) + " are trained by distillation" if trained else None

    def _plan_kernel(self, model: nn.Module, config: LinearizeAttention, ctx: PassContext,
                     refusal: Exception) -> Plan:
        """Convert at the attention kernel (the module keeps its own code); ``refusal`` stands when no module
        calls transformers' attention registry."""
        from surgeon.passes.attention.kernel_plan import plan_kernel

        try:
            plan = plan_kernel(model, config, ctx, lambda s: self._select_layers(s, config))
        except PlanError as kernel:
            raise type(refusal)(f"{refusal}\n(at the attention kernel: {kernel})") from None
        _check_against_model(model, config, [(s.name, SimpleNamespace(causal=plan.state["kernel"][s.name]["causal"]))
                                             for s in plan.sites])
        return plan

    def _plan_fx(self, model: nn.Module, config: LinearizeAttention, ctx: PassContext) -> Plan:
        from surgeon.passes.attention.fx import plan_fx_attention

        plan = plan_fx_attention(model, config, ctx)
        plan.state["fx"] = True
        return plan

    def rewrite(self, model: nn.Module, config: LinearizeAttention, plan: Plan, ctx: PassContext) -> nn.Module:
        if plan.state.get("fx"):
            from surgeon.passes.attention.fx import rewrite_fx_attention

            return rewrite_fx_attention(model, config, plan, ctx)
        if plan.state.get("kernel"):
            from surgeon.passes.attention.kernel_plan import rewrite_kernel

            return rewrite_kernel(model, config, plan)
        from surgeon.passes.attention.memory_slots import apply_memory_plan
        from surgeon.passes.attention.module import LinearAttention

        layouts = plan.state["layouts"]
        new = []
        for s in plan.sites:
            original, lay = get_submodule(model, s.name), layouts[s.name]
            module = LinearAttention(original, lay, config, s.data["layer"], lay.causal)
            match_original(module, original, lay.projection_names + [n for n in (lay.q_norm, lay.k_norm) if n])
            new.append(module)
        apply_memory_plan([(s.name, m) for s, m in zip(plan.sites, new)], config.memory)   # a per-layer plan
        for site, module in zip(plan.sites, new):
            set_submodule(model, site.name, module)
        if any(m.is_causal for m in new):
            from surgeon.passes.attention.prefill import default_prefill_chunking

            default_prefill_chunking(model)      # long prompts prefill in blocks: memory O(block)
        return model

    def report(self, model: nn.Module, config: LinearizeAttention, plan: Plan, ctx: PassContext) -> Report:
        if plan.state.get("fx"):
            from surgeon.passes.attention.fx import report_fx_attention

            return report_fx_attention(model, config, plan, ctx)
        if plan.state.get("kernel"):
            from surgeon.passes.attention.kernel_plan import report_kernel

            return report_kernel(model, config, plan)
        rows, shapes = [], []
        for site in plan.sites:
            unit = get_submodule(model, site.name)
            lay = plan.state["layouts"][site.name]
            added = sum(p.numel() for n, p in unit.named_parameters() if n.split(".")[0] not in lay.projection_names
                        and not n.startswith(("q_norm", "k_norm", "q_layernorm", "k_layernorm")))
            feat = unit.feature_q.out_dim
            rows.append({"site": site.name, "layer": site.data["layer"], "replaced": site.op,
                         "heads": f"{lay.n_heads}/{lay.n_kv_heads}", "head_dim": lay.head_dim,
                         "features": feat, "window": config.window, "gate": config.gate,
                         "causal": lay.causal, "params_added": added})
            hedgehog = (config.feature_dim or lay.head_dim) if config.feature_map == "hedgehog" else 0
            shapes.append(AttentionShape(lay.n_heads, lay.n_kv_heads, lay.head_dim, feat,
                                         config.window if lay.causal else 0, config.chunk_size, hedgehog,
                                         config.sinks if lay.causal else 0))
        report = Report("LinearizeAttention",
                        ["site", "layer", "replaced", "heads", "head_dim", "features", "window", "gate", "causal",
                         "params_added"], rows, totals={"params_added": sum(r["params_added"] for r in rows)})
        if plan.state.get("unverified"):
            report.notes.append(f"not verified numerically at plan time ({plan.state['unverified']}): the swap "
                                "follows what the modules declare (projections, norms, rotary, windows)")
        if shapes and rows[0]["causal"]:
            costs = cost_rows(shapes, REPORT_CONTEXTS, next(model.parameters()).element_size())
            report.notes.append(f"attention costs of the {len(shapes)} converted layers (batch 1; see "
                                "surgeon.passes.attention.costs for the counting convention):\n"
                                + format_table(list(costs[0]), costs))
        return report
