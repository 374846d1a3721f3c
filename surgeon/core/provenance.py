"""Provenance of a results file: the commit, versions, threads, load and counts a number was measured with.

Every ``benchmarks/results/*.json`` carries a ``provenance`` object made here, so a figure can be traced
to the code and the machine state that produced it (``tests/docs`` refuses results files without one).

Example:
    >>> p = provenance(counts={"prompts": 12})
    >>> sorted(p) == sorted(["commit", "dirty", "python", "torch", "transformers", "threads", "loadavg",
    ...                       "platform", "time_utc", "counts"])
    True
    >>> p["counts"]["prompts"], p["threads"] >= 1
    (12, True)
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - an absent optional package is recorded as such
        return "not installed"


def provenance(counts: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance record of a measurement made now.

    Args:
        counts: what was actually used (prompts, windows, trials, seeds, tokens, repeats, ...).
        extra: anything else worth recording (e.g. ``seed=0``).

    Returns:
        ``commit`` (HEAD, with ``dirty`` true when the tree has uncommitted changes), ``python``, ``torch``,
        ``transformers``, ``threads`` (torch's intra-op threads), ``loadavg`` (1/5/15-minute load when the
        record was made; rerun timings taken above 2.5 on this 2-core machine), ``platform``, ``time_utc``
        and ``counts``.
    """
    import torch  # noqa: PLC0415 - keep `import surgeon.core` light for tools that only read results

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) and status != "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "threads": torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "platform": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cpus, {sys.implementation.name}",
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "counts": dict(counts or {}),
        **extra,
    }
