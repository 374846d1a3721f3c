"""Offline data for calibration and evaluation (CPython's documentation prose)."""
