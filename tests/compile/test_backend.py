"""surgeon.backend / surgeon.compile: rewrite captured graphs, report, recipes, bad input."""
from __future__ import annotations

import copy
import json
import time

import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.ops.activation import MaskedReLU
from surgeon.passes import FinalizeReLU, LinearizeReLU, masked_units, search_relu_budget, BudgetSearchConfig

from compile_models import BreakNet, NoReLU, TinyResNet, seeded

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _resnet(seed: int = 0) -> nn.Module:
    return seeded(TinyResNet(), seed)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _perturbed_recipe(tmp_path, model: nn.Module, x: torch.Tensor, finalize: bool = False):
    """An eager surgery with masks that are not the identity, saved; returns (dir, restored model)."""
    s = surgeon.apply(model, LinearizeReLU(granularity="channel"), example_inputs=(x,))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for unit in masked_units(s.model).values():
            m = torch.rand(unit.mask.shape, generator=g)
            unit.mask.copy_(torch.where(m < 0.4, torch.zeros_like(m), m))
    if finalize:
        s = surgeon.apply(s, FinalizeReLU())
    out = tmp_path / "recipe"
    surgeon.save(s, out)
    return out, surgeon.restore(model, out)


def test_eager_backend_end_to_end_with_recompiles() -> None:
    model = _resnet()
    ref = surgeon.apply(model, LinearizeReLU(granularity="channel", init=0.0),
                        example_inputs=(torch.randn(2, 3, 6, 6),)).model
    before = _state(model)
    compiled = surgeon.compile(model, LinearizeReLU(granularity="channel", init=0.0), then="eager", dynamic=False)
    errors = []
    for batch in (2, 3, 5):   # dynamic=False: every new batch size recompiles
        x = torch.randn(batch, 3, 6, 6)
        with torch.no_grad():
            errors.append((compiled(x) - ref(x)).abs().max().item())
            assert (model(x) - ref(x)).abs().max() > 1e-3   # the surgery changes the output
    assert max(errors) <= 1e-5, errors
    report = compiled.surgeon_backend.report
    assert [g.changed for g in report.graphs] == [6, 6, 6]
    assert report.graphs[0].sites["LinearizeReLU"] == [
        "stem.2", "layer1.0.relu", "layer1.0.relu@1", "layer1.1.relu", "layer1.1.relu@1", "relu"]
    assert report.recompilations == 2 and [g.recompile for g in report.graphs] == [0, 1, 2]
    assert _same_state(_state(model), before)   # the model itself was not changed
    d = json.loads(json.dumps(report.to_dict()))
    assert d["recompilations"] == 2 and d["changed"] == 18
    text = str(report)
    assert "surgeon.backend: graphs" in text and "recompilations: 2" in text


def test_inductor_backend_matches_eager_surgery() -> None:
    """Inductor (C++ on CPU) runs the rewritten graph; two shapes, dynamic=False (~25 s on 2 cores)."""
    model = _resnet()
    ref = surgeon.apply(model, LinearizeReLU(granularity="layer", init=0.0)).model
    compiled = surgeon.compile(model, LinearizeReLU(granularity="layer", init=0.0), then="inductor", dynamic=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, 3, 6, 6)
            assert (compiled(x) - ref(x)).abs().max().item() <= 1e-5
    report = compiled.surgeon_backend.report
    assert report.recompilations == 1 and [g.changed for g in report.graphs] == [6, 6]
    print(f"inductor: 2 compiles in {time.perf_counter() - t0:.1f} s")


def test_inductor_backend_small_mlp() -> None:
    """The fast inductor check: a tiny MLP with masks from a recipe-free identity surgery."""
    net = seeded(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 2)))
    ref = surgeon.apply(net, LinearizeReLU(granularity="layer", init=0.0)).model
    compiled = surgeon.compile(net, LinearizeReLU(granularity="layer", init=0.0), then="inductor")
    with torch.no_grad():
        x = torch.randn(3, 4)
        err = (compiled(x) - ref(x)).abs().max().item()
        assert (net(x) - ref(x)).abs().max() > 1e-3
    assert err <= 1e-5
    assert compiled.surgeon_backend.report.graphs[0].sites == {"LinearizeReLU": ["1", "3"]}


@pytest.mark.parametrize("finalize", [False, True])
def test_recipe_parameters_match_restored_model(tmp_path, finalize: bool) -> None:
    model = _resnet()
    x = torch.randn(2, 3, 6, 6)
    directory, restored = _perturbed_recipe(tmp_path, model, x, finalize)
    compiled = surgeon.compile(_resnet(), recipe=directory, then="eager", dynamic=False)  # passes from the recipe
    with torch.no_grad():
        for batch in (2, 4):
            xb = torch.randn(batch, 3, 6, 6)
            ref = restored(xb)
            assert (ref - model(xb)).abs().max() > 1e-3
            assert (compiled(xb) - ref).abs().max().item() <= 1e-5
    g = compiled.surgeon_backend.report.graphs[0]
    assert g.loaded > 0 and g.sites["LinearizeReLU"][0] == "stem.2"
    if finalize:
        assert "FinalizeReLU" in g.sites


