"""Plan, rewrite and report ``LinearizeAttention`` at the attention kernel (see :mod:`.kernel`).

Planning runs one short forward of the model (``PROBE_TOKENS`` tokens, no cache) with a recording
attention implementation: every module that calls transformers' attention registry on its own keys
(self-attention) is a candidate, with the shapes and keyword arguments it passes. Then, per chosen
module, before anything changes:

- a keyword argument with a value this kernel does not understand is a ConfigError naming it;
- the hybrid at a window covering the probe must reproduce the module's own kernel output
  (≤ 1e-3 relative), else the module computes something else and is refused with the difference;
- shared key/value layers, decays (``gate``) and memory slots are refused with the reason.

Example:
    >>> import transformers
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2, head_dim=8,
    ...                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
    ...                                 num_local_experts=2, num_experts_per_tok=1)
    >>> calls = probe_calls(transformers.GptOssForCausalLM(cfg))
    >>> kwargs = calls["model.layers.0.self_attn"]["kwargs"]
    >>> sorted(calls), sorted(k for k in kwargs if k in UNDERSTOOD and kwargs[k] is not None)
    (['model.layers.0.self_attn', 'model.layers.1.self_attn'], ['dropout', 's_aux', 'scaling', 'sliding_window'])
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn

from surgeon.core.errors import ConfigError, PlanError
from surgeon.core.handler import PassContext, choose_sites
from surgeon.core.modules import get_submodule
from surgeon.core.report import Report, format_table
from surgeon.core.sites import Plan, Site
from surgeon.ops.feature_maps import make_feature_map
from surgeon.ops.hybrid_kernel import capped_hybrid_attention
from surgeon.ops.linear_attention import bidirectional_linear_attention
from surgeon.passes.attention.checks import ATTENTION_LAYER_TYPES, match_original
from surgeon.passes.attention.config import LinearizeAttention
from surgeon.passes.attention.costs import AttentionShape, cost_rows
from surgeon.passes.attention.kernel import (HYBRID, PROBE_CALLS, KernelHybrid, base_of, implementation_name,
                                             key_valid, post_hook, pre_hook)
from surgeon.passes.attention.probe import probe_forward, probe_inputs

# keyword arguments a family may pass to its kernel: read by the hybrid, or bookkeeping that does not change the math
UNDERSTOOD = {"scaling", "dropout", "softcap", "s_aux", "sliding_window", "is_causal"}
BOOKKEEPING = {"position_ids", "cache_position", "use_cache", "output_attentions", "return_dict", "token_type_ids",
               "position_embeddings", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
               "output_hidden_states", "layer_idx", "is_first_iteration"}
TOLERANCE = 1e-3
REPORT_CONTEXTS = (1024, 8192, 32768)


def _configs(model: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def probe_calls(model: nn.Module) -> dict[str, dict[str, Any]]:
    """fqn -> the first self-attention kernel call of that module during one short forward (see module docstring)."""
    params = list(model.parameters())
    if not params or any(p.is_meta for p in params):
        raise PlanError(f"{type(model).__name__} has parameters on the meta device: converting at the attention kernel "
                        "needs one short forward to see which modules call it; load the weights first")
    inputs = probe_inputs(model)
    if inputs is None:
        raise PlanError(f"no probe input for {type(model).__name__} (main input "
                        f"{getattr(model, 'main_input_name', '?')!r}): cannot see which modules call the attention kernel")
    configs = _configs(model)
    previous = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    try:
        for cfg, impl in previous:
            cfg._attn_implementation_internal = implementation_name(base_of(impl), probe=True)
        probe_forward(model, inputs)
    except Exception as e:
        raise PlanError(f"the probe forward of {type(model).__name__} failed ({type(e).__name__}: {str(e)[:160]}); "
                        "cannot see which modules call the attention kernel") from e
    finally:
        for cfg, impl in previous:
            cfg._attn_implementation_internal = impl
        found = {fqn: m.__dict__.pop(PROBE_CALLS) for fqn, m in model.named_modules() if PROBE_CALLS in m.__dict__}
    return {fqn: calls[0] for fqn, calls in found.items()
            if calls[0]["key"].shape[-2] == calls[0]["query"].shape[-2]}   # self-attention only


def _layer(fqn: str, module: nn.Module, position: int) -> int:
    idx = getattr(module, "layer_idx", None)
    if isinstance(idx, int):
        return idx
    numbers = re.findall(r"\.(\d+)(?:\.|$)", "." + fqn)
    return int(numbers[-1]) if numbers else position


def _causal(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    value = kwargs.get("is_causal", getattr(module, "is_causal", None))
    return bool(value) if isinstance(value, bool) else True


def _identity_error(call: dict[str, Any], causal: bool) -> float:
    """Relative difference between the module's own kernel and the hybrid with a window covering the probe."""
    q, k, v, kw = call["query"], call["key"], call["value"], call["kwargs"]
    H, D, Hkv, T = q.shape[1], q.shape[-1], k.shape[1], q.shape[-2]
    fq, fk = make_feature_map("elu1", H, D), make_feature_map("elu1", Hkv, D)
    scale = kw.get("scaling")
    scale = float(scale) if scale is not None else D ** -0.5
    if causal:
        s_aux = kw.get("s_aux")
        got = capped_hybrid_attention(q, k, v, fq, fk, scale=scale, window=T + 1, key_mask=key_valid(call["mask"], T),
                                      softcap=kw.get("softcap"), s_aux=s_aux).out
    else:
        got = bidirectional_linear_attention(q, k, v, fq, fk, scale=scale, key_mask=key_valid(call["mask"], T),
                                             local_mask=torch.ones(T, T, dtype=torch.bool, device=q.device))
    ref = call["output"].transpose(1, 2)
    if ref.shape != got.shape:
        return float("inf")
    return (got.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-6)


