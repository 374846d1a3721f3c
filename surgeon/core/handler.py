"""The Pass protocol: a config dataclass plus a registered handler that plans, then rewrites.

A handler's ``plan`` finds the sites and changes nothing; ``rewrite`` changes the model and returns
it (graph passes return a new ``GraphModule``). ``plan`` receives the sites recorded in a recipe when
a surgery is replayed, and must then reproduce exactly those sites (or fail naming the first one
that is missing).

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

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.nn as nn

from surgeon.core.config import PassConfig
from surgeon.core.errors import ConfigError, RecipeError
from surgeon.fx.tracing import get_submodule, set_submodule
from surgeon.core.report import Report
from surgeon.core.selectors import select_sites
from surgeon.core.sites import Plan, Site

_HANDLERS: dict[type, "PassHandler"] = {}
_BY_NAME: dict[str, type] = {}


def register_pass(config_cls: type[PassConfig]):
    """Class decorator: register a handler class for ``config_cls`` (one handler per config type)."""

    def wrap(handler_cls: type["PassHandler"]) -> type["PassHandler"]:
        _HANDLERS[config_cls] = handler_cls()
        _BY_NAME[config_cls.pass_name] = config_cls
        return handler_cls

    return wrap


def handler_for(config: PassConfig) -> "PassHandler":
    """The handler registered for this config's type."""
    if not isinstance(config, PassConfig):
        raise ConfigError(
            f"{config!r} is not a pass; passes are PassConfig dataclasses such as LinearizeReLU(...)"
        )
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise ConfigError(
            f"no handler is registered for {type(config).__name__}; decorate one with @register_pass"
        ) from None


def config_class(pass_name: str) -> type[PassConfig]:
    """The config class registered under ``pass_name`` (as written in recipes)."""
    import surgeon.passes  # noqa: F401  - registers the built-in passes

    try:
        return _BY_NAME[pass_name]
    except KeyError:
        raise RecipeError(f"unknown pass {pass_name!r}; registered passes are {sorted(_BY_NAME)}") from None


@dataclass
class PassContext:
    """What a pass may use besides its config: example inputs and what earlier passes left."""

    example_inputs: tuple[Any, ...] | None = None
    recorded_sites: list[Site] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


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


class PassHandler:
    """Base handler. Subclasses implement ``plan`` and ``rewrite``; ``report`` is optional."""

    def plan(self, model: nn.Module, config: PassConfig, ctx: PassContext) -> Plan:
        raise NotImplementedError

    def rewrite(self, model: nn.Module, config: PassConfig, plan: Plan, ctx: PassContext) -> nn.Module:
        raise NotImplementedError

    def needs_recipe(self, config: PassConfig) -> str | None:
        """Why ``config``'s rewrite adds *trained* parameters (a reason string), else None.

        ``surgeon.backend`` refuses such a pass without ``recipe=DIR`` and loads the values from it.
        """
        return None

    def report(self, model: nn.Module, config: PassConfig, plan: Plan, ctx: PassContext) -> Report:
        rows = [{"site": s.name, "op": s.op, "shape": s.shape} for s in plan.sites]
        return Report(config.pass_name, ["site", "op", "shape"], rows, totals={"op": f"{len(rows)} sites"})


class ModuleSwapHandler(PassHandler):
    """Module-swap path: sites are modules found structurally; each is replaced by a new module.

    Subclasses define ``matches(module, fqn, config)`` and ``replacement(module, site, config, ctx)``.
    Configs may define ``targets`` / ``exclude`` / ``filter_fn`` (see ``surgeon.core.selectors``).
    """

    def matches(self, module: nn.Module, fqn: str, config: PassConfig) -> bool:
        raise NotImplementedError

    def replacement(self, module: nn.Module, site: Site, config: PassConfig, ctx: PassContext) -> nn.Module:
        raise NotImplementedError

    def plan(self, model: nn.Module, config: PassConfig, ctx: PassContext) -> Plan:
        found = [
            Site(name=fqn, base=fqn, kind="module", op=type(m).__name__, scope=fqn.rpartition(".")[0])
            for fqn, m in model.named_modules()
            if fqn and self.matches(m, fqn, config)
        ]
        if ctx.recorded_sites is not None:
            return Plan(match_recorded(found, ctx.recorded_sites, config.pass_name))
        sites = select_sites(
            found,
            getattr(config, "targets", None),
            getattr(config, "exclude", None),
            getattr(config, "filter_fn", None),
            resolve_module=lambda s: model.get_submodule(s.name),
            what=f"{config.pass_name} candidate module",
        )
        return Plan(sites)

    def rewrite(self, model: nn.Module, config: PassConfig, plan: Plan, ctx: PassContext) -> nn.Module:
        # build every replacement first, then swap: a failure while building changes nothing
        new = [self.replacement(get_submodule(model, s.name), s, config, ctx) for s in plan.sites]
        for site, module in zip(plan.sites, new):
            set_submodule(model, site.name, module)
        return model
