"""Planning the FX attention rewrite: sites, their heads / masks / causality, unit paths."""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgeon.fx import patterns as graph_patterns
from surgeon.core.errors import ConfigError, PlanError, TraceError
from surgeon.fx.placement import path_is_free
from surgeon.fx.tracing import free_attr_name, node_shape
from surgeon.core.handler import PassContext, match_recorded
from surgeon.passes.attention import graph as ag
from surgeon.passes.attention.config import LinearizeAttention
from surgeon.core.selectors import select_sites
from surgeon.core.sites import Plan, Site
from surgeon.passes.attention.fx_scores import AttentionMatch, fx_is
from surgeon.passes.attention.fx_match import attention_like_nodes, find_attention
from surgeon.passes.attention.fx_trace import (
    allowed_keys,
    capture,
    concrete_inputs,
    data_dependent,
    export_for_attention,
    fx_pattern,
    propagate,
    state_placeholders,
    trace_for_attention,
)

# ----------------------------------------------------------------------------------------------
# plan


def _base_name(match: AttentionMatch, gm: fx.GraphModule | None = None) -> str:
    node = match.anchor
    if node.op == "call_module":
        return str(node.target)
    scope = graph_patterns.module_scope(node, gm)
    leaf = "sdpa" if match.kind == "sdpa" else "softmax"
    return f"{scope}.{leaf}" if scope else leaf


def _grid(n_tokens: int) -> tuple[tuple[int, int] | None, int]:
    for prefix in (1, 0):
        side = math.isqrt(max(n_tokens - prefix, 0))
        if side > 1 and side * side == n_tokens - prefix:
            return (side, side), prefix
    return None, 0


def _describe_types(model: nn.Module, limit: int = 12) -> list[str]:
    seen: list[str] = []
    for m in model.modules():
        if type(m).__name__ not in seen:
            seen.append(type(m).__name__)
    return seen[:limit] + (["..."] if len(seen) > limit else [])


_CONV = {F.conv2d, torch.conv2d} | ag._packets("convolution", "conv2d", "_convolution")


def _has_conv2d(model: nn.Module) -> bool:
    """An image model (patch embedding by a 2-D convolution), as a module or as a call in the graph
    (dynamo and torch.export inline ``nn.Conv2d``)."""
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return True
    graph = getattr(model, "graph", None)
    return graph is not None and any(
        fx_is(n, _CONV) and len(node_shape(n.args[1]) or []) == 4 for n in graph.nodes
        if len(n.args) > 1 and isinstance(n.args[1], fx.Node))


def _site_data(match: AttentionMatch, values: dict[fx.Node, Any], model: nn.Module, config: LinearizeAttention,
               name: str, state: set[fx.Node] | frozenset = frozenset()) -> dict[str, Any]:
    q_shape, k_shape, v_shape = node_shape(match.q), node_shape(match.k), node_shape(match.v)
    if q_shape is None or k_shape is None or v_shape is None:
        raise PlanError(f"attention site {name!r}: no shapes were recorded for q/k/v; check example_inputs")
    if match.k_perm is not None:
        k_shape = [k_shape[i] for i in match.k_perm]
    nd = len(q_shape)
    if nd not in (3, 4) or len(k_shape) != nd or len(v_shape) != nd:
        raise PlanError(f"attention site {name!r}: q/k/v have shapes {q_shape}/{k_shape}/{v_shape}; the FX path "
                        "takes (batch, heads, tokens, head_dim) or (batch·heads, tokens, head_dim)")
    heads = q_shape[1] if nd == 4 else 1
    kv_heads = k_shape[1] if nd == 4 else 1
    if heads % kv_heads:
        raise PlanError(f"attention site {name!r}: {heads} query heads are not a multiple of {kv_heads} key heads")
    mask_rows, causal_from, kept = [], None, []
    for node, kind in match.masks:
        value = values.get(node)
        if not isinstance(value, torch.Tensor):
            raise PlanError(f"attention site {name!r}: mask {node.name} is not a tensor ({type(value).__name__})")
        pattern = fx_pattern(allowed_keys(value, kind))
        structural = not data_dependent(node, state)
        if structural and pattern in ("causal", "all"):
            causal_from = causal_from or ("mask" if pattern == "causal" else None)
            mask_rows.append(f"{node.name}:{kind}:{pattern}:dropped")
            continue
        if pattern in ("causal", "lower"):
            causal_from = "mask"
        kept.append([node.name, kind])
        mask_rows.append(f"{node.name}:{kind}:{'structural' if structural else 'input'}:{pattern}")
    causal = bool(match.is_causal) or causal_from is not None
    scale = match.scale
    computed = not (scale is None or isinstance(scale, float))
    if scale is None:  # SDPA's default
        scale = q_shape[-1] ** -0.5
    elif computed:  # its value on the example inputs, for the report
        scale = 1.0
        for factor, power in match.scale_terms:
            value = float(values[factor]) if isinstance(factor, fx.Node) else float(factor)
            scale = scale * value if power > 0 else scale / value
    grid, n_prefix = (None, 0)
    if config.local and nd in (3, 4) and _has_conv2d(model):
        grid, n_prefix = _grid(q_shape[-2])
    return {
        "spelling": match.spelling, "causal": causal, "heads": heads, "kv_heads": kv_heads,
        "repeat_kv": match.repeat_kv,
        "head_dim": q_shape[-1], "v_dim": v_shape[-1], "ndim": nd, "tokens": [q_shape[-2], k_shape[-2]],
        "scale": scale, "scale_computed": computed, "masks": kept, "mask_notes": mask_rows, "dropout": match.dropout,
        "image_grid": grid is not None, "n_prefix": n_prefix,
    }