def _layer_kind(module: nn.Module, layer: int) -> Any:
    try:
        kinds = getattr(getattr(module, "config", None), "layer_types", None)
    except Exception:   # per-layer configs raise on ambiguous reads: unknown
        return None
    return kinds[layer] if isinstance(kinds, (list, tuple)) and 0 <= layer < len(kinds) else None


def _problems(module: nn.Module, call: dict[str, Any], config: LinearizeAttention, causal: bool,
              layer: int) -> list[str]:
    why = []
    kw = call["kwargs"]
    kind = _layer_kind(module, layer)
    if causal and kind not in ATTENTION_LAYER_TYPES + ("chunked_attention",):
        why.append(f"its cache layer is a {kind!r} layer (config.layer_types): the model keeps its own recurrent state "
                   "there, which the hybrid's state would overwrite")
    unknown = sorted(k for k, v in kw.items() if v is not None and k not in UNDERSTOOD | BOOKKEEPING
                     and not k.startswith(("output_", "return_")))
    if unknown:
        why.append(f"passes kernel argument(s) {', '.join(repr(k) for k in unknown)} that the hybrid kernel does not "
                   "understand (its math would be dropped)")
    if getattr(module, "is_kv_shared_layer", False):
        why.append("reuses another layer's keys/values (shared KV cache), which a linear state cannot provide")
    own = kw.get("sliding_window")
    if causal and isinstance(own, int) and 0 < own < config.window:
        why.append(f"the model's own sliding window is {own} tokens, smaller than window={config.window}; "
                   f"choose window <= {own}")
    if causal and config.gate != "none":
        why.append(f"gate={config.gate!r} needs the module's hidden states / raw keys, which the attention kernel "
                   "does not receive; use gate='none' at the kernel")
    if causal and (any(config.memory) if isinstance(config.memory, (list, tuple)) else config.memory):
        why.append(f"memory={config.memory} slots are not kept at the attention kernel yet; use memory=0")
    if not causal and (kw.get("softcap") is not None or kw.get("s_aux") is not None):
        why.append("soft-capping / learned sinks in bidirectional attention are not carried")
    if HYBRID in module._modules:
        why.append(f"already converted (it has a {HYBRID!r} child)")
    if not why:
        err = _identity_error(call, causal)
        if not err <= TOLERANCE:
            why.append(f"with a window covering all probe tokens the hybrid differs from the module's own kernel by "
                       f"{err:.1e} (relative): the module computes something surgeon does not read")
    return why


