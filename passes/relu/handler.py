"""ReLU linearization for private inference: ``LinearizeReLU`` then ``FinalizeReLU``.

``LinearizeReLU`` turns every selected ReLU/ReLU6 *call site* of a traceable model into
``y = m ⊙ act(x) + (1 − m) ⊙ x`` (a ``MaskedReLU`` unit; mask granularity layer | channel | pixel,
initialised to 1 so the model is exactly the original). ``FinalizeReLU`` freezes binary masks: an
all-zero site disappears from the graph (identity), an all-one site becomes a plain ReLU again, a
mixed site keeps a frozen ``BinaryMaskedReLU``.

Example:
    >>> import torch, torch.nn as nn, surgeon
    >>> from surgeon.passes import LinearizeReLU, FinalizeReLU
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    >>> x = torch.randn(2, 3, 8, 8)
    >>> s = surgeon.apply(net, LinearizeReLU(granularity="channel"), example_inputs=(x,))
    >>> torch.equal(s.model(x), net(x))
    True
    >>> s.model.get_submodule("3").mask.data.zero_()
    tensor(...)
    >>> s = surgeon.apply(s, FinalizeReLU())
    >>> [r["action"] for r in s.report["FinalizeReLU"].rows]
    ['relu', 'identity']
"""
from __future__ import annotations

import math
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn

from surgeon.fx import patterns as graph_patterns
from surgeon.core.errors import ConfigError, PlanError
from surgeon.core.modules import find_submodule, get_submodule, set_submodule
from surgeon.fx.tracing import SurgeonUnit, node_scope, node_shape, propagate_shapes, trace
from surgeon.ops.activation import (
    BinaryMaskedReLU,
    MaskedReLU,

    is_inplace,
    mask_shape,
    plain_activation_target,
    relu_kind,
)
from surgeon.ops.poly_units import BinaryMaskedPoly, MaskedPolyReLU, PolyUnit
from surgeon.core.handler import PassContext, register_pass
from surgeon.fx.handler import GraphHandler
from surgeon.fx.placement import place_units
from surgeon.passes.relu.budget import resolve_budget
from surgeon.passes.relu.config import FinalizeReLU, LinearizeReLU
from surgeon.passes.relu.fold import fold_linear_ops
from surgeon.core.report import Report
from surgeon.core.sites import Plan, Site



# ----------------------------------------------------------------------------------------------
# graph editing helpers (module level so tests can inject faults per site)


