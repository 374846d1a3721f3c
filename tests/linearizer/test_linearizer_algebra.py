"""surgeon.Linearizer: induced vector-space properties in float64 (each ≤ 1e-5), pinv, svd, projector, compose."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.core.errors import ConfigError
from surgeon.ops.linearizer import Linearizer
from surgeon.ops.invertible import ActNorm

from lin_helpers import _one_thread, chain  # noqa: F401 (fixtures)

TOL = 1e-5


def _f(m=5, n=6, seed=0, rank=None):
    g_x, g_y = chain(n, seed).double().eval(), chain(m, seed + 10).double().eval()
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if rank is not None:
        A = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, n, generator=gen, dtype=torch.float64)
    return surgeon.Linearizer(g_x, g_y, A)


def _x(rows=7, n=6, seed=1):
    return torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _err(a, b):
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def test_additivity_and_homogeneity():
    f = _f()
    a, b = _x(seed=1), _x(seed=2)
    assert _err(f(f.X.add(a, b)), f.Y.add(f(a), f(b))) <= TOL
    for c in (2.5, -1.3, 0.0):
        assert _err(f(f.X.scale(c, a)), f.Y.scale(c, f(a))) <= TOL
    assert _err(f(f.X.zero(a)), f.Y.zero(f(a))) <= TOL                  # f(0_x) = 0_y
    combo = f.X.combine([0.7, -2.0], [a, b])
    assert _err(f(combo), f.Y.combine([0.7, -2.0], [f(a), f(b)])) <= TOL


def test_vector_space_axioms_and_inner_product():
    f = _f()
    a, b, c = _x(seed=1), _x(seed=2), _x(seed=3)
    X = f.X
    assert _err(X.add(a, X.zero(a)), a) <= TOL
    assert _err(X.add(a, X.neg(a)), X.zero(a)) <= TOL
    assert _err(X.add(X.add(a, b), c), X.add(a, X.add(b, c))) <= TOL
    assert not torch.allclose(X.zero(a), torch.zeros_like(a))          # 0_g is not the zero tensor
    assert _err(X.inner(X.add(a, b), c), X.inner(a, c) + X.inner(b, c)) <= TOL
    assert bool((X.norm(a) >= 0).all())


def test_pinv_identities():
    f = _f(m=5, n=6, rank=3)
    fp = f.pinv()
    x, y = _x(seed=4), torch.randn(7, 5, dtype=torch.float64)
    assert _err(f(fp(f(x))), f(x)) <= TOL                                # f ∘ f⁺ ∘ f = f
    assert _err(fp(f(fp(y))), fp(y)) <= TOL                              # f⁺ ∘ f ∘ f⁺ = f⁺
    # f⁺(y) is the ⟨·,·⟩_{g_x}-minimum-norm preimage: moving along the null space only adds norm
    pre = fp(f(x))
    null = torch.linalg.svd(f.A)[2][3:]                                  # null-space directions of A
    other = f.X.from_coords(f.X.to_coords(pre) + 0.3 * null[0])
    assert _err(f(other), f(pre)) <= TOL
    assert bool((f.X.norm(other) > f.X.norm(pre)).all())


def test_svd_low_rank_and_projector():
    f = _f(m=5, n=6)
    U, S, Vh = f.svd()
    assert torch.allclose((U * S) @ Vh, f.A, atol=1e-10)
    f2 = f.low_rank(2)
    assert f2.rank() == 2
    P = f.projector(3)
    y = torch.randn(7, 5, dtype=torch.float64)
    assert _err(P(P(y)), P(y)) <= TOL                                    # idempotent
    assert _err(f.low_rank(3).projector()(f.low_rank(3)(_x())), f.low_rank(3)(_x())) <= TOL  # fixes the range


def test_exact_composition():
    g_mid = chain(4, 5).double().eval()
    inner = Linearizer(chain(6, 1).double().eval(), g_mid, torch.randn(4, 6, dtype=torch.float64))
    outer = Linearizer(g_mid, chain(3, 2).double().eval(), torch.randn(3, 4, dtype=torch.float64))
    fused = outer.compose(inner)
    x = _x()
    assert _err(fused(x), outer(inner(x))) <= TOL
    # an equal copy of g_mid also composes; a different map does not
    import copy
    assert _err(Linearizer(copy.deepcopy(g_mid), outer.g_y, outer.A).compose(inner)(x), fused(x)) <= TOL
    with pytest.raises(ConfigError, match="g_y to be the outer one's g_x"):
        outer.compose(Linearizer(inner.g_x, chain(4, 9).double().eval(), inner.A))


def test_operator_addition_is_induced_addition():
    f = _f()
    h = Linearizer(f.g_x, f.g_y, torch.randn(5, 6, dtype=torch.float64))
    s = f.add_operator(h, alpha=-0.5)
    x = _x()
    assert _err(s(x), f.Y.add(f(x), f.Y.scale(-0.5, h(x)))) <= TOL


def test_dimension_mismatch_is_clear():
    with pytest.raises(ConfigError, match="dimension mismatch: g_x maps 6 features but A has 4 columns"):
        Linearizer(ActNorm(6), None, torch.randn(3, 4))
    with pytest.raises(ConfigError, match="dimension mismatch: g_y maps 5"):
        Linearizer(None, ActNorm(5), torch.randn(3, 4))
    f = _f()
    with pytest.raises(ConfigError, match="input has 6 features on dim -1, got a tensor of shape \\[2, 5\\]"):
        f(torch.randn(2, 5, dtype=torch.float64))


def test_rank_larger_than_dimension():
    f = _f(m=5, n=6)
    with pytest.raises(ConfigError, match="rank 7 is larger than A allows: A is 5×6"):
        f.low_rank(7)
    with pytest.raises(ConfigError, match="rank 6"):
        f.projector(6)


def test_conv_linearizer_is_linear_and_rejects_matrix_algebra():
    from surgeon.ops.invertible import InvertibleSequential
    g_x = chain(3, 0, dim=1).double().eval()
    g_y = chain(4, 1, dim=1).double().eval()
    A = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    f = Linearizer(g_x, g_y, A, dim=1, conv={"padding": 1})
    a, b = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert _err(f(f.X.add(a, b)), f.Y.add(f(a), f(b))) <= TOL
    with pytest.raises(ConfigError, match="convolution"):
        f.pinv()
    empty = InvertibleSequential()                     # no blocks: the identity both ways
    assert torch.equal(empty(a), a) and torch.equal(empty.inverse(a), a)