def _check_tokens(where: str, data: dict[str, Any], causal: bool) -> None:
    tq, tk = data["tokens"]
    if tq < tk and (causal or data.get("named_by_module")):
        raise PlanError(f"{where} attends {tq} queries to {tk} keys: a decode step over cached keys. Linear attention "
                        "in a rewritten graph has no recurrent state; compile the prefill (use_cache=False), and "
                        "decode with the eager surgered model (surgeon.restore), which keeps its state in the cache")


def _check_site(name: str, data: dict[str, Any], config: LinearizeAttention) -> None:
    causal = data["causal"]
    where = f"attention site {name!r}"
    if data.get("named_by_module") and data["tokens"][0] < data["tokens"][1]:
        _check_tokens(where, data, causal)
    if config.gate == "liger":
        raise ConfigError(f"gate='liger' derives its decay from a pretrained key projection (k_proj), which the FX "
                          f"path does not have ({where} is hand-written attention in a traced graph). The Liger "
                          "gate needs the Hugging Face module path; use gate='learned' or gate='none' here")
    if config.causal is True and not causal:
        raise ConfigError(f"causal=True was asked for, but {where} is bidirectional (no causal mask or is_causal); "
                          "use causal=None (take it from the model)")
    if config.causal is False and causal:
        raise ConfigError(f"causal=False on a causal model ({where} has a causal mask): a decoder's attention must "
                          "stay causal; use causal=None")
    if causal and config.local:
        raise ConfigError(f"local=True is for bidirectional models, but {where} is causal; use window=... "
                          "(softmax over the last `window` tokens) instead")
    if not causal and config.gate != "none":
        raise ConfigError(f"gate={config.gate!r} decays the past of causal attention, but {where} is bidirectional; "
                          "use gate='none'")
    if not causal and config.window > 0 and not config.local:
        raise ConfigError(f"{where} is bidirectional: a sliding window over past tokens has no meaning there; use "
                          "local=True (softmax inside a local window) or window=0")
    _check_tokens(where, data, causal)
    tq, tk = data["tokens"]
    if tq != tk and (causal or config.local):
        raise PlanError(f"{where} attends {tq} queries to {tk} keys (cross-attention); causal and local linear "
                        "attention need self-attention (as many queries as keys)")
    if config.gate == "learned":
        raise ConfigError(f"gate='learned' is not available on the FX path yet ({where}); use gate='none', or the "
                          "Hugging Face module path for a gated model")


def _select_layers(found: list[Site], chosen: list[Site], layers: list[int] | None) -> list[Site]:
    if layers is None:
        return chosen
    if found and all("layer" in s.data for s in found):  # Hugging Face modules: by decoder-layer index
        return [s for s in chosen if s.data["layer"] in set(layers)]
    bad = [i for i in layers if not 0 <= i < len(found)]
    if bad:
        raise ConfigError(f"LinearizeAttention.layers {bad} out of range: the model has {len(found)} attention "
                          f"sites, valid indices 0..{len(found) - 1} ({[s.name for s in found]})")
    wanted = {found[i].name for i in layers}
    picked = [s for s in chosen if s.name in wanted]
    if not picked:
        raise ConfigError(f"LinearizeAttention.layers {layers} selects {sorted(wanted)}, which targets/exclude/"
                          f"filter_fn left out (they kept {[s.name for s in chosen]})")
    return picked


