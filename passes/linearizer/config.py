"""``LinearizerSandwich``: the config (see :mod:`surgeon.passes.linearizer.handler` for the pass).

Example:
    >>> from surgeon.passes.linearizer.config import LinearizerSandwich
    >>> LinearizerSandwich(mode="exact").to_dict()["mode"]
    'exact'
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from surgeon.core.config import TracedSelection
from surgeon.core.errors import ConfigError

Calibration = Callable | list | tuple | None


@dataclass(kw_only=True)
class LinearizerSandwich(TracedSelection):
    """Replace layers by Linearizers ``g_y⁻¹(A g_x(x))``: exact where possible, else fitted to calibration data.

    Args:
        mode: ``auto`` (exact pairs in the graph when no ``targets``; targeted modules: exact if they are a
            Linear/Conv + bijective activation, else fitted), ``exact`` (pairs only), ``fit`` (always fit).
        threshold: held-out R² (in g coordinates) at or above which a plain linear map replaces the module.
        ridge: ridge λ relative to the mean eigenvalue of ``Zₓᵀ Zₓ`` (0 = plain least squares).
        couplings / hidden / clamp: coupling blocks per side, conditioner width, soft clamp of log-scales.
        steps / lr / batch_rows / latent_weight / resolve_every: distillation of the couplings.
        holdout: fraction of calibration rows held out for R² and the fit errors.
        max_rows: rows (tokens / pixels) kept per site; max_condition: warn above this condition number.
        rank: low-rank A (``None`` = full).
        feature_dim: the dim of a module's inputs/outputs that holds features (``-1``; ``1`` for NCHW).
        kernel_size: for 4-D (NCHW) sites, the kernel of a convolution A (1 = per pixel).
        calibration: batches (tensors, tuples of args, or dicts of kwargs) or a callable returning them;
            runtime-only (not saved in the recipe; replay loads the fitted weights instead).
    """

    mode: Literal["auto", "exact", "fit"] = "auto"
    threshold: float = 0.99
    ridge: float = 1e-6
    couplings: int = 2
    hidden: int = 64
    clamp: float = 2.0
    steps: int = 300
    lr: float = 3e-3
    batch_rows: int = 512
    latent_weight: float = 0.1
    resolve_every: int = 25
    holdout: float = 0.2
    max_rows: int = 20000
    max_condition: float = 1e10
    rank: int | None = None
    feature_dim: int = -1
    kernel_size: int = 1
    seed: int = 0
    calibration: Calibration = None

    def check(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 and self.threshold != float("inf"):
            raise ConfigError(f"LinearizerSandwich.threshold must be in [0, 1], got {self.threshold}")
        if self.ridge < 0:
            raise ConfigError(f"LinearizerSandwich.ridge must be >= 0, got {self.ridge}")
        if self.couplings < 0 or self.steps < 0 or self.hidden < 1:
            raise ConfigError("LinearizerSandwich couplings/steps must be >= 0 and hidden >= 1")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"LinearizerSandwich.holdout must be in (0, 1), got {self.holdout}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"LinearizerSandwich.rank must be >= 1, got {self.rank}")
        if self.feature_dim not in (-1, 1):
            raise ConfigError(f"LinearizerSandwich.feature_dim must be -1 (features last) or 1 (channels first), "
                              f"got {self.feature_dim}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"LinearizerSandwich.kernel_size must be odd and >= 1, got {self.kernel_size}")


# ----------------------------------------------------------------------------------------------
# exact sandwiches
