"""Configs of the ReLU passes: ``LinearizeReLU`` (masks in) and ``FinalizeReLU`` (masks frozen).

Example:
    >>> LinearizeReLU(granularity="layer", targets=["relu"]).to_dict()["targets"]
    ['relu']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from surgeon.core.config import SiteSelection, TracedSelection
from surgeon.core.errors import ConfigError
from surgeon.passes.relu.budget import check_budget_value


@dataclass(kw_only=True)
class LinearizeReLU(TracedSelection):
    """Make ReLU call sites linearizable: ``m ⊙ relu(x) + (1 − m) ⊙ x`` with a trainable mask.

    Args:
        granularity: one mask value per site (``layer``), per channel, or per element (``pixel``).
            ``channel`` and ``pixel`` need ``example_inputs`` (a fixed input shape).
        init: initial mask value; 1.0 reproduces the original model exactly, 0.0 linearizes.
        channel_dim: the activation dim that holds channels (1 for NCHW / (B, F); -1 for (B, T, F)).
        targets / exclude / filter_fn: site selection (see ``surgeon.core.selectors``).
        leaf_modules / leaf_fn: modules traced as opaque calls (their insides are not rewritten).
        budget: ReLUs to keep after a budget search (``surgeon.passes.search_relu_budget``): an int
            count of ReLU elements per example, or a float fraction in (0, 1] of the selected
            sites' ReLUs. Checked here against the model (needs ``example_inputs``); ``None`` = no budget.
        units: what replaces a removed ReLU: ``identity`` or ``poly`` (per-channel c₂x² + c₁x + c₀,
            started at the identity; fit it with ``surgeon.passes.fit_polynomials`` on real data).
    """

    granularity: Literal["layer", "channel", "pixel"] = "channel"
    init: float = 1.0
    channel_dim: int = 1
    budget: int | float | None = None
    units: Literal["identity", "poly"] = "identity"

    def check(self) -> None:
        if not 0.0 <= self.init <= 1.0:
            raise ConfigError(f"LinearizeReLU.init must be in [0, 1], got {self.init}")
        if self.budget is not None:
            check_budget_value(self.budget)


@dataclass(kw_only=True)
class FinalizeReLU(SiteSelection):
    """Freeze masks to 0/1 (``mask >= threshold``); drop identity sites, restore plain ReLUs."""

    threshold: float = 0.5
    #: after freezing, fold what became adjacent linear ops where exact (BatchNorm into the conv /
    #: linear before it; consecutive linear layers / 1×1 convolutions when that does not add MACs)
    fold: bool = False

    def check(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"FinalizeReLU.threshold must be in (0, 1], got {self.threshold}")
