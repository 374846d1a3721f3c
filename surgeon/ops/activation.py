"""ReLU-family building blocks: recognise ReLU call sites in FX graphs, and the linearizable units.

A linearizable unit computes ``y = m ⊙ act(x) + (1 − m) ⊙ x`` where ``act`` is ReLU or ReLU6 and the
linear unit is the identity. With ``m = 1`` it is exactly ``act(x)``.

ReLU-count convention (used by every report): a site's ReLU count is the number of elements *per
example* (one input sample, batch dimension excluded) on which the nonlinearity is evaluated, i.e. the
elements whose mask entry is non-zero. A ReLU6 element counts as one ReLU (its upper clip at 6 is
counted with it). Identity elements count zero.

Example:
    >>> import torch
    >>> unit = MaskedReLU("relu", mask_shape=(3, 1, 1))
    >>> x = torch.randn(2, 3, 4, 4)
    >>> torch.equal(unit(x), torch.relu(x))
    True
    >>> unit.relu_count([2, 3, 4, 4])
    48
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgeon.fx import patterns as graph_patterns
from surgeon.fx.tracing import SurgeonUnit

ActKind = Literal["relu", "relu6"]
Granularity = Literal["layer", "channel", "pixel"]

def relu_kind(node: fx.Node, gm: fx.GraphModule | None = None) -> ActKind | None:
    """Which ReLU-family activation this node computes (``None`` if it is not one).

    Recognises ``nn.ReLU``/``nn.ReLU6`` modules, ``F.relu``/``torch.relu``/``relu_`` (functions and
    methods, in-place too), ``F.relu6``, ``F.hardtanh(x, 0, 6)`` and ``clamp``/``clip`` with bounds 0 (and 6),
    on ``symbolic_trace``, dynamo and ``torch.export`` (ATen) graphs alike: the table lives in
    :mod:`surgeon.fx.patterns`.
    """
    return graph_patterns.relu_kind(node, gm)


def is_inplace(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    """True for ``relu_``, ``inplace=True`` calls and ``nn.ReLU(inplace=True)`` modules (any graph source)."""
    return graph_patterns.is_inplace(node, gm)


def activation(kind: ActKind, x: torch.Tensor) -> torch.Tensor:
    """Out-of-place ReLU or ReLU6."""
    return torch.relu(x) if kind == "relu" else F.relu6(x)


def mask_shape(granularity: Granularity, shape: Sequence[int] | None, channel_dim: int) -> tuple[int, ...]:
    """Shape of a per-example mask for an activation of full (batched) ``shape``.

    ``layer`` → ``()``; ``channel`` → size of ``channel_dim`` broadcast over the other dims; ``pixel`` →
    the whole per-example shape.
    """
    if granularity == "layer":
        return ()
    assert shape is not None, "shape needed for channel/pixel masks"
    if granularity == "pixel":
        return tuple(shape[1:])
    dim = channel_dim % len(shape)
    if dim == 0:
        raise ValueError("channel_dim cannot be the batch dimension")
    return tuple(shape[d] if d == dim else 1 for d in range(1, len(shape)))


def count_kept(mask: torch.Tensor, shape: Sequence[int]) -> int:
    """Elements per example on which the nonlinearity runs, for a mask broadcast to ``shape[1:]``."""
    per_example = math.prod(shape[1:])
    if mask.numel() == 0:
        return 0
    kept_fraction = (mask != 0).sum().item() / mask.numel()
    return int(round(kept_fraction * per_example))


def _adopt_mask_shape(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """A budget search may widen a mask (a partially kept channel becomes per-element): take the
    saved shape when it differs, so ``surgeon.restore`` reloads such masks."""
    key = prefix + "mask"
    incoming = state_dict.get(key)
    current = getattr(module, "mask", None)
    if incoming is None or current is None or incoming.shape == current.shape:
        return
    fresh = torch.zeros(incoming.shape, dtype=current.dtype, device=current.device)
    if isinstance(current, nn.Parameter):
        module.mask = nn.Parameter(fresh, requires_grad=current.requires_grad)
    else:
        module._buffers["mask"] = fresh


class MaskedReLU(SurgeonUnit):
    """``m ⊙ act(x) + (1 − m) ⊙ x`` with a trainable mask ``m`` (initialised to 1: exactly ``act``)."""

    def __init__(self, kind: ActKind, mask_shape: Sequence[int] = ()) -> None:
        super().__init__()
        self.kind = kind
        self.mask = nn.Parameter(torch.ones(tuple(mask_shape)))

    #: how the stored mask becomes the blend weight: ``None`` uses it as is (SNL-style continuous
    #: mask), ``"ste"`` uses the hard 0/1 value ``mask > 0`` forward and passes gradients straight
    #: through to the scores (AutoReP-style). Set by the budget search; never saved.
    gate: str | None = None

    def mask_value(self, dtype: torch.dtype) -> torch.Tensor:
        """The blend weight ``m`` in [0, 1] the forward pass uses (see ``gate``)."""
        m = self.mask.to(dtype)
        if self.gate == "ste":
            hard = (m > 0).to(dtype)
            return hard + m - m.detach()
        return m

    def linear_part(self, x: torch.Tensor) -> torch.Tensor:
        """What replaces the activation where the mask is 0 (identity here)."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask_value(x.dtype)
        return m * activation(self.kind, x) + (1 - m) * self.linear_part(x)

    def relu_count(self, shape: Sequence[int]) -> int:
        mask = self.mask.detach()
        return count_kept(mask > 0 if self.gate == "ste" else mask, shape)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, mask_shape={tuple(self.mask.shape)}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        _adopt_mask_shape(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class BinaryMaskedReLU(SurgeonUnit):
    """Frozen 0/1 mask: ``act(x)`` where the mask is 1, ``x`` where it is 0 (exact ``torch.where``)."""

    def __init__(self, kind: ActKind, mask: torch.Tensor) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, activation(self.kind, x), x)

    def relu_count(self, shape: Sequence[int]) -> int:
        return count_kept(self.mask, shape)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, kept={int(self.mask.sum())}/{self.mask.numel()}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        _adopt_mask_shape(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def plain_activation_target(kind: ActKind):
    """The functional op a finalized all-ReLU site becomes."""
    return torch.relu if kind == "relu" else F.relu6


