"""When an onnxruntime output counts as PyTorch's: float noise passes, real divergence fails.

Two float32 engines never agree bit for bit: they sum in different orders, and a model with large
activations (SmolLM2's ~24,700 in ``layers.11.mlp.down_proj``) turns that into 2e-3 (200 tokens) to
1.1e-2 (512 tokens) absolute error in logits of magnitude ~20 — at an SNR above 100 dB, with identical
tokens. The defaults leave that noise a margin of about 4x on the element bound (2e-3·max|logit| ≈
4e-2) and 26 dB on the SNR floor (80 dB), while a relative error of 1e-4 spread over an output already
falls to 80 dB. A fixed absolute
tolerance either cries wolf on such a correct export or is so loose it misses a wrong one. A
:class:`Criterion` judges each output by

- an element bound scaled to the output: ``|ort − torch| ≤ atol + rtol·|torch| + scaled·max|torch|``
  (``atol`` / ``rtol`` given explicitly are used exactly as given, and then ``scaled`` is off);
- a signal-to-noise floor over the whole output: ``10·log10(Σ torch² / Σ (ort − torch)²) ≥ min_snr_db``;
- the same ratio per feature (each index of the last axis — a vocabulary entry, a channel — over every
  position) ``≥ min_local_snr_db`` wherever that feature's error exceeds half the element bound: a few
  hundred logits off by just under the bound leave the whole output's SNR above its floor but not
  their feature's (off with explicit ``atol`` / ``rtol``);
- the shapes: an output whose shape differs fails (never skipped);
- for logits, the tokens: greedy (argmax) agreement on every position that is not a near tie
  (PyTorch's top-2 margin above twice the scaled bound ``floor + scaled·max|torch|``), and the mean
  top-``top_k`` overlap. With the default element bound a decisive flip also breaks that bound; the
  token figures say what it means, and they still hold when an explicit, looser atol is given.

Float noise shrinks all three together; a wrong weight, constant, position or state update breaks
at least one (``tests/export/test_verify_faults.py`` injects each and checks it fails).

Example:
    >>> import numpy as np
    >>> ref = np.random.default_rng(0).normal(0, 5, (8, 100)).astype(np.float32)
    >>> c = Criterion()
    >>> c.check("logits", ref + 1e-4, ref, tokens=True).passed          # float noise
    True
    >>> c.check("logits", ref * 1.01, ref, tokens=True).passed          # a 1 % error
    False
    >>> Criterion(atol=1e-5, rtol=0.0).check("y", ref + 1e-4, ref).passed  # explicit bounds are exact
    False
    >>> local = ref.copy(); local[:, 7] += 0.9 * c.element_bound(ref)       # one feature, under the bound
    >>> c.check("logits", local, ref).reasons[-1].split(" with")[0]
    '1 feature(s) (last-axis index 7)'
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from surgeon.core.errors import ConfigError

__all__ = ["Criterion", "OutputVerdict", "DEFAULT_CRITERION"]


@dataclass
class OutputVerdict:
    """One output checked against its reference; ``reasons`` says what failed (empty when passed)."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    bound: float                 # the largest per-element bound applied
    n_bad: int                   # elements beyond their bound (NaN counts)
    numel: int
    snr_db: float
    finite: bool
    greedy_agreement: float | None = None     # logits only: argmax agreement on non-tie positions
    near_ties: int | None = None              # positions excluded as near ties
    top_k_overlap: float | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass(frozen=True)
