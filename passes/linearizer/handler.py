"""``LinearizerSandwich``: replace layers or blocks by a Linearizer ``g_y⁻¹(A g_x(x))`` fitted to them.

Two kinds of site:

* **Exact sandwiches** (no data, no training): a ``Linear``/``Conv`` whose only user is a bijective
  activation φ (LeakyReLU, PReLU with positive slopes, ELU, tanh, sigmoid, softplus) *is* the
  Linearizer ``L{id, Bias(b)∘φ⁻¹, W}``. ``mode="exact"`` (or ``"auto"`` without targets) finds every
  such pair in the FX graph; a targeted module that is such a pair (``nn.Sequential(Linear, Tanh)``)
  is converted the same way.
* **Fitted sandwiches** (``targets`` = modules, ``calibration`` = batches): the module's inputs and
  outputs are recorded; ``g_x``/``g_y`` start as the exact per-feature standardisations (ActNorm)
  followed by identity couplings; ``A`` is the closed-form ridge least-squares fit in float64 in g
  coordinates and its held-out R² is the layer's linearity score. At ``R² ≥ threshold`` a plain
  linear map replaces the module (``nn.Linear`` with the affine parts folded in); below it the
  couplings are trained by distillation (output + latent loss) while ``A`` is re-solved in closed form
  every ``resolve_every`` steps (variable projection), and the fit error before/after is reported.

Replay (``surgeon.restore``) rebuilds the recorded structure without calibration data; the fitted
parameters come from the saved safetensors.

Example:
    >>> import torch, torch.nn as nn, surgeon
    >>> from surgeon.passes import LinearizerSandwich
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2), nn.Softplus())
    >>> s = surgeon.apply(net, LinearizerSandwich(mode="exact"))
    >>> [(r["site"], r["kind"]) for r in s.report["LinearizerSandwich"].rows]
    [('0', 'exact:tanh'), ('2', 'exact:softplus')]
    >>> x = torch.randn(5, 4); bool((s.model(x) - net(x)).abs().max() < 1e-6)
    True
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from surgeon.core.errors import ConfigError, PlanError
from surgeon.core.handler import PassContext, PassHandler, choose_sites, register_pass
from surgeon.core.modules import get_submodule, set_submodule
from surgeon.core.report import Report
from surgeon.core.sites import Plan, Site
from surgeon.fx.tracing import finish_graph, trace
from surgeon.ops.linearizer import Linearizer
from surgeon.passes.linearizer.config import Calibration, LinearizerSandwich
from surgeon.passes.linearizer.exact import exact_linearizer, exact_pairs, module_exact_pattern
from surgeon.passes.linearizer.fit import FitResult, build_recorded, fit_site, r2_score, record_io, ridge_solve

@register_pass(LinearizerSandwich)
class LinearizerSandwichHandler(PassHandler):
    def plan(self, model: nn.Module, config: LinearizerSandwich, ctx: PassContext) -> Plan:
        use_graph = config.mode == "exact" or (config.mode == "auto" and config.targets is None)
        if ctx.recorded_sites is not None:
            use_graph = bool(ctx.recorded_sites) and ctx.recorded_sites[0].kind == "fx"
        if use_graph:
            return self._plan_graph(model, config, ctx)
        return self._plan_modules(model, config, ctx)

    # -- FX path: exact pairs ----------------------------------------------------------------
    def _plan_graph(self, model: nn.Module, config: LinearizerSandwich, ctx: PassContext) -> Plan:
        gm = trace(model, config.leaf_modules, config.leaf_fn)
        found = exact_pairs(gm)
        if not found and ctx.recorded_sites is None:
            raise PlanError(
                f"LinearizerSandwich found no exact sandwich (Linear/Conv whose only user is a LeakyReLU, PReLU "
                f"with positive slopes, ELU, tanh, sigmoid or softplus) in {type(model).__name__}; to fit other "
                f"layers pass targets=[module names] and calibration=batches")
        sites = choose_sites(found, config, ctx, resolve_module=lambda s: get_submodule(gm, s.name),
                             what="exact sandwich")
        built = {}
        for s in sites:
            built[s.name] = exact_linearizer(gm.get_submodule(s.name), s.data["act"], s.data["act_params"], gm)
        return Plan(sites, {"gm": gm, "built": built})

    # -- module path: targeted modules ---------------------------------------------------------
    def _plan_modules(self, model: nn.Module, config: LinearizerSandwich, ctx: PassContext) -> Plan:
        found = [Site(name=fqn, base=fqn, kind="module", op=type(m).__name__, scope=fqn.rpartition(".")[0])
                 for fqn, m in model.named_modules() if fqn]
        if ctx.recorded_sites is None and config.targets is None and config.filter_fn is None:
            raise ConfigError("LinearizerSandwich(mode='fit') needs targets=[module names] (the layers or blocks to "
                              "replace)")
        sites = choose_sites(found, config, ctx, resolve_module=lambda s: get_submodule(model, s.name), what="module")
        if ctx.recorded_sites is not None:
            return Plan(sites, {"built": {s.name: self._replay_site(model, s, config) for s in sites}})
        names = {s.name for s in sites}
        # a module inside another selected module goes with it (suffix targets like "1" also match "1.1")
        sites = [s for s in sites if not any(s.name.startswith(o + ".") for o in names if o != s.name)]
        built: dict[str, nn.Module] = {}
        results: dict[str, FitResult] = {}
        to_fit = []
        for s in sites:
            module = get_submodule(model, s.name)
            pattern = module_exact_pattern(module) if config.mode != "fit" else None
            if pattern is not None:
                kind, params, layer_path = pattern
                root = module
                built[s.name] = exact_linearizer(get_submodule(module, layer_path), kind, params, root)
                s.data = {"decision": "exact", "act": kind, "act_params": params, "layer": layer_path}
            else:
                to_fit.append(s)
        if to_fit:
            if config.calibration is None:
                raise ConfigError(f"LinearizerSandwich needs calibration=batches to fit {[s.name for s in to_fit]} "
                                  f"(they are not exact Linear/Conv + bijective activation pairs)")
            io = record_io(model, [s.name for s in to_fit], config.calibration)
            for s in to_fit:
                xs, ys = io[s.name]
                if not xs:
                    raise PlanError(f"site {s.name!r} was never called on the calibration data")
                try:
                    x, y = torch.cat(xs), torch.cat(ys)
                except RuntimeError as e:
                    raise PlanError(f"site {s.name!r}: calibration batches give different shapes ({e})") from e
                res = fit_site(s.name, x, y, config)
                results[s.name] = res
                built[s.name] = res.module
                lin = res.module
                s.shape = list(y.shape)
                s.data = {"decision": res.decision, "in": int(getattr(lin, "in_features")),
                          "out": int(getattr(lin, "out_features"))}
                if isinstance(lin, Linearizer):
                    s.data.update({"A_shape": list(lin.A.shape), "conv": lin.conv, "dim": lin.dim,
                                   "block_dim": lin.g_x.blocks[0].dim, "couplings": config.couplings,
                                   "hidden": config.hidden, "clamp": config.clamp})
        return Plan(sites, {"built": built, "results": results})

    def _replay_site(self, model: nn.Module, s: Site, config: LinearizerSandwich) -> nn.Module:
        if s.data.get("decision") == "exact":
            module = get_submodule(model, s.name)
            return exact_linearizer(get_submodule(module, s.data["layer"]), s.data["act"], s.data["act_params"], module)
        return build_recorded(s, config)

    def rewrite(self, model: nn.Module, config: LinearizerSandwich, plan: Plan, ctx: PassContext) -> nn.Module:
        built = plan.state["built"]
        if "gm" not in plan.state:
            for s in plan.sites:
                set_submodule(model, s.name, built[s.name])
            return model
        gm: fx.GraphModule = plan.state["gm"]
        nodes = {n.name: n for n in gm.graph.nodes}
        for s in plan.sites:
            set_submodule(gm, s.name, built[s.name])
            act = nodes[s.data["act_node"]]
            act.replace_all_uses_with(nodes[s.node])
            gm.graph.erase_node(act)
        return finish_graph(gm, ctx.example_inputs)

    def touched(self, model: nn.Module, config: LinearizerSandwich, plan: Plan) -> list[str]:
        return []  # new Linearizer modules replace the sites; no existing tensor changes in place

    def report(self, model: nn.Module, config: LinearizerSandwich, plan: Plan, ctx: PassContext) -> Report:
        results: dict[str, FitResult] = plan.state.get("results", {})
        rows = []
        for s in plan.sites:
            r = results.get(s.name)
            kind = f"exact:{s.data['act']}" if s.data.get("decision") == "exact" else s.data.get("decision")
            row = {"site": s.name, "kind": kind}
            if r is not None:
                row.update({"r2": r.r2, "r2_output": r.r2_output, "err_before": r.err_before,
                            "err_after": r.err_after, "r2_after": r.r2_after, "cond": r.condition,
                            "rows": r.rows, "params": r.params})
            rows.append(row)
        notes = ["r2: held-out R² of the closed-form A in g coordinates at the linear start (the linearity score); "
                 f"linear if r2 >= {config.threshold}, else couplings distilled (err: held-out relative MSE of the "
                 "output, before/after)"] if results else ["exact: Linear/Conv + bijective activation = L{id, "
                                                           "Bias∘φ⁻¹, W}, no data, no training"]
        cols = ["site", "kind"] + (["r2", "r2_output", "err_before", "err_after", "r2_after", "cond", "rows", "params"]
                                   if results else [])
        return Report("LinearizerSandwich", cols, rows, notes=notes)


__all__ = ["LinearizerSandwich", "exact_linearizer", "exact_pairs", "fit_site", "ridge_solve", "r2_score",
           "record_io", "FitResult"]
