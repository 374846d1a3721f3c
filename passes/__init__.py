"""Rewrite passes, one module per family. Importing this package registers them.

Example:
    >>> from surgeon.passes import LinearizeReLU
    >>> LinearizeReLU(granularity="layer").to_dict()["granularity"]
    'layer'
"""
from surgeon.passes.attention.handler import LinearizeAttention
from surgeon.passes.relu.handler import FinalizeReLU, LinearizeReLU, masked_units
from surgeon.passes.relu.calibration import linear_fraction, linearize_near_linear
from surgeon.passes.relu.budget import (
    BudgetResult, BudgetSearchConfig, fit_polynomials, kept_relus, search_relu_budget, select_top_k, total_relus,
)
from surgeon.passes.relu.fold import fold_linear_ops
from surgeon.passes.linearizer.handler import LinearizerSandwich
from surgeon.passes.linear_blocks.handler import ReplaceLinearBlocks, block_linearity

__all__ = ["LinearizeAttention", "LinearizeReLU", "FinalizeReLU", "masked_units", "linear_fraction", "linearize_near_linear"]
__all__ += ["search_relu_budget", "BudgetSearchConfig", "BudgetResult", "select_top_k", "fit_polynomials",
            "kept_relus", "total_relus", "fold_linear_ops"]
__all__ += ["LinearizerSandwich", "ReplaceLinearBlocks", "block_linearity"]
