"""Budgets are exact, searches run, polynomial fits, folding, sparse-ReLU ONNX, costs, bad input."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.core.errors import ConfigError, PlanError, SurgeonError
from surgeon.ops.activation import MaskedReLU
from surgeon.ops.poly_units import MaskedPolyReLU
from surgeon.passes import (
    BudgetSearchConfig, FinalizeReLU, LinearizeReLU, fit_polynomials, fold_linear_ops, kept_relus,
    search_relu_budget, select_top_k, total_relus,
)
from surgeon.passes.relu.budget import relu_units
from surgeon.costs.private import PRESETS, Protocol, private_costs


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = nn.functional.relu6(self.c2(x) + x[:, :5])
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 5, 5, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + (x[:, 1].mean(dim=(1, 2)) > 0.3).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]


FAST = BudgetSearchConfig(epochs=3, finetune_epochs=1)
TOTAL = 6 * 25 + 5 * 25  # 275


@pytest.mark.parametrize("granularity", ["layer", "channel", "pixel"])
@pytest.mark.parametrize("budget", [1, 37, 137, 0.1, 0.5, 1.0])
def test_top_k_is_exact(granularity, budget, data):
    x = data[0][0]
    s = surgeon.apply(Net(), LinearizeReLU(granularity=granularity, budget=budget), example_inputs=x[:2])
    assert total_relus(s.model) == TOTAL
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(u.mask.shape, generator=g) for n, u in relu_units(s.model).items()}
    want = budget if isinstance(budget, int) else max(1, round(budget * TOTAL))
    select_top_k(s.model, want, scores)
    assert kept_relus(s.model) == want
    f = surgeon.apply(s, FinalizeReLU())
    assert f.report["FinalizeReLU"].totals["relus"] == want
    assert f.report["model (per example)"].rows[2]["after"] == want  # surgeon.costs.macs agrees


@pytest.mark.parametrize("method", ["snl", "autorep", "calibration"])
@pytest.mark.parametrize("granularity", ["channel", "pixel"])
def test_search_methods_hit_budget(method, granularity, data):
    x = data[0][0]
    s = surgeon.apply(Net(), LinearizeReLU(granularity=granularity, budget=0.2), example_inputs=x[:2])
    r = search_relu_budget(s, data, method=method, config=FAST)
    assert r.kept == r.budget == round(0.2 * TOTAL) == kept_relus(s.model)
    assert all(not u.mask.requires_grad and u.gate is None for u in relu_units(s.model).values())
    if method != "calibration":
        assert any(h["phase"] == "search" for h in r.history)
    f = surgeon.apply(s, FinalizeReLU())
    torch.testing.assert_close(f.model(x), s.model(x), atol=1e-5, rtol=1e-5)
    assert r.report.totals["kept"] == r.budget


def test_snl_lambda_adapts_and_autorep_uses_ste(data):
    x = data[0][0]
    s = surgeon.apply(Net(), LinearizeReLU(granularity="pixel", budget=10), example_inputs=x[:2])
    cfg = BudgetSearchConfig(epochs=8, finetune_epochs=0, snl_lambda=1e-3, lambda_patience=1, mask_lr=1e-3)
    r = search_relu_budget(s, data, method="snl", config=cfg)
    lams = [h["lambda"] for h in r.history if h["phase"] == "search"]
    assert lams[-1] > lams[0]  # λ grew while the soft count stalled above the budget
    # STE: forward is hard 0/1, gradient reaches the scores
    u = MaskedReLU("relu", (4,))
    u.gate = "ste"
    with torch.no_grad():
        u.mask.copy_(torch.tensor([0.3, -0.2, 0.0, 1.0]))
    xin = -torch.ones(2, 4)
    out = u(xin)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.0, -1, -1, 0]] * 2))
    out.sum().backward()
    assert u.mask.grad is not None and u.mask.grad.abs().sum() > 0


def test_polynomial_least_squares_matches_numpy(data):
    x = data[0][0]
    s = surgeon.apply(Net(), LinearizeReLU(granularity="channel", units="poly"), example_inputs=x[:2])
    inputs = [b[0] for b in data]
    quality = fit_polynomials(s.model, inputs)
    unit = s.model.get_submodule("c1.relu") if False else relu_units(s.model)["relu"]
    assert isinstance(unit, MaskedPolyReLU) and bool(unit.calibrated)
    # collect the unit's inputs and fit channel 2 by numpy least squares
    seen = []
    h = unit.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        s.model.eval()
        for b in inputs:
            s.model(b)
    h.remove()
    z = torch.cat(seen)[:, 2].reshape(-1).double().numpy()
    coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(z), z, z * z], 1), np.maximum(z, 0), rcond=None)
    np.testing.assert_allclose(unit.coef[:, 2, 0, 0].detach().numpy(), coef, rtol=1e-3, atol=1e-4)
    # the fit beats the identity and a line through the origin on the channel statistics
    fit = coef[0] + coef[1] * z + coef[2] * z * z
    assert np.mean((fit - np.maximum(z, 0)) ** 2) < 0.5 * np.mean((z - np.maximum(z, 0)) ** 2)
    assert all(q < 1.0 for q in quality.values())


def test_poly_units_finalize_and_count(data):
    x = data[0][0]
    s = surgeon.apply(Net(), LinearizeReLU(granularity="pixel", units="poly", budget=40), example_inputs=x[:2])
    search_relu_budget(s, data, method="autorep", config=FAST)
    f = surgeon.apply(s, FinalizeReLU())
    torch.testing.assert_close(f.model(x), s.model(x), atol=1e-5, rtol=1e-5)
    costs = private_costs(f.model, x[:2])
    assert costs.summary["relus"] == 40 and costs.summary["poly_units"] == TOTAL - 40


def test_fold_bn_and_consecutive_linear_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1),
                        nn.Conv2d(4, 4, 1, bias=False), nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16),
                        nn.Linear(16, 5))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1); m.running_var.uniform_(0.5, 2); m.weight.data.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(5, 3, 4, 4)
    ref = net(x)
    gm = torch.fx.symbolic_trace(copy.deepcopy(net))  # folding edits the traced modules in place
    done = fold_linear_ops(gm)
    assert sum("bn" in d for d in done) == 2 and len(done) >= 4
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    assert (gm(x) - ref).abs().max() <= 1e-5


def test_finalize_fold_removes_identity_sites_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU()).eval()
    x = torch.randn(2, 3, 6, 6)
    s = surgeon.apply(net, LinearizeReLU(granularity="layer"), example_inputs=x)
    relu_units(s.model)["2"].mask.data.zero_()
    ref = s.model(x)
    f = surgeon.apply(s, FinalizeReLU(fold=True))
    assert (f.model(x) - ref).abs().max() <= 1e-5
    convs = [m for m in f.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and f.report["FinalizeReLU"].notes


def test_cost_model_reproduces_delphi_resnet18():
    p = PRESETS["delphi"]
    n = 557_056
    assert abs(n * p.t_relu - 10.17) / 10.17 < 0.05
    assert abs(n * p.t_garble - 16.99) / 16.99 < 0.05
    assert abs(n * p.s_gc - 9.51e9) / 9.51e9 < 0.05
    assert abs(n * p.b_relu - 0.66e9) / 0.66e9 < 0.05
    r = private_costs(Net(), torch.randn(2, 3, 5, 5), protocol=Protocol("custom", 1, 2, 3, 4, 5, 6, 0, 0))
    assert r.summary["online_ms"] == 1e3 * TOTAL and r.summary["client_storage_MB"] == 4 * TOTAL / 1e6
    with pytest.raises(ConfigError, match="presets"):
        private_costs(Net(), torch.randn(2, 3, 5, 5), protocol="nope")


# ---------------------------------------------------------------------------------------------- bad input


def _same(a: nn.Module, b_state: dict) -> bool:
    return all(torch.equal(v, b_state[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("budget, match", [(TOTAL + 1, "more than the model has"), (-3, "positive"),
                                           (0, "budget=0"), (0.0, "budget=0"), (1.5, "fraction"), (True, "int")])
def test_bad_budgets(budget, match, data):
    net = Net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        surgeon.apply(net, LinearizeReLU(granularity="channel", budget=budget), example_inputs=data[0][0][:2],
                      inplace=True)
    assert _same(net, state) and not any(isinstance(m, MaskedReLU) for m in net.modules())


def test_bad_search_budget_leaves_masks(data):
    s = surgeon.apply(Net(), LinearizeReLU(granularity="channel"), example_inputs=data[0][0][:2])
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    for bad in (TOTAL + 5, -1, 0):
        with pytest.raises(ConfigError):
            search_relu_budget(s, data, budget=bad, config=FAST)
    with pytest.raises(ConfigError, match="no budget"):
        search_relu_budget(s, data, config=FAST)
    assert _same(s.model, before)


def test_model_without_relu_is_rejected():
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with pytest.raises(PlanError, match="no ReLU"):
        surgeon.apply(net, LinearizeReLU(granularity="layer", budget=1), example_inputs=torch.randn(2, 3))


def test_pixel_masks_with_dynamic_spatial_size(tmp_path, data):
    from surgeon.export.sparse_relu import to_sparse_onnx

    x = data[0][0]
    with pytest.raises(ConfigError, match="example_inputs"):
        surgeon.apply(Net(), LinearizeReLU(granularity="pixel", budget=10))
    s = surgeon.apply(Net(), LinearizeReLU(granularity="pixel", budget=10), example_inputs=x[:2])
    select_top_k(s.model, 10)
    f = surgeon.apply(s, FinalizeReLU())
    with pytest.raises(ConfigError, match="dynamic dims"):
        to_sparse_onnx(f.model, tmp_path / "x", x[:2], dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}})
    assert not (tmp_path / "x").exists()


def test_poly_without_calibration(data):
    x = data[0][0]
    s = surgeon.apply(Net(), LinearizeReLU(granularity="channel", units="poly"), example_inputs=x[:2])
    relu_units(s.model)["relu"].mask.data[:3] = 0
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    with pytest.raises(ConfigError, match="never fitted"):
        surgeon.apply(s, FinalizeReLU())
    with pytest.raises(ConfigError, match="calibration data"):
        fit_polynomials(s.model, [])
    assert _same(s.model, before)
    with pytest.raises(ConfigError, match="no polynomial units"):
        fit_polynomials(surgeon.apply(Net(), LinearizeReLU(granularity="layer")).model, [x])


@pytest.mark.parametrize("finalize", [False, True])
def test_save_restore_after_budget_search(tmp_path, data, finalize):
    x = data[0][0]
    base = Net()
    s = surgeon.apply(base, LinearizeReLU(granularity="channel", budget=60, units="poly"), example_inputs=x[:2])
    search_relu_budget(s, data, method="calibration", config=BudgetSearchConfig(finetune_epochs=1))
    assert any(u.mask.dim() and u.mask.shape[-1] == 5 for u in relu_units(s.model).values())  # a partial channel
    if finalize:
        s = surgeon.apply(s, FinalizeReLU())
    s.model.eval()
    surgeon.save(s, tmp_path)
    restored = surgeon.restore(base, tmp_path).eval()
    torch.testing.assert_close(restored(x), s.model(x), atol=1e-6, rtol=1e-6)
