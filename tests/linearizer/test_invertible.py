"""Invertible blocks: exact inverses (fp32 ≤ 1e-5), identity at init, FX tracing, ONNX in both directions."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import surgeon.export
from surgeon.core.errors import ConfigError
from surgeon.ops.invertible import (
    ActNorm, AffineCoupling, Bias, InverseActivation, InverseOf, InvertibleLinear, InvertibleSequential,
)

from lin_helpers import _one_thread, chain, randomize  # noqa: F401 (fixtures)


def _blocks():
    torch.manual_seed(0)
    return {
        "actnorm": randomize(ActNorm(6)),
        "coupling": randomize(AffineCoupling(6, hidden=12)),
        "coupling_swap_odd": randomize(AffineCoupling(7, hidden=12, swap=True)),
        "lu_identity": InvertibleLinear(6),
        "lu_random": InvertibleLinear(6, init="random", seed=3),
        "bias": Bias(torch.randn(6)),
        "chain": chain(6),
        "chain_channels_first": chain(6, dim=1),
    }


@pytest.mark.parametrize("name", list(_blocks()))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_inverse_fp32(name, mode):
    block = _blocks()[name]
    block.train(mode == "train")
    shape = (5, 6, 4, 3) if name == "chain_channels_first" else (5, 3, block.features)
    x = torch.randn(shape) * 2
    with torch.no_grad():
        z = block(x)
        assert z.shape == x.shape
        assert (block.inverse(z) - x).abs().max() <= 1e-5 * max(1.0, float(x.abs().max()))
        assert (block(block.inverse(z)) - z).abs().max() <= 1e-5 * max(1.0, float(z.abs().max()))


@pytest.mark.parametrize("kind,kw", [("leaky_relu", {"slope": 0.1}), ("elu", {"alpha": 0.7}), ("tanh", {}),
                                     ("sigmoid", {}), ("softplus", {"beta": 2.0}),
                                     ("prelu", {"weight": torch.tensor([0.2, 0.5, 1.5, 0.05])})])
def test_inverse_activation_fp32(kind, kw):
    act = InverseActivation(kind, **kw)
    x = (torch.randn(16, 4) * 1.5).clamp(-2, 2)   # where φ is well conditioned in fp32
    y = act.inverse(x)                            # φ(x)
    assert (act(y) - x).abs().max() <= 1e-5       # φ⁻¹(φ(x)) = x
    assert (act.inverse(act(y)) - y).abs().max() <= 1e-5   # φ(φ⁻¹(y)) = y
    xd = x.double()
    act64 = InverseActivation(kind, **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}).double()
    assert (act64(act64.inverse(xd)) - xd).abs().max() <= 1e-10


@pytest.mark.parametrize("kind,kw", [("leaky_relu", {"slope": -0.1}), ("elu", {"alpha": 0.0}), ("relu", {}),
                                     ("prelu", {"weight": torch.tensor([0.2, -0.5])})])
def test_non_bijective_activation_rejected(kind, kw):
    with pytest.raises(ConfigError):
        InverseActivation(kind, **kw)


def test_coupling_identity_at_init_and_soft_clamp():
    c = AffineCoupling(8, hidden=16, clamp=1.5)
    x = torch.randn(10, 8)
    assert torch.equal(c(x), x) and torch.equal(c.inverse(x), x)
    with torch.no_grad():
        c.net[2].weight.fill_(100.0)
    s, _ = c._scale_shift(x[:, :4] * 100)
    assert float(s.detach().abs().max()) <= 1.5


def test_actnorm_initialize_standardises():
    x = torch.randn(200, 5) * torch.tensor([1.0, 2, 3, 4, 5]) + 7
    z = ActNorm(5).initialize(x)(x)
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0, unbiased=False) - 1).abs().max() < 1e-4


def test_lu_cached_inverse_saved_in_state_dict():
    a = InvertibleLinear(5, init="random", seed=1)
    with torch.no_grad():
        a.lower.add_(0.1)
    a.eval()
    b = InvertibleLinear(5).eval()
    b.load_state_dict(a.state_dict())
    z = torch.randn(3, 5)
    assert torch.allclose(b.inverse(z), a.inverse(z), atol=1e-6)
    assert torch.allclose(b(b.inverse(z)), z, atol=1e-5)


def test_fx_traceable_both_directions():
    g = chain(6).eval()
    x = torch.randn(4, 6)
    fwd = fx.symbolic_trace(g)
    inv = fx.symbolic_trace(InverseOf(g))
    assert torch.allclose(fwd(x), g(x)) and torch.allclose(inv(fwd(x)), x, atol=1e-5)
    assert "solve_triangular" not in inv.code  # eval mode: cached inverse, exportable


def test_chain_width_mismatch_rejected():
    with pytest.raises(ConfigError, match="different widths"):
        InvertibleSequential(ActNorm(4), ActNorm(5))
    with pytest.raises(ConfigError, match="at least 2"):
        AffineCoupling(1)


def test_onnx_forward_and_inverse_graphs(tmp_path):
    g = chain(6).eval()
    x = torch.randn(3, 5, 6)
    for name, module in (("forward", g), ("inverse", InverseOf(g).eval())):
        surgeon.export.to_onnx(module, tmp_path / name, (x,))
        rep = surgeon.export.verify(tmp_path / name, module, atol=1e-5, rtol=1e-4)
        assert rep.passed, rep
