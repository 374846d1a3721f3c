"""Invertible building blocks with exact, exportable inverses (for Linearizer sandwiches).

Every block maps a tensor to a tensor of the same shape, acting on one *feature* dimension
(``dim``, default ``-1``: per token / per row; ``1`` for channels-first images), and has
``forward(x)`` and ``inverse(z)``. Both directions use only elementwise ops, matmuls, slices and
concatenations, so both trace with ``torch.fx`` and export to ONNX (wrap a block in
:class:`InverseOf` to export its inverse as a graph of its own).

* :class:`ActNorm`: per-feature affine ``(x − shift)·exp(log_scale)`` with data-dependent init.
* :class:`AffineCoupling`: RealNVP/Glow coupling; the conditioner's last layer starts at zero (the
  block is the exact identity at init) and the log-scale is soft-clamped, ``c·tanh(s/c)``, so each
  coupling scales by a factor in ``(e^{-c}, e^{c})``.
* :class:`InvertibleLinear`: ``W = P·L·(U + diag(sign·exp(log_s)))`` (LU). The inverse solves two
  triangular systems while training; in eval mode it uses ``W⁻¹`` cached (float64) as a buffer,
  refreshed by ``.eval()`` and saved in the state dict, so the exported inverse has no solve op.
* :class:`Bias` and :class:`InverseActivation` (``φ⁻¹`` forward, ``φ`` inverse, for the bijective
  LeakyReLU, PReLU, ELU, tanh, sigmoid, softplus): the pieces of exact sandwiches.
* :class:`InvertibleSequential`: a chain, inverted in reverse order.

Example:
    >>> import torch
    >>> g = InvertibleSequential(ActNorm(6), InvertibleLinear(6, init="random"), AffineCoupling(6, hidden=16))
    >>> x = torch.randn(4, 6)
    >>> bool((g.inverse(g(x)) - x).abs().max() < 1e-5)
    True
"""
from __future__ import annotations

from typing import Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.core.errors import ConfigError
from surgeon.fx.tracing import SurgeonUnit

ActivationKind = Literal["leaky_relu", "prelu", "elu", "tanh", "sigmoid", "softplus"]
BIJECTIVE_ACTIVATIONS: tuple[str, ...] = ("leaky_relu", "prelu", "elu", "tanh", "sigmoid", "softplus")


