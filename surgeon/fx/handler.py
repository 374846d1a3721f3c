"""The FX graph template: trace, find call sites, choose, place units, rewrite every site, finish.

A pass supplies what differs: ``graph`` (how to get the GraphModule; default: trace with the config's
leaf policy), ``find`` (its sites), ``no_sites`` (the error text), and the per-site ``unit`` /
``rewrite_site``; ``prepare`` adds plan state (checks, unit placement with
:func:`surgeon.fx.placement.place_units`), ``finish`` runs after the last site. Selection and replay
(recorded sites) are :func:`surgeon.core.handler.choose_sites`.

Example:
    >>> from dataclasses import dataclass
    >>> import torch, torch.nn as nn, surgeon
    >>> from surgeon.core.sites import Site
    >>> @dataclass(kw_only=True)
    ... class TanhToHardtanh(surgeon.PassConfig):
    ...     targets: list[str] | None = None
    >>> @surgeon.register_pass(TanhToHardtanh)
    ... class TanhToHardtanhHandler(GraphHandler):
    ...     def find(self, gm, config, ctx):
    ...         return [Site(n.name, n.name, "fx", "tanh", node=n.name) for n in gm.graph.nodes
    ...                 if n.op == "call_function" and n.target is torch.tanh]
    ...     def rewrite_site(self, gm, node, site, unit, plan):
    ...         node.target = torch.nn.functional.hardtanh
    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> class Net(nn.Module):
    ...     def forward(self, x): return torch.tanh(x)
    >>> s = surgeon.apply(Net(), TanhToHardtanh())
    >>> s.model(torch.tensor([3.0]))
    tensor([1.])
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn

from surgeon.core.errors import PlanError
from surgeon.core.handler import PassContext, PassHandler, choose_sites
from surgeon.core.config import PassConfig
from surgeon.core.modules import find_submodule
from surgeon.core.sites import Plan, Site
from surgeon.fx import patterns
from surgeon.fx.tracing import finish_graph, trace

__all__ = ["GraphHandler"]


class GraphHandler(PassHandler):
    """Template for passes whose sites are call sites of an FX graph (see the module docstring)."""

    what = "call site"

    # -- what a pass supplies ------------------------------------------------------------------
    def graph(self, model: nn.Module, config: PassConfig, ctx: PassContext) -> fx.GraphModule:
        return trace(model, getattr(config, "leaf_modules", ()), getattr(config, "leaf_fn", None))

    def find(self, gm: fx.GraphModule, config: PassConfig, ctx: PassContext) -> list[Site]:
        raise NotImplementedError

    def no_sites(self, model: nn.Module, config: PassConfig) -> str:
        return f"{config.pass_name} found no {self.what} in {type(model).__name__}"

    def resolve(self, gm: fx.GraphModule, site: Site) -> nn.Module | None:
        """The module ``filter_fn(module, fqn)`` receives for a site (its scope by default)."""
        return find_submodule(gm, site.scope)

    def state(self, gm: fx.GraphModule, found: list[Site]) -> dict[str, Any]:
        """Plan state known as soon as the sites are found (also for an empty plan)."""
        return {}

    def prepare(self, gm: fx.GraphModule, found: list[Site], sites: list[Site], config: PassConfig,
                ctx: PassContext) -> dict[str, Any]:
        """Checks and unit placement after selection; returns extra plan state."""
        return {}

    def unit(self, site: Site, config: PassConfig, plan: Plan, ctx: PassContext) -> nn.Module | None:
        """The new module of a site (built for every site before the graph changes), or None."""
        return None

    def rewrite_site(self, gm: fx.GraphModule, node: fx.Node, site: Site, unit: nn.Module | None,
                     plan: Plan) -> None:
        raise NotImplementedError

    def finish(self, gm: fx.GraphModule, config: PassConfig, plan: Plan, ctx: PassContext) -> None:
        """After the last site, before the graph is linted and recompiled."""

    # -- the template ----------------------------------------------------------------------------
    def plan(self, model: nn.Module, config: PassConfig, ctx: PassContext) -> Plan:
        gm = self.graph(model, config, ctx)
        found = self.find(gm, config, ctx)
        state = {"gm": gm, **self.state(gm, found)}
        if not found:
            if ctx.allow_empty:
                return Plan([], state)
            raise PlanError(self.no_sites(model, config))
        sites = choose_sites(found, config, ctx, resolve_module=lambda s: self.resolve(gm, s), what=self.what)
        if ctx.sites_only:
            return Plan(sites, state)
        state.update(self.prepare(gm, found, sites, config, ctx))
        return Plan(sites, state)

    def rewrite(self, model: nn.Module, config: PassConfig, plan: Plan, ctx: PassContext) -> nn.Module:
        gm: fx.GraphModule = plan.state["gm"]
        nodes = {n.name: n for n in gm.graph.nodes}
        units = [self.unit(site, config, plan, ctx) for site in plan.sites]  # a failure here changes nothing
        for site, unit in zip(plan.sites, units):
            self.rewrite_site(gm, nodes[site.node], site, unit, plan)
        self.finish(gm, config, plan, ctx)
        traced = patterns.graph_source(gm) == "symbolic_trace"  # captured graphs keep their shape metadata
        return finish_graph(gm, ctx.example_inputs if traced else None)

    def touched(self, model: nn.Module, config: PassConfig, plan: Plan) -> list[str] | None:
        return []  # new units and graph edits; no existing tensor is changed in place
