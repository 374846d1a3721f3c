"""LinearizerSandwich: exact sandwiches (≤ 1e-5, no data), R² and threshold on MLPs, distillation, replay, bad input."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import surgeon
import surgeon.export
from surgeon.core.errors import ConfigError, PlanError, SelectionError
from surgeon.ops.linearizer import Linearizer
from surgeon.passes import LinearizerSandwich

ACTS = {
    "leaky_relu": lambda c: nn.LeakyReLU(0.2),
    "prelu": lambda c: nn.PReLU(c, init=0.3),
    "elu": lambda c: nn.ELU(0.8),
    "tanh": lambda c: nn.Tanh(),
    "sigmoid": lambda c: nn.Sigmoid(),
    "softplus": lambda c: nn.Softplus(beta=1.5, threshold=10.0),
}

from lin_helpers import _one_thread, tiny_llama, token_batches  # noqa: F401 (fixtures)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(m, state):
    return all(torch.equal(v, state[k]) for k, v in m.state_dict().items()) and m.state_dict().keys() == state.keys()


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_exact_sandwich_detection(act, layer):
    torch.manual_seed(0)
    if layer == "linear":
        net = nn.Sequential(nn.Linear(6, 5), ACTS[act](5), nn.Linear(5, 3))
        x = torch.randn(7, 6)
    else:
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2), ACTS[act](4), nn.Conv2d(4, 2, 1))
        x = torch.randn(2, 3, 9, 9)
    if act == "prelu":
        with torch.no_grad():
            net[1].weight.uniform_(0.1, 0.9)
    net.eval()
    s = surgeon.apply(net, LinearizerSandwich(mode="exact"), example_inputs=(x,))
    rows = s.report["LinearizerSandwich"].rows
    assert [(r["site"], r["kind"]) for r in rows] == [("0", f"exact:{act}")]
    lin = s.model.get_submodule("0")
    assert type(lin) is Linearizer and lin is not net[0]
    with torch.no_grad():
        assert (s.model(x) - net(x)).abs().max() <= 1e-5
        # it is linear in the induced output space, for every activation: inputs kept small so that
        # tanh / sigmoid do not saturate in fp32 (their inverse is ill-conditioned near ±1 / 0, 1)
        a, b = 0.2 * x, 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        fa, fb = lin(a), lin(b)
        fsum = lin(lin.X.add(a, b))
    assert torch.isfinite(fsum).all()
    assert (fsum - lin.Y.add(fa, fb)).abs().max() <= 1e-4, act


def test_exact_functional_and_module_targets():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.block = nn.Sequential(nn.Linear(4, 4), nn.ELU())
            self.relu_fc = nn.Linear(4, 4)

        def forward(self, x):
            x = F.leaky_relu(self.fc(x), 0.05)
            x = torch.tanh(self.block(x))          # block output has 2 users? no: tanh only
            return torch.relu(self.relu_fc(x))     # ReLU is not bijective: not a site

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(5, 4)
    s = surgeon.apply(net, LinearizerSandwich())
    assert sorted(r["site"] for r in s.report["LinearizerSandwich"].rows) == ["block.0", "fc"]
    assert (s.model(x) - net(x)).abs().max() <= 1e-6
    # a targeted module that is Linear + bijective activation converts exactly with no data
    s2 = surgeon.apply(net, LinearizerSandwich(targets=["block"]))
    assert s2.report["LinearizerSandwich"].rows[0]["kind"] == "exact:elu"
    assert (s2.model(x) - net(x)).abs().max() <= 1e-6


def test_exact_sandwich_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Softplus(), nn.Linear(8, 8), nn.Tanh()).eval()
    x = torch.randn(4, 6)
    s = surgeon.apply(net, LinearizerSandwich(mode="exact"), example_inputs=(x,))
    surgeon.export.to_onnx(s.model, tmp_path / "fwd", (x,))
    assert surgeon.export.verify(tmp_path / "fwd", s.model).passed
    # the inverse direction of the last sandwich (8 → 8, invertible A): f⁺ = g_x⁻¹ A⁺ g_y
    last = s.model.get_submodule("2")
    inv = last.pinv().eval()
    y = torch.tanh(torch.randn(4, 8)) * 0.9
    surgeon.export.to_onnx(inv, tmp_path / "inv", (y,))
    rep = surgeon.export.verify(tmp_path / "inv", inv, inputs=[(torch.tanh(torch.randn(b, 8)) * 0.9,) for b in (1, 3)])
    assert rep.passed
    z = torch.randn(3, 8)
    assert torch.allclose(inv(last(z)), z, atol=1e-4)


class MLP(nn.Module):
    def __init__(self, d=12, h=48, act=F.gelu):
        super().__init__()
        self.up, self.down, self.act = nn.Linear(d, h), nn.Linear(h, d), act

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _mlp_model(act=F.gelu, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), MLP(act=act), nn.Linear(12, 3)).eval()


def _cal(n=6, rows=256, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, d, generator=g) for _ in range(n)]


def test_linear_block_has_r2_one_and_is_replaced_by_a_plain_linear():
    model = _mlp_model(act=lambda t: t)           # a linear "MLP": R² = 1
    s = surgeon.apply(model, LinearizerSandwich(targets=["1"], calibration=_cal(), threshold=0.99))
    row = s.report["LinearizerSandwich"].rows[0]
    assert row["kind"] == "linear" and row["r2"] > 1 - 1e-8
    assert isinstance(s.model.get_submodule("1"), nn.Linear)
    x = torch.randn(50, 6)
    assert (s.model(x) - model(x)).abs().max() <= 1e-4


def test_threshold_decides_linear_vs_sandwich_and_training_improves():
    model = _mlp_model(act=torch.tanh)
    cal = [c * 2 for c in _cal()]
    lin = surgeon.apply(model, LinearizerSandwich(targets=["1"], calibration=cal, threshold=0.5))
    r_lin = lin.report["LinearizerSandwich"].rows[0]
    assert r_lin["kind"] == "linear" and 0.5 <= r_lin["r2"] < 0.999
    sw = surgeon.apply(model, LinearizerSandwich(targets=["1"], calibration=cal, threshold=0.9999, steps=120,
                                                 hidden=32, resolve_every=20))
    r_sw = sw.report["LinearizerSandwich"].rows[0]
    assert r_sw["kind"] == "sandwich"
    assert r_sw["r2"] == pytest.approx(r_lin["r2"])                 # same closed-form start
    assert r_sw["err_after"] < 0.7 * r_sw["err_before"]             # distillation helps
    assert r_sw["r2_after"] > r_sw["r2"]
    unit = sw.model.get_submodule("1")
    assert isinstance(unit, Linearizer) and len(unit.g_x.blocks) > 1
    x = torch.randn(64, 6) * 2
    with torch.no_grad():
        e = float(((sw.model(x) - model(x)) ** 2).sum() / (model(x) ** 2).sum())
        e_lin = float(((lin.model(x) - model(x)) ** 2).sum() / (model(x) ** 2).sum())
    assert e < e_lin
    # the fitted sandwich is still exactly linear in its induced spaces
    a, b = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    u = unit.double()
    assert (u(u.X.add(a, b)) - u.Y.add(u(a), u(b))).abs().max() <= 1e-5


def test_sandwich_replays_from_saved_weights(tmp_path):
    model = _mlp_model(act=torch.tanh)
    s = surgeon.apply(model, LinearizerSandwich(targets=["1"], calibration=_cal(), threshold=1.0, steps=30,
                                                resolve_every=10, hidden=16))
    surgeon.save(s, tmp_path)
    again = surgeon.restore(model, tmp_path)            # no calibration: structure replayed, weights loaded
    x = torch.randn(9, 6)
    with torch.no_grad():
        assert torch.equal(again(x), s.model(x))


def test_conv_block_fit_with_conv_A():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1))
    net = nn.Sequential(nn.Conv2d(2, 3, 1), block).eval()
    cal = [torch.randn(8, 2, 8, 8) for _ in range(3)]
    s = surgeon.apply(net, LinearizerSandwich(targets=["1"], calibration=cal, feature_dim=1, kernel_size=5,
                                              threshold=0.0))
    row = s.report["LinearizerSandwich"].rows[0]
    unit = s.model.get_submodule("1")
    assert row["kind"] == "linear" and isinstance(unit, Linearizer) and list(unit.A.shape) == [4, 3, 5, 5]
    assert row["r2"] > 0.5
    x = torch.randn(2, 2, 8, 8)
    assert s.model(x).shape == net(x).shape


def test_rank_larger_than_dimension_leaves_model_untouched():
    model = _mlp_model()
    state = _state(model)
    with pytest.raises(ConfigError, match="rank 20 is larger than the dimension allows"):
        surgeon.apply(model, LinearizerSandwich(targets=["1"], calibration=_cal(), rank=20), inplace=True)
    assert _same(model, state) and isinstance(model[1], MLP)


def test_low_rank_fit():
    model = _mlp_model(act=lambda t: t)
    s = surgeon.apply(model, LinearizerSandwich(targets=["1"], calibration=_cal(), rank=2, threshold=0.0))
    W = s.model.get_submodule("1").weight
    assert int(torch.linalg.matrix_rank(W.double(), rtol=1e-5)) == 2


def test_dimension_mismatch_leaves_model_untouched():
    class Flatten(nn.Module):  # maps (B, 4, 3) to (B, 12): rows of features are not kept
        def forward(self, x):
            return x.flatten(1)

    net = nn.Sequential(nn.Linear(3, 3), Flatten(), nn.Linear(12, 2)).eval()
    state = _state(net)
    with pytest.raises(PlanError, match="dimension mismatch"):
        surgeon.apply(net, LinearizerSandwich(targets=["1"], calibration=[torch.randn(8, 4, 3)]), inplace=True)
    assert _same(net, state) and isinstance(net[1], Flatten)


def test_ill_conditioned_fit_warns_with_condition_number_and_ridge():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), MLP(d=8, h=16), nn.Linear(8, 2)).eval()  # inputs of "1" have rank 3 of 8
    with pytest.warns(RuntimeWarning, match=r"condition number .* with ridge λ=0"):
        surgeon.apply(net, LinearizerSandwich(targets=["1"], calibration=_cal(d=3), ridge=0.0, threshold=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the default ridge keeps it well-posed
        surgeon.apply(net, LinearizerSandwich(targets=["1"], calibration=_cal(d=3), ridge=1e-3, threshold=0.0))


def test_missing_calibration_and_no_sites_are_clear_errors():
    model = _mlp_model()
    with pytest.raises(ConfigError, match="needs calibration"):
        surgeon.apply(model, LinearizerSandwich(targets=["1"]))
    with pytest.raises(PlanError, match="found no exact sandwich"):
        surgeon.apply(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), LinearizerSandwich())
    with pytest.raises(SelectionError):
        surgeon.apply(model, LinearizerSandwich(targets=["nope"], calibration=_cal()))
    with pytest.raises(ConfigError, match="feature_dim"):
        LinearizerSandwich(feature_dim=2).validate()


def test_transformer_mlp_sandwich_on_tiny_llama(tiny_llama, token_batches, tmp_path):
    s = surgeon.apply(tiny_llama, LinearizerSandwich(targets=["model.layers.1.mlp", "model.layers.3.mlp"],
                                                     calibration=token_batches, threshold=0.999, steps=20,
                                                     resolve_every=10, hidden=16))
    rows = s.report["LinearizerSandwich"].rows
    assert [r["kind"] for r in rows] == ["sandwich", "sandwich"] and all(0 < r["r2"] < 0.999 for r in rows)
    assert all(r["err_after"] <= r["err_before"] for r in rows)
    out = s.model.generate(token_batches[0][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    # a fitted sandwich exports (forward) and so does its pseudo-inverse, both verified in onnxruntime
    unit = s.model.get_submodule("model.layers.1.mlp").eval()
    x = torch.randn(2, 5, 32)
    surgeon.export.to_onnx(unit, tmp_path / "mlp", (x,))
    assert surgeon.export.verify(tmp_path / "mlp", unit).passed
    inv = unit.pinv().eval()                       # g_x⁻¹ A⁺ g_y through the trained couplings
    with torch.no_grad():
        y = unit(x)
        back = inv(y)
    # A is square and full rank: f⁺(f(x)) = x (measured 1.6e-5 on |x| ≤ 2.9)
    assert (back - x).abs().max() <= 1e-4 * x.abs().max(), (back - x).abs().max()
    surgeon.export.to_onnx(inv, tmp_path / "mlp_inv", (y,))
    rep = surgeon.export.verify(tmp_path / "mlp_inv", inv, inputs=[(unit(torch.randn(b, 5, 32)).detach(),) for b in (1, 3)])
    assert rep.passed and rep.max_abs <= 1e-4
    surgeon.save(s, tmp_path / "saved")
    again = surgeon.restore(tiny_llama, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(token_batches[1]).logits, s.model(token_batches[1]).logits)


@pytest.mark.parametrize("config", [LinearizerSandwich(), LinearizerSandwich(targets=["block"])])
def test_exact_surgery_replays(config, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("fc", nn.Linear(4, 4))
    net.add_module("act", nn.Sigmoid())
    net.add_module("block", nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(0.1)))
    net.eval()
    x = torch.randn(6, 4)
    s = surgeon.apply(net, config, example_inputs=(x,))
    surgeon.save(s, tmp_path)
    again = surgeon.restore(net, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), s.model(x)) and (s.model(x) - net(x)).abs().max() <= 1e-6
