"""The Pass protocol: a config dataclass plus a registered handler that plans, then rewrites.

A handler's ``plan`` finds the sites and changes nothing; ``rewrite`` changes the model and returns
it (graph passes return a new ``GraphModule``). ``plan`` receives the sites recorded in a recipe when
a surgery is replayed, and must then reproduce exactly those sites (or fail naming the first one
that is missing): :func:`choose_sites` does that, or selects by ``targets`` / ``exclude`` /
``filter_fn`` otherwise.

Two templates own the common loop, so a pass supplies only what differs:
:class:`ModuleSwapHandler` (sites are modules, each replaced by a new one) here, and
:class:`surgeon.fx.handler.GraphHandler` (sites are call sites of a traced graph).

Example:
    >>> from dataclasses import dataclass
    >>> import torch.nn as nn
    >>> @dataclass(kw_only=True)
    ... class DropDropout(PassConfig):
    ...     pass
    >>> @register_pass(DropDropout)
    ... class DropDropoutHandler(ModuleSwapHandler):
    ...     def matches(self, module, fqn, config): return isinstance(module, nn.Dropout)
    ...     def replacement(self, module, site, config, ctx): return nn.Identity()
    >>> handler_for(DropDropout()).__class__.__name__
    'DropDropoutHandler'
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch.nn as nn

from surgeon.core.config import PassConfig
from surgeon.core.errors import RecipeError
from surgeon.core.modules import get_submodule, set_submodule
from surgeon.core.registry import config_class, handler_for, register_pass
from surgeon.core.report import Report
from surgeon.core.selectors import select_sites
from surgeon.core.sites import Plan, Site

__all__ = ["PassContext", "PassHandler", "ModuleSwapHandler", "choose_sites", "match_recorded",
           "register_pass", "handler_for", "config_class"]


@dataclass
class PassContext:
    """What a pass may use besides its config.

    Attributes:
        example_inputs: inputs to size things from shapes (``surgeon.apply(..., example_inputs=)``).
        recorded_sites: the sites a recipe recorded (replay): plan exactly these.
        allow_empty: a model without a site plans ``Plan([])`` instead of raising (compile backends
            see graphs without any site).
        name_offsets: per site base, the calls counted in earlier graphs (a backend's graphs before a
            graph break): ``base@k`` numbering continues there.
        from_recipe: parameters come from a recipe: skip checks that need the whole model (budgets).
        sites_only: a dry run that only asks which sites exist (shape checks may be skipped).
    """

    example_inputs: tuple[Any, ...] | None = None
    recorded_sites: list[Site] | None = None
    allow_empty: bool = False
    name_offsets: Mapping[str, int] | None = None
    from_recipe: bool = False
    sites_only: bool = False


def match_recorded(found: Sequence[Site], recorded: Sequence[Site], pass_name: str) -> list[Site]:
    """Pick ``found`` sites in the order of ``recorded``; name the first recorded site that is missing."""
    by_name = {s.name: s for s in found}
    chosen = []
    for r in recorded:
        site = by_name.get(r.name)
        if site is None:
            raise RecipeError(
                f"{pass_name}: recorded site {r.name!r} does not exist in this model "
                f"(it has {sorted(by_name)[:30]}); was the recipe made on another base model?"
            )
        if site.op != r.op:
            raise RecipeError(f"{pass_name}: site {r.name!r} is a {site.op!r} here but {r.op!r} in the recipe")
        site.data = {**site.data, **r.data}
        chosen.append(site)
    return chosen


def choose_sites(found: Sequence[Site], config: PassConfig, ctx: PassContext, *,
                 resolve_module: Callable[[Site], nn.Module | None], what: str,
                 narrow: Callable[[list[Site]], list[Site]] | None = None) -> list[Site]:
    """The recorded sites when replaying a recipe, else the sites ``config`` selects.

    Selection applies ``narrow`` first (a pass's own choice, e.g. layer indices), then the config's
    ``targets`` / ``exclude`` / ``filter_fn`` (see :mod:`surgeon.core.selectors`).

    Example:
        >>> from surgeon.core.config import PassConfig
        >>> found = [Site("a", "a", "module", "Linear"), Site("b", "b", "module", "Linear")]
        >>> [s.name for s in choose_sites(found, PassConfig(), PassContext(recorded_sites=[found[1]]),
        ...                               resolve_module=lambda s: None, what="module")]
        ['b']
    """
    if ctx.recorded_sites is not None:
        return match_recorded(found, ctx.recorded_sites, config.pass_name)
    candidates = narrow(list(found)) if narrow is not None else list(found)
    return select_sites(candidates, getattr(config, "targets", None), getattr(config, "exclude", None),
                        getattr(config, "filter_fn", None), resolve_module=resolve_module, what=what)


class PassHandler:
    """Base handler. Subclasses implement ``plan`` and ``rewrite``; ``report`` is optional."""

    def plan(self, model: nn.Module, config: PassConfig, ctx: PassContext) -> Plan:
        raise NotImplementedError

    def rewrite(self, model: nn.Module, config: PassConfig, plan: Plan, ctx: PassContext) -> nn.Module:
        raise NotImplementedError

    def touched(self, model: nn.Module, config: PassConfig, plan: Plan) -> list[str] | None:
        """Module paths whose tensors ``rewrite`` changes in place (``None``: any, snapshot all values).

        ``surgeon.apply(inplace=True)`` copies the values of these modules' tensors before the rewrite
        and only the structure of the rest, so a failure rolls back exactly at a fraction of the
        memory; an undeclared in-place change is reported by the rollback, never ignored. Module
        swaps (every site a module) change no existing tensor: ``[]``. Other sites: ``None``.
        """
        return [] if all(s.kind == "module" for s in plan.sites) else None

    def live_config(self, model: nn.Module, config: PassConfig, sites: list[Site]) -> PassConfig:
        """``config`` as the live ``model`` now stands, for settings a user may change after apply (e.g.
        memory slots set on a distilled model); ``surgeon.save`` and ``to_hf`` record it. Default: unchanged."""
        return config

    def needs_recipe(self, config: PassConfig) -> str | None:
        """Why ``config``'s rewrite adds *trained* parameters (a reason string), else None.

        ``surgeon.backend`` refuses such a pass without ``recipe=DIR`` and loads the values from it.
        """
        return None

    def report(self, model: nn.Module, config: PassConfig, plan: Plan, ctx: PassContext) -> Report:
        rows = [{"site": s.name, "op": s.op, "shape": s.shape} for s in plan.sites]
        return Report(config.pass_name, ["site", "op", "shape"], rows, totals={"op": f"{len(rows)} sites"})


class ModuleSwapHandler(PassHandler):
    """Module-swap template: sites are modules found structurally; each is replaced by a new module.

    Subclasses define ``matches(module, fqn, config)`` and ``replacement(module, site, config, ctx)``;
    they may override ``candidates`` (how sites are found), ``narrow`` (a pass's own selection before
    ``targets``), ``prepare`` (plan state) and ``build`` (a replacement that needs the plan). Configs
    may define ``targets`` / ``exclude`` / ``filter_fn`` (see ``surgeon.core.selectors``).
    """

    what = "candidate module"

    def matches(self, module: nn.Module, fqn: str, config: PassConfig) -> bool:
        raise NotImplementedError

    def replacement(self, module: nn.Module, site: Site, config: PassConfig, ctx: PassContext) -> nn.Module:
        raise NotImplementedError

    def candidates(self, model: nn.Module, config: PassConfig, ctx: PassContext) -> list[Site]:
        return [Site(name=fqn, base=fqn, kind="module", op=type(m).__name__, scope=fqn.rpartition(".")[0])
                for fqn, m in model.named_modules() if fqn and self.matches(m, fqn, config)]

    def narrow(self, sites: list[Site], config: PassConfig) -> list[Site]:
        return sites

    def prepare(self, model: nn.Module, sites: list[Site], config: PassConfig, ctx: PassContext) -> dict[str, Any]:
        return {}

    def build(self, model: nn.Module, site: Site, config: PassConfig, plan: Plan, ctx: PassContext) -> nn.Module:
        return self.replacement(get_submodule(model, site.name), site, config, ctx)

    def plan(self, model: nn.Module, config: PassConfig, ctx: PassContext) -> Plan:
        found = self.candidates(model, config, ctx)
        sites = choose_sites(found, config, ctx, resolve_module=lambda s: get_submodule(model, s.name),
                             what=f"{config.pass_name} {self.what}", narrow=lambda s: self.narrow(s, config))
        return Plan(sites, self.prepare(model, sites, config, ctx))

    def rewrite(self, model: nn.Module, config: PassConfig, plan: Plan, ctx: PassContext) -> nn.Module:
        # build every replacement first, then swap: a failure while building changes nothing
        new = [self.build(model, s, config, plan, ctx) for s in plan.sites]
        for site, module in zip(plan.sites, new):
            set_submodule(model, site.name, module)
        return model