def _assign_unit_paths(gm: fx.GraphModule, sites: list[Site]) -> None:
    """Where each unit goes: the path a recipe recorded; on a graph without a module at a site's
    attention module (dynamo), that module's path itself, so the unit's parameters take the names the
    eager (module-swap) surgery gave them (``model.layers.0.self_attn.feature_q.weight``); else a free
    ``<scope>.linear_attention``."""
    taken: set[str] = set()
    for site in sites:
        recorded = site.data.get("unit")
        if isinstance(recorded, str) and recorded not in taken and path_is_free(gm, recorded):
            taken.add(recorded)
            continue
        module = site.data.get("module")
        if site.data.get("named_by_module") and module and module not in taken and path_is_free(gm, module):
            taken.add(module)
            site.data["unit"] = module
            continue
        try:
            owner = gm.get_submodule(site.scope) if site.scope else gm
        except AttributeError:
            owner = nn.Module()
        candidate = free_attr_name(owner, "linear_attention")
        while (f"{site.scope}.{candidate}" if site.scope else candidate) in taken:
            candidate = free_attr_name(owner, candidate + "_")
        path = f"{site.scope}.{candidate}" if site.scope else candidate
        taken.add(path)
        site.data["unit"] = path


def graph_inputs(gm: fx.GraphModule) -> tuple[Any, ...] | None:
    """The example values dynamo recorded for a backend graph's placeholders (None for other graphs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = [n.meta.get("grapharg") for n in placeholders]
    if not placeholders or any(a is None for a in args):
        return None
    try:
        values = tuple(a.example for a in args)
    except Exception:  # noqa: BLE001 - an erased example (the graph was already compiled)
        return None
    return None if any(v is None for v in values) else values


def _transformers_scope(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """Class name of the node's module when it comes from transformers (the module-swap path names such
    a site by the module's path), else None."""
    t = graph_patterns.module_type(node, gm)
    qualified = f"{t.__module__}.{t.__qualname__}" if isinstance(t, type) else (t or "")
    return qualified.rpartition(".")[2] if qualified.startswith("transformers.") else None


