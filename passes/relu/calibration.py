"""Calibration for ``LinearizeReLU`` masks: find the ReLUs that already act linearly on real data.

A ReLU whose input is almost never negative (or a ReLU6 whose input stays in [0, 6]) computes the
identity on that data, so replacing it by the identity changes little. ``linear_fraction`` measures,
per mask entry, the fraction of calibration elements on which ``act(x) == x``;
``linearize_near_linear`` zeroes the mask entries at or above a threshold.

Example:
    >>> import torch, torch.nn as nn, surgeon
    >>> from surgeon.passes import LinearizeReLU
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    >>> with torch.no_grad(): _ = net[0].bias.copy_(torch.tensor([100., 100., -100., -100.]))
    >>> s = surgeon.apply(net, LinearizeReLU(granularity="channel"), example_inputs=torch.randn(2, 3))
    >>> linear_fraction(s.model, [torch.randn(8, 3)])["1"].tolist()
    [1.0, 1.0, 0.0, 0.0]
    >>> linearize_near_linear(s.model, [torch.randn(8, 3)], min_fraction=0.99)
    {'1': 2}
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from surgeon.ops.activation import MaskedReLU, activation


def _reduce_to_mask(agree: torch.Tensor, mask_shape: Sequence[int]) -> torch.Tensor:
    """Mean of ``agree`` (batch, *per_example) over the batch and the dims the mask broadcasts over."""
    per_example = agree.float().mean(0)
    if len(mask_shape) == 0:
        return per_example.mean()
    dims = [d for d, size in enumerate(mask_shape) if size == 1 and per_example.shape[d] != 1]
    return per_example.mean(dim=dims, keepdim=True) if dims else per_example


def linear_fraction(model: nn.Module, batches: Iterable[torch.Tensor | tuple]) -> dict[str, torch.Tensor]:
    """Per MaskedReLU unit (by module path) and mask entry: fraction of inputs where ``act(x) == x``."""
    units = {name: m for name, m in model.named_modules() if isinstance(m, MaskedReLU)}
    sums: dict[str, torch.Tensor] = {}
    count = 0

    def hook(name: str):
        def record(module: MaskedReLU, inputs: tuple) -> None:
            x = inputs[0]
            frac = _reduce_to_mask(activation(module.kind, x) == x, module.mask.shape) * x.shape[0]
            sums[name] = sums.get(name, 0) + frac

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in units.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                inputs = batch if isinstance(batch, tuple) else (batch,)
                model(*inputs)
                count += inputs[0].shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: (total / max(count, 1)).reshape(units[name].mask.shape) for name, total in sums.items()}


def linearize_near_linear(
    model: nn.Module, batches: Sequence[torch.Tensor | tuple], min_fraction: float = 0.99
) -> dict[str, int]:
    """Zero the mask entries whose activation was linear on ``>= min_fraction`` of the calibration data.

    Returns the number of entries zeroed per unit.
    """
    fractions = linear_fraction(model, batches)
    zeroed = {}
    with torch.no_grad():
        for name, frac in fractions.items():
            unit = model.get_submodule(name)
            linear = frac >= min_fraction
            unit.mask[linear] = 0.0
            zeroed[name] = int(linear.sum())
    return zeroed
