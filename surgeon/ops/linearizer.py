"""``surgeon.Linearizer``: ``f(x) = g_y⁻¹(A · g_x(x))``, exactly linear in the spaces g induces.

With invertible ``g`` the operations ``a ⊕ b = g⁻¹(g(a) + g(b))``, ``c ⊙ a = g⁻¹(c · g(a))``,
zero ``0_g = g⁻¹(0)`` and ``⟨a, b⟩_g = ⟨g(a), g(b)⟩`` make the input and output sets vector
spaces (Berman, Hallak & Shocher, "Who Said Neural Networks Aren't Linear?", 2025), and ``f`` is a
linear map between them: ``f(a ⊕ b) = f(a) ⊕ f(b)``, ``f(c ⊙ a) = c ⊙ f(a)``. So linear algebra
applies to ``f``: :meth:`Linearizer.pinv` (``f⁺ = L{g_y, g_x, A⁺}``, ``f∘f⁺∘f = f``),
:meth:`Linearizer.svd` / :meth:`Linearizer.low_rank`, :meth:`Linearizer.projector` (an idempotent
``L{g_y, g_y, U Uᵀ}`` onto the range of ``f``), and :meth:`Linearizer.compose` (two Linearizers
sharing the middle ``g`` fuse into one with ``A = B·A'``).

``A`` is a matrix acting on the feature dim ``dim`` (``out × in``), or a convolution kernel
(``conv=dict(stride=..., padding=...)``: a bias-free convolution, also linear); the algebra that needs
a matrix (pinv, svd, projector, compose) says so for a convolution.

Example:
    >>> import torch
    >>> from surgeon.ops.invertible import ActNorm, AffineCoupling, InvertibleSequential
    >>> _ = torch.manual_seed(0); g = InvertibleSequential(ActNorm(4), AffineCoupling(4, hidden=8)).double()
    >>> with torch.no_grad(): _ = g.blocks[1].net[2].weight.normal_()      # a non-trivial coupling
    >>> f = Linearizer(g, g, torch.randn(4, 4, dtype=torch.float64))
    >>> a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    >>> bool(torch.allclose(f(f.X.add(a, b)), f.Y.add(f(a), f(b))))
    True
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from surgeon.core.errors import ConfigError
from surgeon.fx.tracing import SurgeonUnit
from surgeon.ops.invertible import InvertibleSequential, as_invertible


def _is_tracing() -> bool:
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling()


class InducedSpace:
    """The vector space (and inner product) that an invertible ``g`` induces on its domain."""

    def __init__(self, g: nn.Module, dim: int = -1) -> None:
        self.g, self.dim = g, dim

    def to_coords(self, a: torch.Tensor) -> torch.Tensor:
        return self.g(a)

    def from_coords(self, z: torch.Tensor) -> torch.Tensor:
        return self.g.inverse(z)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a ⊕ b = g⁻¹(g(a) + g(b))``."""
        return self.g.inverse(self.g(a) + self.g(b))

    def scale(self, c: float | torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``c ⊙ a = g⁻¹(c · g(a))``."""
        return self.g.inverse(c * self.g(a))

    def neg(self, a: torch.Tensor) -> torch.Tensor:
        return self.g.inverse(-self.g(a))

    def sub(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.g.inverse(self.g(a) - self.g(b))

    def combine(self, coeffs: list[float], points: list[torch.Tensor]) -> torch.Tensor:
        """``c₁ ⊙ p₁ ⊕ c₂ ⊙ p₂ ⊕ …``."""
        return self.g.inverse(sum(c * self.g(p) for c, p in zip(coeffs, points)))

    def zero(self, like: torch.Tensor) -> torch.Tensor:
        """``0_g = g⁻¹(0)``, shaped like ``like`` (which is in this space). Not the zero tensor in general."""
        return self.g.inverse(torch.zeros_like(self.g(like)))

    def inner(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``⟨a, b⟩_g = ⟨g(a), g(b)⟩`` over the feature dim (one value per row / pixel)."""
        return (self.g(a) * self.g(b)).sum(dim=self.dim)

    def norm(self, a: torch.Tensor) -> torch.Tensor:
        return self.inner(a, a).sqrt()


class LinearizerSVD(NamedTuple):
    """``A = U diag(S) Vh``; the induced singular vectors are ``g_y⁻¹(U[:, i])`` and ``g_x⁻¹(Vh[i])``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


class Linearizer(SurgeonUnit):
    """``f(x) = g_y⁻¹(A · g_x(x))`` with invertible ``g_x``, ``g_y`` (``None`` = identity).

    Args:
        g_x, g_y: invertible modules (``surgeon.ops.invertible`` blocks, or anything with ``inverse``).
        A: ``(out, in)`` matrix on feature dim ``dim``, or a conv kernel ``(out, in/groups, *k)`` with ``conv``.
        dim: feature dim of inputs and outputs (``-1`` per token, ``1`` channels-first).
        conv: ``dict(stride, padding, dilation, groups)`` when ``A`` is a convolution kernel.
        trainable: make ``A`` a parameter (default: a buffer, re-solved in closed form by the passes).
    """

    def __init__(self, g_x: nn.Module | None, g_y: nn.Module | None, A: torch.Tensor, *, dim: int = -1,
                 conv: dict[str, Any] | None = None, trainable: bool = False) -> None:
        super().__init__()
        self.g_x = as_invertible(g_x)
        self.g_y = as_invertible(g_y)
        A = torch.as_tensor(A)
        if conv is None and A.dim() != 2:
            raise ConfigError(f"A must be an (out, in) matrix, got shape {list(A.shape)}; pass conv=dict(...) "
                              f"for a convolution kernel")
        if conv is not None and A.dim() < 3:
            raise ConfigError(f"a convolution A needs a kernel of shape (out, in, *k), got {list(A.shape)}")
        self.dim = int(dim)
        self.conv = None if conv is None else {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **conv}
        groups = self.conv["groups"] if self.conv else 1
        self.out_features, self.in_features = int(A.shape[0]), int(A.shape[1]) * groups
        for name, g, n in (("g_x", self.g_x, self.in_features), ("g_y", self.g_y, self.out_features)):
            width = getattr(g, "features", None)
            if width is not None and width != n:
                side = "columns" if name == "g_x" else "rows"
                raise ConfigError(f"dimension mismatch: {name} maps {width} features but A has {n} {side} "
                                  f"(A is {list(A.shape)})")
        if trainable:
            self.A = nn.Parameter(A.detach().clone())
        else:
            self.register_buffer("A", A.detach().clone())

    # -- the map ---------------------------------------------------------------------------
    def _check(self, t: torch.Tensor, n: int, what: str) -> None:
        if _is_tracing() or not isinstance(t, torch.Tensor):
            return
        d = self.dim if self.dim >= 0 else t.dim() + self.dim
        if t.dim() == 0 or d >= t.dim() or d < 0 or t.shape[d] != n:
            raise ConfigError(f"dimension mismatch: this Linearizer's {what} has {n} features on dim {self.dim}, "
                              f"got a tensor of shape {list(t.shape)}")

    def apply_A(self, z: torch.Tensor) -> torch.Tensor:
        """``A z`` in g coordinates."""
        if self.conv is None:
            zl = z if self.dim == -1 else z.movedim(self.dim, -1)
            out = zl @ self.A.t()
            return out if self.dim == -1 else out.movedim(-1, self.dim)
        fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[self.A.dim()]
        c = self.conv
        return fn(z, self.A, None, c["stride"], c["padding"], c["dilation"], c["groups"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, self.in_features, "input")
        return self.g_y.inverse(self.apply_A(self.g_x(x)))

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """``A g_x(x)``: the output in g_y coordinates."""
        self._check(x, self.in_features, "input")
        return self.apply_A(self.g_x(x))

    # -- the induced spaces ----------------------------------------------------------------
    @property
    def X(self) -> InducedSpace:
        """The input space (``⊕``, ``⊙``, zero, inner product induced by ``g_x``)."""
        return InducedSpace(self.g_x, self.dim)

    @property
    def Y(self) -> InducedSpace:
        """The output space (induced by ``g_y``)."""
        return InducedSpace(self.g_y, self.dim)

    # -- linear algebra --------------------------------------------------------------------
    def _matrix(self, what: str) -> torch.Tensor:
        if self.conv is not None:
            raise ConfigError(f"{what} needs a matrix A; this Linearizer's A is a convolution kernel "
                              f"{list(self.A.shape)} (use a 1×1 kernel flattened to a matrix, or a Linear site)")
        return self.A.detach()

    def _new(self, g_x: nn.Module, g_y: nn.Module, A: torch.Tensor) -> "Linearizer":
        return Linearizer(g_x, g_y, A.to(self.A.dtype), dim=self.dim)

    def svd(self) -> LinearizerSVD:
        """Singular value decomposition of A (computed in float64, returned in A's dtype)."""
        U, S, Vh = torch.linalg.svd(self._matrix("svd()").double(), full_matrices=False)
        dt = self.A.dtype
        return LinearizerSVD(U.to(dt), S.to(dt), Vh.to(dt))

    def rank(self, rtol: float | None = None) -> int:
        return int(torch.linalg.matrix_rank(self._matrix("rank()").double(), rtol=rtol))

    def _check_rank(self, rank: int | None) -> int:
        full = min(self.out_features, self.in_features)
        if rank is None:
            return self.rank()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"rank must be a positive int, got {rank!r}")
        if rank > full:
            raise ConfigError(f"rank {rank} is larger than A allows: A is {self.out_features}×{self.in_features}, "
                              f"so its rank is at most {full}")
        return rank

    def low_rank(self, rank: int) -> "Linearizer":
        """``L{g_x, g_y, A_r}`` with A truncated to its top ``rank`` singular values (Eckart–Young in g coordinates)."""
        r = self._check_rank(rank)
        U, S, Vh = torch.linalg.svd(self._matrix("low_rank()").double(), full_matrices=False)
        return self._new(self.g_x, self.g_y, (U[:, :r] * S[:r]) @ Vh[:r])

    def pinv(self, rtol: float | None = None) -> "Linearizer":
        """The pseudo-inverse ``f⁺ = L{g_y, g_x, A⁺}``: ``f∘f⁺∘f = f``, ``f⁺(y)`` is the ⟨·,·⟩_{g_x}-minimum-norm preimage."""
        A_pinv = torch.linalg.pinv(self._matrix("pinv()").double(), rtol=rtol)
        return self._new(self.g_y, self.g_x, A_pinv)

    def projector(self, rank: int | None = None) -> "Linearizer":
        """Orthogonal (in ⟨·,·⟩_{g_y}) projector onto the range of ``f`` (its top-``rank`` part): ``L{g_y, g_y, U Uᵀ}``."""
        r = self._check_rank(rank)
        U, _, _ = torch.linalg.svd(self._matrix("projector()").double(), full_matrices=False)
        return self._new(self.g_y, self.g_y, U[:, :r] @ U[:, :r].t())

    def project(self, y: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """Project output-space points onto the range of ``f`` (idempotent)."""
        return self.projector(rank)(y)

    def compose(self, inner: "Linearizer") -> "Linearizer":
        """``self ∘ inner`` as one Linearizer ``L{inner.g_x, self.g_y, A_self · A_inner}`` (exact).

        Needs ``inner.g_y`` and ``self.g_x`` to be the same map (the same module, or equal modules).
        """
        if not isinstance(inner, Linearizer):
            raise ConfigError(f"compose() takes a Linearizer, got {type(inner).__name__}")
        if not same_map(inner.g_y, self.g_x):
            raise ConfigError("compose() needs the inner Linearizer's g_y to be the outer one's g_x "
                              "(the same module or an equal one); these differ, so the composition is not linear")
        A = self._matrix("compose()").double() @ inner._matrix("compose()").double()
        return Linearizer(inner.g_x, self.g_y, A.to(self.A.dtype), dim=self.dim)

    def add_operator(self, other: "Linearizer", alpha: float = 1.0) -> "Linearizer":
        """``f ⊕ α⊙h`` for two Linearizers sharing ``g_x`` and ``g_y``: ``L{g_x, g_y, A + α B}``."""
        if not (same_map(self.g_x, other.g_x) and same_map(self.g_y, other.g_y)):
            raise ConfigError("add_operator() needs both Linearizers to share g_x and g_y")
        return self._new(self.g_x, self.g_y, self._matrix("add_operator()").double()
                         + alpha * other._matrix("add_operator()").double())

    def extra_repr(self) -> str:
        kind = "conv" if self.conv else "matrix"
        return f"in={self.in_features}, out={self.out_features}, A={kind} {list(self.A.shape)}, dim={self.dim}"


def same_map(a: nn.Module, b: nn.Module) -> bool:
    """Whether two invertible modules are the same map (same object, or same structure and equal tensors)."""
    if a is b:
        return True
    if type(a) is not type(b) or repr(a) != repr(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    if isinstance(a, InvertibleSequential) and len(a.blocks) != len(b.blocks):
        return False
    return all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


__all__ = ["Linearizer", "InducedSpace", "LinearizerSVD", "same_map"]
