"""Intervals for fidelity figures: percentile bootstrap over prompts, paired differences, Wilson for counts.

Every figure of :mod:`surgeon.fidelity` is reported with its n and a 95 % interval; a difference whose
interval contains 0 is a tie.

Example:
    >>> lo, hi = bootstrap_ci([0.5, 0.6, 0.7, 0.8])
    >>> 0.5 <= lo <= 0.65 <= hi <= 0.8
    True
    >>> [round(x, 3) for x in wilson(8, 10)]
    [0.49, 0.943]
    >>> verdict((0.01, 0.05)), verdict((-0.02, 0.03))
    ('better', 'tie')
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from surgeon.core.errors import ConfigError

Z95 = 1.959963984540054


def _resamples(n: int, draws: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (draws, n), generator=g)


def bootstrap_ci(values: Sequence[float], weights: Sequence[float] | None = None, draws: int = 2000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the (weighted) mean of per-prompt ``values``, resampling prompts."""
    x = torch.as_tensor(list(values), dtype=torch.float64)
    if x.numel() == 0:
        raise ConfigError("bootstrap_ci: no values")
    w = torch.ones_like(x) if weights is None else torch.as_tensor(list(weights), dtype=torch.float64)
    idx = _resamples(x.numel(), draws, seed)
    means = (x[idx] * w[idx]).sum(1) / w[idx].sum(1).clamp_min(1e-300)
    a = (1 - level) / 2
    return float(means.quantile(a)), float(means.quantile(1 - a))


def ratio_ci(num: Sequence[float], den: Sequence[float], counts: Sequence[float], draws: int = 2000, seed: int = 0,
             transform: Callable[[torch.Tensor], torch.Tensor] = torch.exp) -> tuple[float, float]:
    """Interval of ``transform((Σ num − Σ den) / Σ counts)`` resampling prompts: a perplexity ratio from
    per-prompt summed NLLs of the model (``num``) and the reference (``den``) over ``counts`` tokens."""
    a, b, c = (torch.as_tensor(list(v), dtype=torch.float64) for v in (num, den, counts))
    idx = _resamples(a.numel(), draws, seed)
    r = transform((a[idx].sum(1) - b[idx].sum(1)) / c[idx].sum(1))
    return float(r.quantile(0.025)), float(r.quantile(0.975))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Interval of mean(a − b) over prompts scored by both (a paired bootstrap)."""
    if len(a) != len(b):
        raise ConfigError(f"paired_diff_ci: {len(a)} vs {len(b)} values; pair them by prompt")
    return bootstrap_ci([x - y for x, y in zip(a, b)], draws=draws, seed=seed)


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion ``successes / n``."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    d = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / d
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def verdict(interval: tuple[float, float], higher_is_better: bool = True) -> str:
    """``better`` / ``worse`` when the interval of a difference excludes 0, else ``tie``."""
    lo, hi = interval
    if lo > 0:
        return "better" if higher_is_better else "worse"
    if hi < 0:
        return "worse" if higher_is_better else "better"
    return "tie"
