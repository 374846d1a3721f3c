"""The pass framework's own contracts: unique pass names, typed context, snapshots of what a pass touches."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.core.handler import ModuleSwapHandler, PassContext, PassHandler, choose_sites
from surgeon.core.sites import Plan, Site
from surgeon.core.transaction import ModelSnapshot


@dataclass(kw_only=True)
class SwapLinears(surgeon.PassConfig):
    fail_after: int | None = None     # raise after this many sites were swapped
    targets: list[str] | None = None


@surgeon.register_pass(SwapLinears)
class SwapLinearsHandler(ModuleSwapHandler):
    def matches(self, module, fqn, config):
        return isinstance(module, nn.Linear)

    def replacement(self, module, site, config, ctx):
        new = nn.Linear(module.in_features, module.out_features)
        with torch.no_grad():
            new.weight.copy_(module.weight * 2)
            new.bias.copy_(module.bias)
        return new

    def rewrite(self, model, config, plan, ctx):
        if config.fail_after is None:
            return super().rewrite(model, config, plan, ctx)
        for i, site in enumerate(plan.sites):
            if i == config.fail_after:
                raise RuntimeError("injected")
            model.get_submodule(site.name.rpartition(".")[0] or "")._modules[site.name.rpartition(".")[2]] = \
                self.replacement(model.get_submodule(site.name), site, config, ctx)
        return model


@dataclass(kw_only=True)
class ScaleInPlace(surgeon.PassConfig):
    declare: bool = True


@surgeon.register_pass(ScaleInPlace)
class ScaleInPlaceHandler(PassHandler):
    """Edits the first Linear's weight in place, then fails."""

    def plan(self, model, config, ctx):
        return Plan([Site("0", "0", "module", "Linear")])

    def touched(self, model, config, plan):
        return ["0"] if config.declare else []

    def rewrite(self, model, config, plan, ctx):
        with torch.no_grad():
            model[0].weight.mul_(3.0)
        raise RuntimeError("after an in-place edit")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_a_second_class_under_a_registered_pass_name_is_refused():
    @dataclass(kw_only=True)
    class Impostor(surgeon.PassConfig):
        pass_name = "SwapLinears"

    with pytest.raises(surgeon.ConfigError, match="already registered"):
        surgeon.register_pass(Impostor)(SwapLinearsHandler)
    assert surgeon.core.registry.config_class("SwapLinears") is SwapLinears


def test_context_is_typed():
    ctx = PassContext(allow_empty=True, name_offsets={"relu": 2}, from_recipe=True, sites_only=True)
    assert (ctx.allow_empty, ctx.name_offsets["relu"], ctx.from_recipe, ctx.sites_only) == (True, 2, True, True)
    with pytest.raises(TypeError):
        PassContext(notes={"allow_empty": True})


def test_choose_sites_replays_recorded_sites_else_selects():
    found = [Site("a", "a", "module", "Linear"), Site("b", "b", "module", "Linear")]
    chosen = choose_sites(found, SwapLinears(targets=["a"]), PassContext(), resolve_module=lambda s: None, what="x")
    assert [s.name for s in chosen] == ["a"]
    replay = choose_sites(found, SwapLinears(targets=["a"]), PassContext(recorded_sites=[Site("b", "b", "module", "Linear")]),
                          resolve_module=lambda s: None, what="x")
    assert [s.name for s in replay] == ["b"]
    with pytest.raises(surgeon.RecipeError, match="'c' does not exist"):
        choose_sites(found, SwapLinears(), PassContext(recorded_sites=[Site("c", "c", "module", "Linear")]),
                     resolve_module=lambda s: None, what="x")


def test_module_swap_snapshot_copies_no_values_and_rolls_back_exactly():
    net = _net()
    x = torch.randn(3, 4)
    out, state, ids = net(x), {k: v.clone() for k, v in net.state_dict().items()}, [id(m) for m in net]
    assert ModelSnapshot(net, touched=[]).copied_bytes == 0
    with pytest.raises(surgeon.RewriteError, match="injected"):
        surgeon.apply(net, SwapLinears(fail_after=1), inplace=True)
    assert [id(m) for m in net] == ids and torch.equal(net(x), out)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    s = surgeon.apply(net, SwapLinears(), inplace=True)
    assert not torch.equal(s.model(x), out)


def test_a_declared_in_place_edit_is_undone_and_an_undeclared_one_is_reported():
    net = _net()
    w = net[0].weight.detach().clone()
    with pytest.raises(surgeon.RewriteError, match="after an in-place edit"):
        surgeon.apply(net, ScaleInPlace(declare=True), inplace=True)
    assert torch.equal(net[0].weight, w)
    with pytest.raises(surgeon.RewriteError, match=r"could not restore \['0.weight'\]"):
        surgeon.apply(net, ScaleInPlace(declare=False), inplace=True)