def test_budget_recipe_trained_masks(tmp_path) -> None:
    """A budget search's masks (needs_recipe) reach the compiled graph through the recipe."""
    torch.manual_seed(0)
    net = seeded(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)))
    x = torch.randn(64, 4)
    y = torch.randint(0, 3, (64,))
    s = surgeon.apply(net, LinearizeReLU(granularity="channel", budget=0.25), example_inputs=x[:2])
    search_relu_budget(s, [(x, y)], method="calibration", config=BudgetSearchConfig(finetune_epochs=1))
    surgeon.save(s, tmp_path / "budget")
    restored = surgeon.restore(net, tmp_path / "budget")
    compiled = surgeon.compile(net, LinearizeReLU(granularity="channel", budget=0.25),
                               recipe=tmp_path / "budget", then="eager")
    before = _state(net)
    with torch.no_grad():
        err = (compiled(x[:7]) - restored(x[:7])).abs().max().item()
        assert (restored(x[:7]) - net(x[:7])).abs().max() > 1e-3  # masks and fine-tuned weights matter
    assert err <= 1e-5
    assert _same_state(_state(net), before)  # the recipe's weights went into a copy
    assert compiled.surgeon_backend.report.graphs[0].loaded >= 2


def test_pass_needing_recipe_without_one_changes_nothing() -> None:
    model = _resnet()
    before = _state(model)
    for make in (lambda: surgeon.compile(model, LinearizeReLU(granularity="channel", budget=0.5)),
                 lambda: surgeon.backend(LinearizeReLU(units="poly"), model=model)):
        with pytest.raises(surgeon.ConfigError) as e:
            make()
        msg = str(e.value)
        assert "LinearizeReLU" in msg and "recipe=DIR" in msg and "'layer1.0.relu@1'" in msg
    with pytest.raises(surgeon.ConfigError, match="every site it rewrites"):
        surgeon.backend(LinearizeReLU(budget=10))
    assert _same_state(_state(model), before)
    assert not any(isinstance(m, MaskedReLU) for m in model.modules())


def test_recipe_from_another_model_is_refused(tmp_path) -> None:
    directory, _ = _perturbed_recipe(tmp_path, _resnet(), torch.randn(2, 3, 6, 6))
    with pytest.raises(surgeon.RecipeError, match="does not fit this model"):
        surgeon.compile(NoReLU(), recipe=directory)


def test_graph_without_matches_reports_zero() -> None:
    model = NoReLU()
    compiled = surgeon.compile(model, LinearizeReLU(granularity="layer"), then="eager")
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    report = compiled.surgeon_backend.report
    assert len(report.graphs) == 1
    assert report.graphs[0].sites == {"LinearizeReLU": []} and report.changed == 0
    assert "LinearizeReLU" in str(report)


def test_graph_breaks_listed_and_names_continue() -> None:
    model = seeded(BreakNet())
    ref = surgeon.apply(model, LinearizeReLU(granularity="layer", init=0.0)).model
    eager_names = [r["site"] for r in surgeon.apply(model, LinearizeReLU(granularity="layer")).report["LinearizeReLU"].rows]
    compiled = surgeon.compile(model, LinearizeReLU(granularity="layer", init=0.0), then="eager")
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert (compiled(x) - ref(x)).abs().max().item() <= 1e-5
    report = compiled.surgeon_backend.report
    # dynamo: BreakNet.forward up to the block, BreakBlock.forward up to the break, its resume, BreakNet's resume
    assert len(report.graphs) == 4
    assert [g.changed for g in report.graphs] == [1, 1, 2, 0]
    names = [n for g in report.graphs for n in g.sites["LinearizeReLU"]]
    assert sorted(names) == sorted(eager_names) == sorted(["relu", "block.relu", "block.relu@1", "block.relu@2"])
    assert sum(report.graph_breaks.values()) >= 1
    assert any("graph_break" in r or "graph break" in r.lower() for r in report.graph_breaks), report.graph_breaks
    assert "graph breaks" in str(report)
    where = compiled.surgeon_backend.explain(model, x)
    assert len(where) >= 1 and any("compile_models.py" in w for w in where), where