class Criterion:
    """The acceptance test :func:`surgeon.export.verify` applies to every output (see the module doc).

    Any threshold set to ``None`` is not checked. ``atol`` / ``rtol`` (both default ``None``): an
    explicit element bound, honoured exactly; when either is given, ``scaled`` is not used.
    """

    atol: float | None = None
    rtol: float | None = None
    scaled: float = 2e-3
    min_snr_db: float | None = 80.0
    min_local_snr_db: float | None = 60.0   # per feature (last-axis index), where its error is > half the bound
    min_greedy: float | None = 1.0
    top_k: int = 5
    min_top_k_overlap: float | None = 0.95
    floor: float = 1e-6              # absolute floor of the scaled bound (outputs that are ~0)

    @staticmethod
    def resolve(criterion: "Criterion | None", atol: float | None = None, rtol: float | None = None) -> "Criterion":
        """``criterion`` (default :data:`DEFAULT_CRITERION`) with an explicit ``atol`` / ``rtol`` put in.

        Example:
            >>> Criterion.resolve(None, atol=1e-4).describe().split(";")[0]
            '|ort − torch| ≤ 0.0001 + 0·|torch| per element (explicit)'
        """
        base = DEFAULT_CRITERION if criterion is None else criterion
        if not isinstance(base, Criterion):
            raise ConfigError(f"criterion must be a surgeon.export.Criterion, got {type(base).__name__}")
        if atol is None and rtol is None:
            return base
        for name, value in (("atol", atol), ("rtol", rtol)):
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number ≥ 0 (an element bound |ort − torch| ≤ atol + "
                                  f"rtol·|torch|), got {value!r}; leave both unset for the scaled default")
        return replace(base, atol=float(atol or 0.0), rtol=float(rtol or 0.0))

    @property
    def explicit(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def element_bound(self, ref: np.ndarray) -> np.ndarray | float:
        """Per-element bound on ``|ort − torch|`` for reference values ``ref``."""
        mag = np.abs(ref)
        if self.explicit:
            return (self.atol or 0.0) + (self.rtol or 0.0) * mag
        peak = float(mag.max()) if mag.size else 0.0
        return self.floor + self.scaled * peak

    def describe(self) -> str:
        """One line for reports: what an output must satisfy."""
        if self.explicit:
            parts = [f"|ort − torch| ≤ {self.atol or 0:g} + {self.rtol or 0:g}·|torch| per element (explicit)"]
        else:
            parts = [f"|ort − torch| ≤ {self.floor:g} + {self.scaled:g}·max|torch| per element"]
        if self.min_snr_db is not None:
            parts.append(f"SNR ≥ {self.min_snr_db:g} dB")
        if self.min_local_snr_db is not None and not self.explicit:
            parts.append(f"per-feature SNR ≥ {self.min_local_snr_db:g} dB where its error > half the bound")
        if self.min_greedy is not None:
            parts.append(f"logits: greedy agreement ≥ {self.min_greedy:.0%} off near ties")
        if self.min_top_k_overlap is not None:
            parts.append(f"top-{self.top_k} overlap ≥ {self.min_top_k_overlap:.0%}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}

    def check(self, name: str, got: np.ndarray, ref: np.ndarray, *, tokens: bool = False) -> OutputVerdict:
        """Compare ``got`` (onnxruntime) with ``ref`` (PyTorch); ``tokens``: last axis is a vocabulary."""
        got, ref = np.asarray(got), np.asarray(ref)
        if got.shape != ref.shape:
            return OutputVerdict(name, list(ref.shape), float("nan"), float("nan"), 0.0, int(ref.size), int(ref.size),
                                 float("-inf"), True, reasons=[f"shape {list(got.shape)} in onnxruntime, "
                                                               f"{list(ref.shape)} in PyTorch"])
        if got.dtype == np.bool_ or ref.dtype == np.bool_:
            bad = int((got != ref).sum())
            return OutputVerdict(name, list(ref.shape), float(bad), 0.0, 0.0, bad, int(ref.size),
                                 float("inf"), True, reasons=[f"{bad} flags differ"] if bad else [])
        a, b = got.astype(np.float64), ref.astype(np.float64)
        if a.size == 0:
            return OutputVerdict(name, list(b.shape), 0.0, 0.0, 0.0, 0, 0, float("inf"), True)
        err = np.abs(a - b)
        finite = bool(np.isfinite(a).all())
        bound = self.element_bound(b)
        n_bad = int((~(err <= bound)).sum())                    # NaN counts as bad
        noise = float(np.nansum(err ** 2)) if finite else float("inf")
        signal = float((b ** 2).sum())
        with np.errstate(divide="ignore", over="ignore"):       # noise may overflow to inf: SNR -inf
            snr = float("inf") if noise == 0 else (float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf"))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = err / (np.abs(b) + 1e-12)
            max_rel = float(np.nanmax(rel)) if finite else float("nan")
        v = OutputVerdict(name, list(b.shape), float(np.nanmax(err)) if finite else float("nan"), max_rel,
                          float(np.max(bound)), n_bad, int(b.size), snr, finite)
        if not finite:
            v.reasons.append("onnxruntime returned NaN/inf")
        if n_bad:
            v.reasons.append(f"{n_bad} of {b.size} elements beyond the element bound (max abs {v.max_abs:.3e}, "
                             f"bound {v.bound:.3e})")
        # SNR only once an error exceeds the absolute floor: an all-zero output with 1e-9 noise is equal
        if self.min_snr_db is not None and snr < self.min_snr_db and not v.max_abs <= self.floor:
            v.reasons.append(f"SNR {snr:.1f} dB < {self.min_snr_db:g} dB")
        if self.min_local_snr_db is not None and finite and not self.explicit:
            self._check_features(v, err, b)
        if tokens and finite and b.ndim >= 1 and b.shape[-1] > 1:
            noise = self.floor + self.scaled * float(np.abs(b).max())     # the scaled bound, even when explicit
            self._check_tokens(v, a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), noise)
        return v

    def _check_features(self, v: OutputVerdict, err: np.ndarray, b: np.ndarray) -> None:
        """SNR of each feature (an index of the last axis: a vocabulary entry, a channel) over every position.

        A fault confined to a few hundred elements barely moves the output's SNR; within its feature it
        does. Float noise spreads over the features (a large activation raises whole positions, which each
        feature averages). Judged only where the feature's error exceeds half the element bound.
        """
        if b.ndim < 2 or b.size // b.shape[-1] < 8:
            return
        e2, b2 = (err ** 2).reshape(-1, b.shape[-1]), (b ** 2).reshape(-1, b.shape[-1])
        judged = e2.max(0) > (0.5 * (self.floor + self.scaled * float(np.abs(b).max()))) ** 2
        if not judged.any():
            return
        with np.errstate(divide="ignore"):
            local = 10 * np.log10(b2[:, judged].sum(0) / e2[:, judged].sum(0))
        low = local < self.min_local_snr_db
        if low.any():
            features = np.flatnonzero(judged)[low]
            v.reasons.append(f"{low.sum()} feature(s) (last-axis index {', '.join(map(str, features[:5]))}"
                             f"{' ...' if low.sum() > 5 else ''}) with SNR {float(local.min()):.1f} dB < "
                             f"{self.min_local_snr_db:g} dB over their {b.size // b.shape[-1]} positions: an "
                             "error confined to them, not float noise")

    def _check_tokens(self, v: OutputVerdict, a: np.ndarray, b: np.ndarray, bound: float) -> None:
        top2 = np.sort(b, axis=-1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * bound        # a flip within the bound is a near tie
        agree = a.argmax(-1) == b.argmax(-1)
        v.near_ties = int((~decisive).sum())
        v.greedy_agreement = float(agree[decisive].mean()) if decisive.any() else 1.0
        k = min(self.top_k, b.shape[-1])
        top_a = np.argpartition(-a, k - 1, axis=-1)[:, :k]
        top_b = np.argpartition(-b, k - 1, axis=-1)[:, :k]
        v.top_k_overlap = float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(top_a, top_b)]))
        if self.min_greedy is not None and v.greedy_agreement < self.min_greedy:
            v.reasons.append(f"greedy tokens agree on {v.greedy_agreement:.2%} of {int(decisive.sum())} positions "
                             f"that are not near ties (< {self.min_greedy:.0%})")
        if self.min_top_k_overlap is not None and v.top_k_overlap < self.min_top_k_overlap:
            v.reasons.append(f"top-{k} overlap {v.top_k_overlap:.2%} < {self.min_top_k_overlap:.0%}")


DEFAULT_CRITERION = Criterion()