def _replace_inplace_aliases(gm: fx.GraphModule, node: fx.Node, source: fx.Node, result: fx.Node) -> None:
    """An in-place op also changed its input: later readers of ``source`` must read ``result``."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for user in list(source.users):
        if user is not result and user is not node and order[user] > order[node]:
            user.replace_input_with(source, result)


def place_unit(gm: fx.GraphModule, path: str, unit: nn.Module) -> None:
    """Put ``unit`` at ``path`` in ``gm``, creating empty parents where a captured graph has none."""
    parent = find_submodule(gm, path.rpartition(".")[0])
    if parent is not None:
        set_submodule(gm, path, unit)
    elif not gm.add_submodule(path, unit):
        raise PlanError(f"cannot place a unit at {path!r}: a part of that path is not a module in the graph")


def unit_meta(node: fx.Node, site: Site, unit: nn.Module) -> dict:
    """The replaced node's metadata, with ``nn_module_stack`` ending in the unit (not the old ReLU
    module), so a later ``torch.export`` / dynamo capture of the surgered model knows the unit."""
    meta = dict(node.meta)
    stack = list((node.meta.get("nn_module_stack") or {}).items())
    if site.data.get("call") == "module" and stack:
        stack = stack[:-1]
    stack.append((site.data["unit"], (site.data["unit"], type(unit))))
    meta["nn_module_stack"] = dict(stack)
    return meta


def _without_units(meta: dict) -> dict:
    """Metadata for a plain op that replaces a unit: its ``nn_module_stack`` without unit entries."""
    meta = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        names = _unit_type_names()
        meta["nn_module_stack"] = {k: v for k, v in stack.items()
                                   if not (isinstance(v, tuple) and len(v) > 1 and (
                                       (isinstance(v[1], type) and issubclass(v[1], SurgeonUnit)) or v[1] in names))}
    return meta


def _unit_type_names() -> set[str]:
    names, todo = set(), [SurgeonUnit]
    while todo:
        cls = todo.pop()
        names |= {f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__}
        todo += cls.__subclasses__()
    return names


def inside_unit(node: fx.Node) -> str | None:
    """The path of the surgeon unit whose inlined forward made ``node`` (dynamo / export graphs)."""
    names = None
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        t = value[1] if isinstance(value, tuple) and len(value) > 1 else None
        if isinstance(t, type):
            if issubclass(t, SurgeonUnit):
                return graph_patterns.normalize_path(str(value[0]))
        elif isinstance(t, str):
            names = names if names is not None else _unit_type_names()
            if t in names:
                return graph_patterns.normalize_path(str(value[0]))
    return None


def rewrite_site(gm: fx.GraphModule, node: fx.Node, site: Site, unit: nn.Module) -> fx.Node:
    """Route one ReLU call site through ``unit`` (placed at ``site.data['unit']``)."""
    source = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(source, fx.Node):
        raise PlanError(f"site {site.name!r}: its input is not a graph value ({source!r})")
    place_unit(gm, site.data["unit"], unit)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(site.data["unit"], (source,))
    new.meta = unit_meta(node, site, unit)
    node.replace_all_uses_with(new)
    if site.data.get("inplace"):
        _replace_inplace_aliases(gm, node, source, new)
    gm.graph.erase_node(node)
    return new


def inlined_units(gm: fx.GraphModule) -> list[tuple[str, list[fx.Node], fx.Node, fx.Node]]:
    """``MaskedReLU`` units that ``torch.export`` / dynamo inlined: ``(path, nodes, input, output)``.

    A unit's nodes are those whose ``nn_module_stack`` holds it; it must read one graph value (besides
    its mask) and be read through one node, else it is not rewritable and is left out.
    """
    groups: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            path = inside_unit(node)
            if path is not None:
                groups.setdefault(path, []).append(node)
    found = []
    for path, nodes in groups.items():
        members = set(nodes)
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes
                                    if a not in members and a.op != "get_attr"))
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        if len(inputs) == 1 and len(outputs) == 1:
            found.append((path, nodes, inputs[0], outputs[0]))
    return found


def _inlined_unit(gm: fx.GraphModule, path: str, nodes: list[fx.Node]) -> tuple[str, torch.Tensor, str]:
    """(kind, mask, site name) of an inlined unit: from the eager model when the graph knows it."""
    source = gm.meta.get(graph_patterns.SOURCE_MODEL_META)
    try:
        unit = source.get_submodule(path) if source is not None else None
    except AttributeError:
        unit = None
    if isinstance(unit, MaskedPolyReLU):
        raise ConfigError(f"FinalizeReLU: unit {path!r} uses polynomial units; finalize them before export "
                          f"(surgeon.apply(surgery, FinalizeReLU())), not on the export graph")
    if isinstance(unit, MaskedReLU):
        return unit.kind, unit.mask.detach(), getattr(unit, "site_name", path)
    mask = gm.get_parameter(f"{path}.mask") if path else gm.get_parameter("mask")
    kind = "relu6" if any(graph_patterns.relu_kind(n) == "relu6" for n in nodes) else "relu"
    return kind, mask.detach(), path


def finalize_inlined(gm: fx.GraphModule, site: Site, threshold: float) -> None:
    """Replace an inlined unit's nodes by identity, the plain ATen activation, or a frozen binary mask."""
    nodes = [n for n in gm.graph.nodes if n.name in set(site.data["region"])]
    source = next(n for n in gm.graph.nodes if n.name == site.data["input"])
    output = next(n for n in nodes if n.name == site.node)
    action = site.data["action"]
    if action == "identity":
        new = source
    else:
        with gm.graph.inserting_after(output):
            if action == "relu":
                new = (gm.graph.call_function(torch.ops.aten.relu.default, (source,)) if site.op == "relu"
                       else gm.graph.call_function(torch.ops.aten.hardtanh.default, (source, 0.0, 6.0)))
            else:
                kind, mask, _ = _inlined_unit(gm, site.data["unit"], nodes)
                frozen = BinaryMaskedReLU(kind, mask >= threshold)
                frozen.site_name = site.name
                path = site.data["unit"] + "_frozen"
                place_unit(gm, path, frozen)
                new = gm.graph.call_module(path, (source,))
        new.meta = _without_units(output.meta) if action == "relu" else dict(output.meta)
    output.replace_all_uses_with(new)
    for n in reversed(nodes):
        if not n.users:
            gm.graph.erase_node(n)
    for n in list(gm.graph.nodes):  # the mask's get_attr, now unread
        if n.op == "get_attr" and not n.users and str(n.target).startswith(site.data["unit"] + "."):
            gm.graph.erase_node(n)