def test_recompilation_loop_is_detected_and_warned() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    compiled = surgeon.compile(net, LinearizeReLU(granularity="layer"), then="eager", dynamic=False,
                               recompile_warn=3)
    with pytest.warns(surgeon.RecompilationWarning, match="compiled 4 times"):
        for batch in range(1, 6):
            compiled(torch.randn(batch, 4))
    report = compiled.surgeon_backend.report
    assert report.recompilations == 4 and report.recompiles_per_frame == {0: 4}
    assert any("dynamic=True" in w for w in report.warnings)


def test_bad_then_backend() -> None:
    with pytest.raises(surgeon.ConfigError, match="not a torch.compile backend"):
        surgeon.backend(LinearizeReLU(), then="no-such-backend")


def test_sites_dynamo_runs_eagerly_are_reported_as_missed() -> None:
    """A graph break inside a loop (nn.Sequential.forward) makes dynamo run that frame eagerly."""
    from compile_models import BreakBlock

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), BreakBlock()).eval()
    compiled = surgeon.compile(model, LinearizeReLU(granularity="layer", init=0.0), then="eager")
    ref = surgeon.apply(model, LinearizeReLU(granularity="layer", init=0.0)).model
    x = torch.randn(2, 4)
    with torch.no_grad():
        err = (compiled(x) - ref(x)).abs().max().item()
    report = compiled.surgeon_backend.report
    assert report.missed == {"LinearizeReLU": ["1"]}
    assert err > 1e-4          # the missed ReLU really ran unrewritten: the report is the only signal
    assert any("NOT rewritten" in w for w in report.warnings) and "NOT rewritten" in str(report)


def test_dynamic_shapes_one_graph_no_recompiles() -> None:
    """dynamic=True: symbolic sizes (and ReLU6 bounds passed as graph values) still match; one graph."""
    model = _resnet()
    ref = surgeon.apply(model, LinearizeReLU(granularity="channel", init=0.0),
                        example_inputs=(torch.randn(2, 3, 6, 6),)).model
    compiled = surgeon.compile(model, LinearizeReLU(granularity="channel", init=0.0), then="eager", dynamic=True)
    with torch.no_grad():
        for batch, hw in ((2, 6), (3, 7), (5, 9)):
            x = torch.randn(batch, 3, hw, hw)
            assert (compiled(x) - ref(x)).abs().max().item() <= 1e-5
    report = compiled.surgeon_backend.report
    assert len(report.graphs) == 1 and report.recompilations == 0 and report.changed == 6
    assert report.missed == {}


def test_recipe_weights_guarded(tmp_path) -> None:
    """Fine-tuned base weights: the bare backend refuses a model without them; folded recipes are refused."""
    torch.manual_seed(0)
    net = seeded(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    s = surgeon.apply(net, LinearizeReLU(granularity="layer"))
    with torch.no_grad():
        s.model.get_submodule("0").weight.add_(0.5)          # "fine-tuned"
    surgeon.save(s, tmp_path / "ft")
    be = surgeon.backend(recipe=tmp_path / "ft", then="eager")
    with pytest.raises(Exception, match="other values than the recipe"):
        torch.compile(net, backend=be)(torch.randn(2, 4))
    fixed = surgeon.compile.backend.with_recipe_weights(net, tmp_path / "ft")
    out = torch.compile(fixed, backend=surgeon.backend(recipe=tmp_path / "ft", then="eager"))(torch.ones(2, 4))
    torch.testing.assert_close(out, s.model(torch.ones(2, 4)), atol=1e-6, rtol=1e-6)

    cnn = _resnet()
    x = torch.randn(2, 3, 6, 6)
    f = surgeon.apply(cnn, LinearizeReLU(granularity="channel"), example_inputs=(x,))
    f = surgeon.apply(f, FinalizeReLU(fold=True))
    surgeon.save(f, tmp_path / "fold")
    with pytest.raises(surgeon.RecipeError, match="surgeon.restore"):
        surgeon.compile(cnn, recipe=tmp_path / "fold")


def test_recompile_limit_fallback_is_reported() -> None:
    """Past dynamo's recompile_limit the frame runs eagerly, without surgery: the report says so."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torch._dynamo.config.patch(recompile_limit=2):
        compiled = surgeon.compile(net, LinearizeReLU(granularity="layer", init=0.0), then="eager",
                                   dynamic=False, recompile_warn=10)
        outs = [compiled(torch.randn(b, 4) - 5.0) for b in (1, 2, 3, 4)]
    report = compiled.surgeon_backend.report
    assert len(report.graphs) == 2 and report.recompilations == 1
    assert report.recompile_limit_hits >= 1
    assert "without the surgery" in str(report)
    assert (outs[3] >= 0).all() and (outs[0] < 0).any()   # the fallback really ran the plain ReLU
