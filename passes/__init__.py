"""Rewrite passes, one module per family. Importing this package registers them.

Example:
    >>> from surgeon.passes import LinearizeReLU
    >>> LinearizeReLU(granularity="layer").to_dict()["granularity"]
    'layer'
"""
from surgeon.passes.attention import LinearizeAttention
from surgeon.passes.relu import FinalizeReLU, LinearizeReLU, masked_units
from surgeon.passes.relu_calibration import linear_fraction, linearize_near_linear

__all__ = ["LinearizeAttention", "LinearizeReLU", "FinalizeReLU", "masked_units", "linear_fraction", "linearize_near_linear"]