def _inlined_sites(gm: fx.GraphModule, threshold: float) -> list[Site]:
    sites = []
    for path, nodes, source, output in inlined_units(gm):
        kind, mask, name = _inlined_unit(gm, path, nodes)
        binary = mask >= threshold
        action = "identity" if not binary.any() else "relu" if binary.all() else "masked"
        sites.append(Site(name=name, base=name.partition("@")[0], kind="fx", op=kind, scope=path.rpartition(".")[0],
                          node=output.name, shape=node_shape(output),
                          data={"unit": path, "action": action, "kept": int(binary.sum()), "entries": binary.numel(),
                                "poly": False, "region": [n.name for n in nodes], "input": source.name}))
    return sites


def finalize_site(gm: fx.GraphModule, node: fx.Node, site: Site, threshold: float) -> None:
    """Replace a MaskedReLU call by identity, a plain activation, or a frozen binary mask."""
    if site.data.get("region"):
        return finalize_inlined(gm, site, threshold)
    unit = gm.get_submodule(str(node.target))
    source = node.args[0]
    action = site.data["action"]
    if isinstance(unit, MaskedPolyReLU) and action in ("identity", "poly"):
        poly = PolyUnit(unit.coef)
        poly.site_name = site.name
        set_submodule(gm, str(node.target), poly)
    elif isinstance(unit, MaskedPolyReLU) and action == "masked":
        frozen = BinaryMaskedPoly(unit.kind, unit.mask.detach() >= threshold, unit.coef)
        frozen.site_name = site.name
        set_submodule(gm, str(node.target), frozen)
    elif action == "identity":
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    elif action == "relu":
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(plain_activation_target(unit.kind), (source,))
        new.meta = _without_units(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    else:
        frozen = BinaryMaskedReLU(unit.kind, unit.mask.detach() >= threshold)
        frozen.site_name = site.name
        set_submodule(gm, str(node.target), frozen)


# ----------------------------------------------------------------------------------------------


def _fn_name(node: fx.Node, kind: str) -> str:
    return kind if node.op != "call_module" else str(node.target).rpartition(".")[2]


def relu_sites(gm: fx.GraphModule, offsets: Counter[str] | None = None) -> list[Site]:
    """Every ReLU-family call site of a graph, with unique, stable names.

    A module called once is named by its path; a module called k times gives ``path``, ``path@1``,
    ...; a functional call inside module ``scope`` is ``scope.relu`` (``scope.relu@1``, ...). The graph
    may come from ``symbolic_trace``, a ``torch.compile`` backend (dynamo) or ``torch.export``: an
    inlined ``nn.ReLU`` (``F.relu`` / ``aten.relu`` whose ``nn_module_stack`` ends in the ReLU module)
    gets the module's FQN, so names match the eager path (see ``surgeon.fx.patterns``).
    ``offsets`` continues the ``@k`` numbering of bases already seen in earlier graphs (a compile
    backend's graphs before a graph break).
    """
    found: list[tuple[fx.Node, str, str, str, str]] = []
    for node in gm.graph.nodes:
        kind = relu_kind(node, gm)
        if kind is None or (node.op != "call_module" and inside_unit(node) is not None):
            continue  # the activation inside an inlined surgeon unit is not a site of its own
        module = graph_patterns.module_call(node, gm, kind)
        if module is not None:
            base, call, scope = module, "module", node_scope(node, gm) if node.op == "call_module" \
                else module.rpartition(".")[0]
        else:
            scope = graph_patterns.module_path(node, gm)
            base, call = (f"{scope}.{kind}" if scope else kind), node.op.removeprefix("call_")
        found.append((node, kind, base, call, scope))
    seen: Counter[str] = Counter(offsets or {})
    sites = []
    for node, kind, base, call, scope in found:
        k = seen[base]
        seen[base] += 1
        name = base if k == 0 else f"{base}@{k}"
        sites.append(
            Site(name=name, base=base, kind="fx", op=kind, scope=scope, node=node.name,
                 shape=node_shape(node),
                 data={"call": call, "inplace": is_inplace(node, gm)})
        )
    return sites


def _unit_owner_and_leaf(site: Site) -> tuple[str, str]:
    """A new unit's owner module and leaf name: ``scope.relu_1`` for a functional call, ``relu_0``,
    ``relu_1``... beside a module called several times."""
    if site.data["call"] == "module":
        return site.base.rpartition(".")[0], site.base.rpartition(".")[2] + "_" + (site.name.partition("@")[2] or "0")
    return site.scope, site.name.rpartition(".")[2].replace("@", "_")


def _assign_unit_paths(gm: fx.GraphModule, sites: list[Site], modules_called: Counter[str],
                       keep_recorded: bool = False) -> None:
    """Where each site's unit will live: the module's own path when it is called once, else a new name.

    On dynamo / export graphs the module tree is gone (modules were inlined); the unit is put at the
    same path, with empty parent modules created as needed (``GraphModule.add_submodule``).
    """
    def preferred(site: Site, taken: set[str]) -> str | None:
        if keep_recorded and site.data.get("unit"):  # replay: the recipe's path, so weights line up
            return site.data["unit"]
        if site.data["call"] == "module" and modules_called[site.base] == 1:
            return site.base
        return None

    place_units(gm, sites, owner_and_leaf=_unit_owner_and_leaf, preferred=preferred)


def _resolve(gm: fx.GraphModule, site: Site) -> nn.Module | None:
    return find_submodule(gm, site.base if site.data.get("call") == "module" else site.scope)


@register_pass(LinearizeReLU)
class LinearizeReLUHandler(GraphHandler):
    """FX path: trace, find ReLU call sites, insert MaskedReLU units."""

    what = "ReLU call site"

    def graph(self, model: nn.Module, config: LinearizeReLU, ctx: PassContext) -> fx.GraphModule:
        gm = trace(model, config.leaf_modules, config.leaf_fn)
        captured = graph_patterns.graph_source(gm) != "symbolic_trace"  # shapes are in the node metadata
        if config.granularity != "layer" and ctx.example_inputs is None and not captured and not ctx.sites_only:
            raise ConfigError(
                f"LinearizeReLU(granularity={config.granularity!r}) needs a fixed input shape to size its "
                f"masks: pass example_inputs=(tensor, ...) to surgeon.apply, or use granularity='layer'."
            )
        if ctx.example_inputs is not None and not captured:
            propagate_shapes(gm, ctx.example_inputs)
        return gm

    def find(self, gm: fx.GraphModule, config: LinearizeReLU, ctx: PassContext) -> list[Site]:
        return relu_sites(gm, Counter(ctx.name_offsets or {}))

    def state(self, gm: fx.GraphModule, found: list[Site]) -> dict:
        return {"bases": Counter(s.base for s in found)}  # a backend continues the @k numbering in later graphs

    def no_sites(self, model: nn.Module, config: LinearizeReLU) -> str:
        return (f"LinearizeReLU found no ReLU call site in {type(model).__name__} "
                f"(looked for nn.ReLU/ReLU6, F.relu/relu6, torch.relu, .relu(), hardtanh(0, 6), clamp(min=0)).")

    def resolve(self, gm: fx.GraphModule, site: Site) -> nn.Module | None:
        return _resolve(gm, site)

    def prepare(self, gm: fx.GraphModule, found: list[Site], sites: list[Site], config: LinearizeReLU,
                ctx: PassContext) -> dict:
        if ctx.recorded_sites is not None:
            # the recipe's unit path and mask shape win; how the op is spelled here stays this graph's
            local = {s.name: {k: s.data[k] for k in ("call", "inplace")} for s in found}
            for site in sites:
                site.data.update(local[site.name])
        calls = Counter(s.base for s in found if s.data["call"] == "module")
        _assign_unit_paths(gm, sites, calls, keep_recorded=ctx.recorded_sites is not None)
        for site in sites:
            if config.granularity != "layer":
                if site.shape is None:
                    raise PlanError(f"site {site.name!r}: no shape was recorded; check example_inputs")
                if len(site.shape) < 2:
                    raise ConfigError(f"site {site.name!r} has shape {site.shape}: no channel/pixel dims")
            site.data["mask_shape"] = list(mask_shape(config.granularity, site.shape, config.channel_dim))
            if config.units == "poly":
                site.data["coef_shape"] = (list(mask_shape("channel", site.shape, config.channel_dim))
                                           if site.shape is not None and len(site.shape) >= 2 else [])
        if config.budget is not None and not ctx.from_recipe:
            # with a recipe the trained masks already meet the budget (and a captured graph may hold
            # only part of the model's sites)
            if ctx.example_inputs is None:
                raise ConfigError("LinearizeReLU(budget=...) needs example_inputs to count the ReLUs it budgets")
            total = sum(math.prod(s.shape[1:]) for s in sites)
            resolve_budget(config.budget, total)  # raises on a budget the model cannot meet
        return {}

    def unit(self, site: Site, config: LinearizeReLU, plan: Plan, ctx: PassContext) -> nn.Module:
        if config.units == "poly":
            unit = MaskedPolyReLU(site.op, site.data["mask_shape"], site.data.get("coef_shape", []))  # type: ignore[arg-type]
        else:
            unit = MaskedReLU(site.op, site.data["mask_shape"])  # type: ignore[arg-type]
        unit.site_name = site.name  # FinalizeReLU reports and selects by the same name
        unit.example_shape = list(site.shape[1:]) if site.shape else None  # per-example activation shape
        unit.channel_dim = config.channel_dim
        with torch.no_grad():
            unit.mask.fill_(config.init)
        return unit

    def rewrite_site(self, gm: fx.GraphModule, node: fx.Node, site: Site, unit: nn.Module | None,
                     plan: Plan) -> None:
        rewrite_site(gm, node, site, unit)  # the module-level function (tests inject faults there)

    def needs_recipe(self, config: LinearizeReLU) -> str | None:
        """Why this config's units carry trained values a compile backend must load from a recipe."""
        if config.budget is not None:
            return f"budget={config.budget!r} (masks chosen by search_relu_budget)"
        if config.units == "poly":
            return "units='poly' (polynomial coefficients fitted on data)"
        return None

    def report(self, model: nn.Module, config: LinearizeReLU, plan: Plan, ctx: PassContext) -> Report:
        rows = []
        for site in plan.sites:
            unit = model.get_submodule(site.data["unit"])
            shape = site.shape
            elements = math.prod(shape[1:]) if shape else None
            rows.append({
                "site": site.name, "op": site.op, "call": site.data["call"], "shape": shape,
                "mask": list(unit.mask.shape) or "scalar", "params": unit.mask.numel(),
                "relus": unit.relu_count(shape) if shape else None,
                "macs": elements,  # one blend (multiply-accumulate) per element while masked
            })
        totals = {"params": sum(r["params"] for r in rows)}
        if all(r["relus"] is not None for r in rows):
            totals["relus"] = sum(r["relus"] for r in rows)
            totals["macs"] = sum(r["macs"] for r in rows)
        return Report("LinearizeReLU", ["site", "op", "call", "shape", "mask", "params", "relus", "macs"],
                      rows, totals, notes=["relus: elements per example that pass through the activation; "
                                           "macs: per example, one blend per element of a masked unit"])


@register_pass(FinalizeReLU)
class FinalizeReLUHandler(GraphHandler):
    """Freeze MaskedReLU units: identity / plain activation / frozen binary mask."""

    what = "MaskedReLU unit"

    def graph(self, model: nn.Module, config: FinalizeReLU, ctx: PassContext) -> fx.GraphModule:
        if not isinstance(model, fx.GraphModule):
            raise PlanError(f"FinalizeReLU works on the model LinearizeReLU returned; {type(model).__name__} "
                            f"is not one. Apply LinearizeReLU first (surgeon.apply(surgery, FinalizeReLU()).")
        return model

    def find(self, gm: fx.GraphModule, config: FinalizeReLU, ctx: PassContext) -> list[Site]:
        found = []
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), MaskedReLU):
                unit = gm.get_submodule(str(node.target))
                binary = (unit.mask.detach() >= config.threshold)
                action = "identity" if not binary.any() else "relu" if binary.all() else "masked"
                name = getattr(unit, "site_name", str(node.target))
                if isinstance(unit, MaskedPolyReLU) and action != "relu":
                    if not bool(unit.calibrated):
                        raise ConfigError(
                            f"FinalizeReLU: site {name!r} uses polynomial units that were never fitted; "
                            f"call surgeon.passes.fit_polynomials(model, calibration_batches) first "
                            f"(or search_relu_budget, which fits them from its data)")
                    action = "poly" if action == "identity" else action
                found.append(Site(name=name, base=name.partition("@")[0], kind="fx", op=unit.kind,
                                  scope=node_scope(node), node=node.name, shape=node_shape(node),
                                  data={"unit": str(node.target), "action": action, "kept": int(binary.sum()),
                                        "entries": binary.numel(), "poly": isinstance(unit, MaskedPolyReLU)}))
        if not found and graph_patterns.graph_source(gm) != "symbolic_trace":
            found = _inlined_sites(gm, config.threshold)  # units torch.export / dynamo inlined
        return found

    def no_sites(self, model: nn.Module, config: FinalizeReLU) -> str:
        return "FinalizeReLU found no MaskedReLU unit: apply LinearizeReLU first."

    def resolve(self, gm: fx.GraphModule, site: Site) -> nn.Module | None:
        return find_submodule(gm, site.data["unit"])

    def rewrite_site(self, gm: fx.GraphModule, node: fx.Node, site: Site, unit: nn.Module | None,
                     plan: Plan) -> None:
        finalize_site(gm, node, site, plan.state["threshold"])  # module level: tests inject faults there

    def prepare(self, gm: fx.GraphModule, found: list[Site], sites: list[Site], config: FinalizeReLU,
                ctx: PassContext) -> dict:
        return {"threshold": config.threshold}

    def finish(self, gm: fx.GraphModule, config: FinalizeReLU, plan: Plan, ctx: PassContext) -> None:
        if config.fold:
            plan.state["folded"] = fold_linear_ops(gm)

    def touched(self, model: nn.Module, config: FinalizeReLU, plan: Plan) -> list[str] | None:
        return None if config.fold else []  # folding edits the weights of the layers it merges

    def report(self, model: nn.Module, config: FinalizeReLU, plan: Plan, ctx: PassContext) -> Report:
        rows = []
        for s in plan.sites:
            per_example = math.prod(s.shape[1:]) if s.shape else None
            kept = s.data["kept"] / s.data["entries"]
            relus = int(round(kept * per_example)) if per_example else None
            rows.append({"site": s.name, "op": s.op, "action": s.data["action"],
                         "kept": f"{s.data['kept']}/{s.data['entries']}", "relus": relus,
                         "poly": (per_example - relus if s.data.get("poly") else 0) if per_example else None})
        totals = {}
        if all(r["relus"] is not None for r in rows):
            totals = {"relus": sum(r["relus"] for r in rows), "poly": sum(r["poly"] for r in rows)}
        notes = []
        if plan.state.get("folded"):
            notes.append("folded: " + ", ".join(plan.state["folded"]))
        return Report("FinalizeReLU", ["site", "op", "action", "kept", "relus", "poly"], rows, totals, notes=notes)


def masked_units(model: nn.Module) -> dict[str, MaskedReLU | BinaryMaskedReLU]:  # PolyUnit included
    """The model's ReLU units keyed by site name (``"layer1.0.relu@1"``), in graph order.

    Example:
        >>> import torch.nn as nn, surgeon
        >>> s = surgeon.apply(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), LinearizeReLU(granularity="layer"))
        >>> list(masked_units(s.model))
        ['1']
    """
    return {getattr(m, "site_name", name): m for name, m in model.named_modules()
            if isinstance(m, (MaskedReLU, BinaryMaskedReLU, PolyUnit))}