def _last(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if dim == -1 else x.movedim(dim, -1)


def _back(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if dim == -1 else x.movedim(-1, dim)


class InvertibleBlock(SurgeonUnit):
    """Base class: ``forward`` and ``inverse`` on feature dimension ``dim`` (``features`` wide or any)."""

    features: int | None = None
    dim: int = -1

    def inverse(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"features={self.features}, dim={self.dim}"


class InverseOf(nn.Module):
    """A module whose ``forward`` is ``block.inverse`` (to trace or export the inverse direction)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if not hasattr(block, "inverse"):
            raise ConfigError(f"{type(block).__name__} has no inverse()")
        self.block = block

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.block.inverse(z)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ActNorm(InvertibleBlock):
    """``z = (x − shift) · exp(log_scale)`` per feature; identity at init; ``initialize`` standardises."""

    def __init__(self, features: int, dim: int = -1) -> None:
        super().__init__()
        self.features, self.dim = int(features), int(dim)
        self.shift = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, eps: float = 1e-6) -> "ActNorm":
        """Set shift/scale so that ``self(x)`` has zero mean and unit variance per feature."""
        rows = _last(x, self.dim).reshape(-1, self.features).double()
        return self.initialize_from_stats(rows.mean(0), rows.std(0, unbiased=False), eps)

    @torch.no_grad()
    def initialize_from_stats(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> "ActNorm":
        std = std.double()
        floor = eps * max(float(std.max()), 1.0)
        self.shift.copy_(mean.to(self.shift.dtype))
        self.log_scale.copy_((-torch.log(std.clamp_min(floor))).to(self.log_scale.dtype))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _back((_last(x, self.dim) - self.shift) * torch.exp(self.log_scale), self.dim)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return _back(_last(z, self.dim) * torch.exp(-self.log_scale) + self.shift, self.dim)


class Bias(InvertibleBlock):
    """``z = x − bias`` (the bias of the layer an exact sandwich absorbs)."""

    def __init__(self, bias: torch.Tensor, dim: int = -1) -> None:
        super().__init__()
        self.features, self.dim = int(bias.numel()), int(dim)
        self.bias = nn.Parameter(bias.detach().clone().reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _back(_last(x, self.dim) - self.bias, self.dim)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return _back(_last(z, self.dim) + self.bias, self.dim)


class InverseActivation(InvertibleBlock):
    """``forward = φ⁻¹``, ``inverse = φ`` for a bijective elementwise activation φ.

    ``inverse`` calls the very function the original layer called (``F.leaky_relu``, ``F.prelu``,
    ``F.elu``, ``torch.tanh``, ``torch.sigmoid``, ``F.softplus``) with the same parameters, so an
    exact sandwich reproduces the original layer bit for bit on its output path.
    """

    def __init__(self, kind: ActivationKind, *, slope: float = 0.01, alpha: float = 1.0, beta: float = 1.0,
                 threshold: float = 20.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if kind not in BIJECTIVE_ACTIVATIONS:
            raise ConfigError(f"{kind!r} is not a bijective activation; use one of {list(BIJECTIVE_ACTIVATIONS)}")
        self.kind = kind
        self.slope, self.alpha, self.beta, self.threshold = float(slope), float(alpha), float(beta), float(threshold)
        if kind == "leaky_relu" and not self.slope > 0:
            raise ConfigError(f"LeakyReLU with negative_slope={slope} is not bijective (needs a slope > 0)")
        if kind == "elu" and not self.alpha > 0:
            raise ConfigError(f"ELU with alpha={alpha} is not bijective (needs alpha > 0)")
        if kind == "softplus" and not self.beta > 0:
            raise ConfigError(f"Softplus with beta={beta} is not bijective (needs beta > 0)")
        if kind == "prelu":
            if weight is None:
                raise ConfigError("InverseActivation('prelu') needs the PReLU weight")
            if not bool((weight > 0).all()):
                raise ConfigError(f"PReLU with a weight <= 0 ({float(weight.min()):.3g}) is not bijective")
            self.weight = nn.Parameter(weight.detach().clone())

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # φ⁻¹
        k = self.kind
        if k == "leaky_relu":
            return F.leaky_relu(y, 1.0 / self.slope)
        if k == "prelu":
            return F.prelu(y, 1.0 / self.weight)
        if k == "elu":
            return torch.where(y > 0, y, torch.log1p(torch.clamp(y, max=0.0) / self.alpha))
        if k == "tanh":
            return torch.atanh(y)
        if k == "sigmoid":
            return torch.log(y) - torch.log1p(-y)
        # softplus: linear above threshold, log(expm1(β y)) / β below
        by = y * self.beta
        safe = torch.clamp(by, max=self.threshold)
        return torch.where(by > self.threshold, y, torch.log(torch.expm1(safe)) / self.beta)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:  # φ
        k = self.kind
        if k == "leaky_relu":
            return F.leaky_relu(z, self.slope)
        if k == "prelu":
            return F.prelu(z, self.weight)
        if k == "elu":
            return F.elu(z, self.alpha)
        if k == "tanh":
            return torch.tanh(z)
        if k == "sigmoid":
            return torch.sigmoid(z)
        return F.softplus(z, self.beta, self.threshold)


class InvertibleLinear(InvertibleBlock):
    """LU-parametrised invertible matrix on the feature dim: ``z = x Wᵀ``, ``W = P L (U + diag(σ e^{s}))``.

    ``init="identity"`` (default) starts at ``W = I``; ``"random"`` at a random rotation (Glow).
    """

    def __init__(self, features: int, dim: int = -1, init: Literal["identity", "random"] = "identity",
                 seed: int | None = None) -> None:
        super().__init__()
        self.features, self.dim = int(features), int(dim)
        d = self.features
        if init == "random":
            g = torch.Generator().manual_seed(0 if seed is None else seed)
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
            p, l, u = torch.linalg.lu(q)
            diag = torch.diagonal(u)
            perm, lower, upper = p, l - torch.eye(d, dtype=torch.float64), torch.triu(u, 1)
            sign, log_s = torch.sign(diag), torch.log(diag.abs())
        elif init == "identity":
            perm = torch.eye(d, dtype=torch.float64)
            lower = upper = torch.zeros(d, d, dtype=torch.float64)
            sign, log_s = torch.ones(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        else:
            raise ConfigError(f"InvertibleLinear init must be 'identity' or 'random', got {init!r}")
        self.register_buffer("perm", perm.float())
        self.register_buffer("sign", sign.float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(d, d), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(upper.float())
        self.log_s = nn.Parameter(log_s.float())
        self.register_buffer("weight_inv", torch.eye(d))
        self.refresh_inverse()

    def _factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        eye = torch.eye(self.features, dtype=self.lower.dtype, device=self.lower.device)
        upper_mask = self.lower_mask.t()
        lo = self.lower * self.lower_mask + eye
        up = self.upper * upper_mask + torch.diag(self.sign * torch.exp(self.log_s))
        if dtype is not None:
            return self.perm.to(dtype), lo.to(dtype), up.to(dtype)
        return self.perm, lo, up

    def weight(self) -> torch.Tensor:
        p, lo, up = self._factors()
        return p @ lo @ up

    def _solve_inverse(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        p, lo, up = self._factors(dtype)
        linv_pt = torch.linalg.solve_triangular(lo, p.t(), upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(up, linv_pt, upper=True)

    @torch.no_grad()
    def refresh_inverse(self) -> None:
        """Recompute the cached ``W⁻¹`` (float64, then stored in the buffer's dtype)."""
        self.weight_inv.copy_(self._solve_inverse(torch.float64).to(self.weight_inv.dtype))

    def train(self, mode: bool = True) -> "InvertibleLinear":
        super().train(mode)
        if not mode:
            self.refresh_inverse()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _back(_last(x, self.dim) @ self.weight().t(), self.dim)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        w_inv = self._solve_inverse() if self.training else self.weight_inv
        return _back(_last(z, self.dim) @ w_inv.t(), self.dim)


class AffineCoupling(InvertibleBlock):
    """Affine coupling: one part of the features conditions a scale and shift of the other part.

    ``z_b = x_b · exp(c·tanh(s(x_a)/c)) + t(x_a)``, ``z_a = x_a``. ``swap`` picks which half is
    conditioned. The conditioner is ``Linear → SiLU → Linear`` with the last layer zero-initialised,
    so a new coupling is exactly the identity.
    """

    def __init__(self, features: int, hidden: int = 64, dim: int = -1, clamp: float = 2.0, swap: bool = False) -> None:
        super().__init__()
        if features < 2:
            raise ConfigError(f"AffineCoupling needs at least 2 features to split, got {features}")
        if not clamp > 0:
            raise ConfigError(f"AffineCoupling clamp must be > 0, got {clamp}")
        self.features, self.dim, self.clamp, self.swap = int(features), int(dim), float(clamp), bool(swap)
        half = features // 2
        self.n_cond = features - half if swap else half
        self.n_out = features - self.n_cond
        self.net = nn.Sequential(nn.Linear(self.n_cond, hidden), nn.SiLU(), nn.Linear(hidden, 2 * self.n_out))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.swap:
            return x[..., self.n_out:], x[..., : self.n_out]
        return x[..., : self.n_cond], x[..., self.n_cond:]

    def _join(self, cond: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return torch.cat([other, cond], dim=-1) if self.swap else torch.cat([cond, other], dim=-1)

    def _scale_shift(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(cond)
        s = self.clamp * torch.tanh(h[..., : self.n_out] / self.clamp)
        return s, h[..., self.n_out:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cond, other = self._split(_last(x, self.dim))
        s, t = self._scale_shift(cond)
        return _back(self._join(cond, other * torch.exp(s) + t), self.dim)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        cond, other = self._split(_last(z, self.dim))
        s, t = self._scale_shift(cond)
        return _back(self._join(cond, (other - t) * torch.exp(-s)), self.dim)


class InvertibleSequential(InvertibleBlock):
    """A chain of invertible blocks; ``inverse`` runs them backwards. Empty = identity."""

    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        for b in blocks:
            if not hasattr(b, "inverse"):
                raise ConfigError(f"{type(b).__name__} is not invertible (it has no inverse())")
        self.blocks = nn.ModuleList(blocks)
        widths = {b.features for b in blocks if getattr(b, "features", None) is not None}
        if len(widths) > 1:
            raise ConfigError(f"the blocks of an InvertibleSequential act on different widths {sorted(widths)}")
        self.features = widths.pop() if widths else None
        dims = {getattr(b, "dim", -1) for b in blocks}
        self.dim = dims.pop() if len(dims) == 1 else -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for b in reversed(self.blocks):
            z = b.inverse(z)
        return z

    def append(self, block: nn.Module) -> "InvertibleSequential":
        if getattr(block, "features", None) is not None and self.features not in (None, block.features):
            raise ConfigError(f"cannot append a block of width {block.features} to a chain of width {self.features}")
        self.blocks.append(block)
        self.features = self.features or getattr(block, "features", None)
        return self


def coupling_stack(features: int, n: int, hidden: int = 64, dim: int = -1, clamp: float = 2.0,
                   mixing: bool = True, seed: int = 0) -> list[nn.Module]:
    """``n`` couplings alternating halves, each preceded by an identity-initialised LU mixing."""
    blocks: list[nn.Module] = []
    for i in range(n):
        if mixing:
            blocks.append(InvertibleLinear(features, dim=dim))
        blocks.append(AffineCoupling(features, hidden=hidden, dim=dim, clamp=clamp, swap=bool(i % 2)))
    return blocks


def as_invertible(g: nn.Module | Iterable[nn.Module] | None) -> InvertibleSequential | InvertibleBlock:
    """``None`` → identity chain; a list → :class:`InvertibleSequential`; a block stays as it is."""
    if g is None:
        return InvertibleSequential()
    if isinstance(g, nn.Module):
        if not hasattr(g, "inverse"):
            raise ConfigError(f"{type(g).__name__} is not invertible (it has no inverse()); build g from "
                              f"surgeon.ops.invertible blocks")
        return g
    return InvertibleSequential(*g)


__all__ = ["InvertibleBlock", "InverseOf", "ActNorm", "Bias", "InverseActivation", "InvertibleLinear",
           "AffineCoupling", "InvertibleSequential", "coupling_stack", "as_invertible", "BIJECTIVE_ACTIVATIONS"]