def plan_fx_attention(model: nn.Module, config: LinearizeAttention, ctx: PassContext) -> Plan:
    """Trace ``model``, find its attention call sites and choose the ones ``config`` selects.

    Sites are named by the scope of the softmax / SDPA call (``blocks.0.attn.sdpa``,
    ``blocks.1.attn.softmax``, an ``nn.Softmax`` module by its path; ``@1``, ``@2``… for further calls
    in the same scope). ``config.layers`` indexes the matches in graph order. Nothing is changed.

    ``model`` may be a graph dynamo handed a ``torch.compile`` backend or a ``torch.export`` graph;
    attention inside a Hugging Face module (whose forward dynamo / export inlined) is then named by that
    module's path (``model.layers.0.self_attn``, op = its class), as the module-swap path names it, so a
    recipe saved from the eager surgery supplies the trained parameters (``surgeon.backend(recipe=...)``).
    ``ctx`` fields set by ``surgeon.backend``: ``allow_empty`` (no attention: an empty plan),
    ``name_offsets`` (site bases counted in earlier graphs), ``from_recipe`` (sites come from a recipe).
    """
    inputs = ctx.example_inputs
    if inputs is None and isinstance(model, fx.GraphModule):
        inputs = graph_inputs(model)
    if inputs is None:
        raise ConfigError(f"LinearizeAttention on hand-written attention ({type(model).__name__} is rewritten as a "
                          "traced graph) needs example_inputs to read the head count, head size and masks: "
                          "surgeon.apply(model, LinearizeAttention(...), example_inputs=(x,))")
    captured = None
    try:
        gm = trace_for_attention(model, config.leaf_modules)
    except TraceError as e:
        try:
            gm = export_for_attention(model, concrete_inputs(inputs))
        except Exception as export_error:
            raise TraceError(f"{e}\n(torch.export could not capture it either: {type(export_error).__name__}: "
                             f"{str(export_error).splitlines()[0][:200]})") from e
        captured = f"symbolic_trace failed ({str(e).splitlines()[0][:160]}): captured with torch.export instead"
    inputs = concrete_inputs(inputs)
    propagate(gm, inputs)
    skipped: list[str] = []
    matches = find_attention(gm, skipped)
    if not matches and ctx.allow_empty:
        return Plan([], {"gm": gm, "matches": {}, "bases": [], "skipped": skipped})
    if not matches:
        types = _describe_types(model)
        hint = ""
        if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
            hint = (" nn.MultiheadAttention is traced as one opaque call (a torch.nn leaf); write the attention "
                    "out, or call F.scaled_dot_product_attention, to rewrite it.")
        why = f" Skipped: {'; '.join(skipped)}." if skipped else ""
        raise PlanError(
            f"LinearizeAttention found no attention in {type(model).__name__}: no Hugging Face attention module and "
            f"no softmax(q @ kᵀ · s) @ v or F.scaled_dot_product_attention call in its traced graph (module types: "
            f"{types}).{hint}{why}"
        )
    owners = [_transformers_scope(m.anchor, gm) for m in matches]
    scopes = [graph_patterns.module_scope(m.anchor, gm) for m in matches]
    bases = [scope if owner and scope else _base_name(m, gm) for m, owner, scope in zip(matches, owners, scopes)]
    seen: Counter[str] = Counter(ctx.name_offsets or {})
    found, by_name = [], {}
    for match, base, owner, scope in zip(matches, bases, owners, scopes):
        k = seen[base]
        seen[base] += 1
        name = base if k == 0 else f"{base}@{k}"
        by_name[name] = match
        data: dict[str, Any] = {"index": len(found), "module": scope}
        if owner and scope:
            data["named_by_module"] = True
            numbers = re.findall(r"\.(\d+)(?:\.|$)", "." + scope)
            if numbers:
                data["layer"] = int(numbers[-1])
        found.append(Site(name=name, base=base, kind="fx", op=owner if owner and scope else match.kind,
                          scope=scope, node=match.anchor.name, shape=node_shape(match.output), data=data))
    if ctx.recorded_sites is not None:
        sites = match_recorded(found, ctx.recorded_sites, config.pass_name)
    elif ctx.from_recipe:
        sites = found  # the backend keeps the recipe's sites among these, then plans again with them
    else:
        chosen = select_sites(found, config.targets, config.exclude, config.filter_fn,
                              resolve_module=lambda s: _resolve(model, s), what="attention site")
        sites = _select_layers(found, chosen, config.layers)
    wanted = {n for s in sites for n, _ in by_name[s.name].masks}
    wanted |= {v for s in sites for v, _ in by_name[s.name].scale_terms if isinstance(v, fx.Node)}
    values = capture(gm, inputs, wanted) if wanted else {}
    state = state_placeholders(gm, inputs)
    for site in sites:
        recorded = dict(site.data)
        data = _site_data(by_name[site.name], values, model, config, site.name, state)
        if ctx.recorded_sites is not None and "causal" in recorded:
            data["causal"] = recorded["causal"]
        _check_site(site.name, {**recorded, **data}, config)
        site.data = {**recorded, **data}
    _assign_unit_paths(gm, sites)
    left = left_as_is(gm, [by_name[s.name].anchor for s in sites], skipped, [m.anchor for m in matches])
    if left and getattr(config, "strict", False):
        raise PlanError("LinearizeAttention(strict=True): softmax / attention calls would stay softmax:\n  "
                        + "\n  ".join(left) + "\nrewrite them by hand, or select them, or drop strict=True")
    return Plan(sites, {"gm": gm, "matches": {s.name: by_name[s.name] for s in sites}, "bases": bases,
                        "skipped": skipped, "left": left, "captured": captured})


def left_as_is(gm: fx.GraphModule, rewritten: list[fx.Node], rejected: list[str], matched: list[fx.Node]
               ) -> list[str]:
    """``node (scope): reason`` for every softmax / SDPA call the plan leaves in the graph."""
    reasons = dict(r.split(": ", 1) for r in rejected if ": " in r)
    left = []
    for node in attention_like_nodes(gm):
        if node in rewritten:
            continue
        if node.name in reasons:
            why = reasons[node.name]
        elif node in matched:
            why = "not selected (layers / targets / exclude / filter_fn)"
        else:
            why = "not of the form softmax(q @ kᵀ · s + mask) @ v over the last dim, nor an SDPA call"
        scope = graph_patterns.module_scope(node, gm)
        left.append(f"{node.name}{f' ({scope})' if scope else ''}: {why}")
    return left


def _resolve(model: nn.Module, site: Site) -> nn.Module | None:
    """The module whose forward holds the attention (what ``filter_fn`` receives)."""
    try:
        return model.get_submodule(site.scope) if site.scope else model
    except AttributeError:
        return None


