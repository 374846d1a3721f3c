"""Rewrite passes, one module per family. Importing this package registers them.

Example:
    >>> from surgeon.passes import LinearizeReLU
    >>> LinearizeReLU(granularity="layer").to_dict()["granularity"]
    'layer'
"""
from surgeon.passes.relu import FinalizeReLU, LinearizeReLU

__all__ = ["LinearizeReLU", "FinalizeReLU"]
