"""argparse value types shared by every ``surgeon`` verb: a bad value exits 2 with the option and the fix.

argparse turns the ``ArgumentTypeError`` these raise into ``surgeon VERB: error: argument --atol: ...``
and exit status 2, the status the CLI gives every input error (1 is kept for a failed check).

Example:
    >>> non_negative_float("1e-4"), positive_int("3"), fraction("0.95")
    (0.0001, 3, 0.95)
    >>> non_negative_float("nan")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be a finite number >= 0, got 'nan'
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

__all__ = ["non_negative_float", "positive_float", "positive_int", "non_negative_int", "fraction", "shape",
           "one_of"]


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite float ``>= 0`` (tolerances, minutes)."""
    value = _float(text, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float ``> 0``."""
    value = _float(text, "a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A float in ``(0, 1]``."""
    value = _float(text, "a fraction in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def _int(text: str, low: int) -> int:
    what = f"an integer >= {low}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer ``>= 1`` (steps, windows, threads, batch sizes)."""
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    """An integer ``>= 0`` (a window or sink count where 0 means none)."""
    return _int(text, 0)


def shape(text: str) -> tuple[int, ...]:
    """A tensor shape such as ``2,3,224,224``: positive integers separated by commas."""
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 2,3,224,224, got {text!r}") from None
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"shape must hold positive sizes (like 2,3,224,224), got {text!r}")
    return dims


def one_of(choices: Sequence[str], what: str = "value") -> Callable[[str], str]:
    """A string from ``choices`` (an error lists them), for options whose ``const`` argparse's ``choices`` skips."""
    def check(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; use one of {', '.join(choices)}")
        return text
    check.__name__ = what.replace(" ", "_")
    return check