def plan_kernel(model: nn.Module, config: LinearizeAttention, ctx: PassContext, select_layers) -> Plan:
    """The kernel-path plan (raises PlanError when no module calls the registry, ConfigError naming each refusal)."""
    calls = probe_calls(model)
    if not calls:
        raise PlanError(f"no attention module of {type(model).__name__} calls transformers' attention registry on its "
                        "own keys (checked by one probe forward)")
    sites = []
    for position, (fqn, call) in enumerate(calls.items()):
        module = get_submodule(model, fqn)
        sites.append(Site(name=fqn, base=fqn, kind="module", op=type(module).__name__, scope=fqn.rpartition(".")[0],
                          data={"layer": _layer(fqn, module, position), "kernel": True}))
    chosen = choose_sites(sites, config, ctx, resolve_module=lambda s: get_submodule(model, s.name),
                          what="attention module", narrow=select_layers)
    reasons, info = {}, {}
    for site in chosen:
        module, call = get_submodule(model, site.name), calls[site.name]
        causal = _causal(module, call["kwargs"])
        why = _problems(module, call, config, causal, site.data["layer"])
        if why:
            reasons[site.name] = why
        q, k, v = call["query"], call["key"], call["value"]
        info[site.name] = dict(n_heads=q.shape[1], n_kv_heads=k.shape[1], head_dim=q.shape[-1], v_dim=v.shape[-1],
                               causal=causal, semantics=sorted(n for n in ("softcap", "s_aux")
                                                               if call["kwargs"].get(n) is not None))
    if reasons:
        lines = [f"  {fqn}: {'; '.join(why)}" for fqn, why in reasons.items()]
        raise ConfigError(f"LinearizeAttention cannot convert {len(reasons)} attention modules exactly at the "
                          "attention kernel:\n" + "\n".join(lines) + "\nLeave these modules out (layers=[...] or "
                          "exclude=[...]) or change the setting named above; the model was not changed.")
    return Plan(chosen, state={"kernel": info})


def rewrite_kernel(model: nn.Module, config: LinearizeAttention, plan: Plan) -> nn.Module:
    """Attach a :class:`KernelHybrid` to each chosen module, hook its cache, switch its config's implementation."""
    info = plan.state["kernel"]
    for site in plan.sites:
        module, meta = get_submodule(model, site.name), info[site.name]
        unit = KernelHybrid(meta["n_heads"], meta["n_kv_heads"], meta["head_dim"], config, site.data["layer"],
                            meta["causal"])
        match_original(unit, module, [])
        module.add_module(HYBRID, unit)
        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        module.register_forward_hook(post_hook, with_kwargs=True, always_call=True)
        cfg = module.config
        cfg._attn_implementation_internal = implementation_name(base_of(cfg._attn_implementation_internal))
    return model


def report_kernel(model: nn.Module, config: LinearizeAttention, plan: Plan) -> Report:
    rows, shapes = [], []
    for site in plan.sites:
        meta = plan.state["kernel"][site.name]
        unit = get_submodule(model, site.name)._modules[HYBRID]
        rows.append({"site": site.name, "layer": site.data["layer"], "replaced": f"{site.op} (kernel)",
                     "heads": f"{meta['n_heads']}/{meta['n_kv_heads']}", "head_dim": meta["head_dim"],
                     "features": unit.feature_q.out_dim, "window": config.window, "gate": config.gate,
                     "causal": meta["causal"], "params_added": sum(p.numel() for p in unit.parameters())})
        hedgehog = (config.feature_dim or meta["head_dim"]) if config.feature_map == "hedgehog" else 0
        shapes.append(AttentionShape(meta["n_heads"], meta["n_kv_heads"], meta["head_dim"], unit.feature_q.out_dim,
                                     config.window if meta["causal"] else 0, config.chunk_size, hedgehog,
                                     config.sinks if meta["causal"] else 0))
    report = Report("LinearizeAttention", list(rows[0]) if rows else ["site"], rows,
                    totals={"params_added": sum(r["params_added"] for r in rows)})
    carried = sorted({s for m in plan.state["kernel"].values() for s in m["semantics"]})
    report.notes.append("converted at the attention kernel: each module's own code computes q/k/v, rotary, norms and "
                        "gates; the hybrid replaces only its attention function"
                        + (f" (carried: {', '.join(carried)})" if carried else ""))
    if shapes and rows[0]["causal"]:
        costs = cost_rows(shapes, REPORT_CONTEXTS, next(model.parameters()).element_size())
        report.notes.append(f"attention costs of the {len(shapes)} converted layers (batch 1):\n"
                            + format_table(list(costs[0]), costs))
    return report
