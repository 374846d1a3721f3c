"""The learnable mixing weights of a hybrid: γ (softmax terms) and λ (linear terms), per query head.

γ = sigmoid(logit) as in LoLCATs. λ = exp(LINEAR_WEIGHT_SCALE · a): a log-scale parameter whose
optimizer steps move λ by about ``LINEAR_WEIGHT_SCALE · lr`` in log space, so a λ that starts near 0
(the hybrid then equals sinks + window) reaches useful values within tens of steps.

Example:
    >>> lam = linear_weight_parameter(3, 1e-3)
    >>> [round(x, 6) for x in linear_weight(lam).tolist()]
    [0.001, 0.001, 0.001]
    >>> round(window_weight(window_weight_parameter(2, 0.1))[0].item(), 6)
    0.1
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

LINEAR_WEIGHT_SCALE = 10.0


def window_weight_parameter(n_heads: int, init: float) -> nn.Parameter:
    """γ's logit, one per head, so that sigmoid(logit) = ``init``."""
    return nn.Parameter(torch.full((n_heads,), math.log(init / (1 - init))))


def window_weight(logit: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logit)


def linear_weight_parameter(n_heads: int, init: float) -> nn.Parameter:
    """λ's scaled log, one per head, so that λ = ``init``."""
    return nn.Parameter(torch.full((n_heads,), math.log(init) / LINEAR_WEIGHT_SCALE))


def linear_weight(param: torch.Tensor) -> torch.Tensor:
    return (LINEAR_WEIGHT_SCALE * param).exp()
