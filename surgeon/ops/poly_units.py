"""Polynomial replacement units for private inference (AutoReP-style degree-2 units).

Where a ReLU is removed, a site may use ``c₂x² + c₁x + c₀`` (per channel) instead of the identity.
Each polynomial element costs one secure multiplication (one HE depth level) instead of a garbled
ReLU, so reports count them separately (``poly_count``).

The coefficients start at the identity (``c = (0, 1, 0)``), so a freshly linearized model is still
exact; :func:`surgeon.passes.fit_polynomials` then fits them by least squares to the activation
under each channel's input distribution (the closed-form fit from the moments E[xᵏ], k ≤ 4, and
E[xᵏ·act(x)], k ≤ 2), with optional clipping of the coefficients.

Example:
    >>> import torch
    >>> unit = MaskedPolyReLU("relu", mask_shape=(3, 1, 1), coef_shape=(3, 1, 1))
    >>> x = torch.randn(2, 3, 4, 4)
    >>> torch.equal(unit(x), torch.relu(x))
    True
    >>> _ = unit.mask.data.zero_(); torch.allclose(unit(x), x)      # identity until fitted
    True
    >>> unit.poly_count([2, 3, 4, 4])
    48
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from surgeon.fx.tracing import SurgeonUnit
from surgeon.ops.activation import ActKind, BinaryMaskedReLU, MaskedReLU, activation, count_kept


def poly_eval(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``c₂x² + c₁x + c₀`` with ``coef`` of shape (3, *broadcastable per-example shape)``."""
    c = coef.to(x.dtype)
    return (c[2] * x + c[1]) * x + c[0]


def _identity_coef(coef_shape: Sequence[int]) -> torch.Tensor:
    coef = torch.zeros((3, *coef_shape))
    coef[1] = 1.0
    return coef


class MaskedPolyReLU(MaskedReLU):
    """``m ⊙ act(x) + (1 − m) ⊙ (c₂x² + c₁x + c₀)``; trainable mask and per-channel coefficients."""

    def __init__(self, kind: ActKind, mask_shape: Sequence[int] = (), coef_shape: Sequence[int] = ()) -> None:
        super().__init__(kind, mask_shape)
        self.coef = nn.Parameter(_identity_coef(coef_shape))
        self.register_buffer("calibrated", torch.tensor(False))

    def linear_part(self, x: torch.Tensor) -> torch.Tensor:
        return poly_eval(self.coef, x)

    def poly_count(self, shape: Sequence[int]) -> int:
        """Elements per example that go through the polynomial (mask entry 0)."""
        per_example = 1
        for d in shape[1:]:
            per_example *= int(d)
        return per_example - self.relu_count(shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", coef_shape={tuple(self.coef.shape[1:])}, calibrated={bool(self.calibrated)}"


class BinaryMaskedPoly(BinaryMaskedReLU):
    """Frozen 0/1 mask: ``act(x)`` where the mask is 1, the fitted polynomial where it is 0."""

    def __init__(self, kind: ActKind, mask: torch.Tensor, coef: torch.Tensor) -> None:
        super().__init__(kind, mask)
        self.coef = nn.Parameter(coef.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, activation(self.kind, x), poly_eval(self.coef, x))

    def poly_count(self, shape: Sequence[int]) -> int:
        per_example = 1
        for d in shape[1:]:
            per_example *= int(d)
        return per_example - count_kept(self.mask, shape)


class PolyUnit(SurgeonUnit):
    """A site whose every element is polynomial: ``c₂x² + c₁x + c₀`` (per channel)."""

    def __init__(self, coef: torch.Tensor) -> None:
        super().__init__()
        self.coef = nn.Parameter(coef.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return poly_eval(self.coef, x)

    def poly_count(self, shape: Sequence[int]) -> int:
        per_example = 1
        for d in shape[1:]:
            per_example *= int(d)
        return per_example

    def relu_count(self, shape: Sequence[int]) -> int:
        return 0


def least_squares_coef(moments: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Solve the 3×3 normal equations per channel.

    Args:
        moments: (5, *C) running sums of ``xᵏ`` for k = 0..4.
        targets: (3, *C) running sums of ``xᵏ·act(x)`` for k = 0..2.
    Returns:
        (3, *C) coefficients (c₀, c₁, c₂) minimising Σ (c₂x² + c₁x + c₀ − act(x))².
    """
    m = moments.double()
    flat_m = m.reshape(5, -1).T  # (C, 5)
    flat_t = targets.double().reshape(3, -1).T  # (C, 3)
    gram = torch.stack([flat_m[:, i:i + 3] for i in range(3)], dim=1)  # (C, 3, 3): E[x^(i+j)]
    scale = gram.diagonal(dim1=1, dim2=2).abs().amax(-1, keepdim=True).clamp_min(1e-30)
    gram = gram + ridge * scale[..., None] * torch.eye(3, dtype=gram.dtype)
    coef = torch.linalg.solve(gram, flat_t[..., None])[..., 0]  # (C, 3)
    return coef.T.reshape(targets.shape).float()
