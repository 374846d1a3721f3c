"""Tabular reports: print as aligned text tables, serialize to JSON.

Example:
    >>> r = Report("sites", columns=["site", "relus"], rows=[{"site": "a", "relus": 4}], totals={"relus": 4})
    >>> print(r)  # doctest: +NORMALIZE_WHITESPACE
    sites
    site   relus
    -----  -----
    a      4
    total  4
    >>> r.to_dict()["totals"]
    {'relus': 4}
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0.0:
            return "0"
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """Render rows (dicts keyed by column) as a left-aligned text table."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@dataclass
class Report:
    """A titled table (rows of dicts) with optional totals and free-form summary values."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rows = list(self.rows)
        if self.totals:
            rows.append({self.columns[0]: "total", **self.totals})
        parts = [self.title, format_table(self.columns, rows)]
        if self.summary:
            parts.append("\n".join(f"{k}: {_fmt(v)}" for k, v in self.summary.items()))
        parts += self.notes
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {"title": self.title, "columns": self.columns, "rows": self.rows,
             "totals": self.totals, "summary": self.summary, "notes": self.notes}
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        return cls(d["title"], d["columns"], d.get("rows", []), d.get("totals", {}), d.get("summary", {}),
                   d.get("notes", []))

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (and return the path)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


@dataclass
class ReportGroup:
    """Several reports printed one after another and serialized together."""

    title: str
    reports: list[Report] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n\n".join([f"== {self.title} =="] + [str(r) for r in self.reports])

    def __getitem__(self, title: str) -> Report:
        for r in self.reports:
            if r.title == title:
                return r
        raise KeyError(f"no report titled {title!r}; have {[r.title for r in self.reports]}")

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "reports": [r.to_dict() for r in self.reports]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReportGroup":
        return cls(d["title"], [Report.from_dict(r) for r in d.get("reports", [])])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def group_accuracy(model: Any, data: Any, groups: Any = None) -> Report:
    """Accuracy per group (default: per class label), with the worst group and the largest gap.

    ``data`` is ``(inputs, labels)`` tensors or a list of such batches; ``groups`` is ``None``
    (groups = labels), a tensor/sequence with one group id per sample (in data order), or a
    callable ``fn(inputs, labels) -> group ids``.

    Example:
        >>> import torch
        >>> x = torch.eye(4); y = torch.tensor([0, 1, 2, 0])
        >>> r = group_accuracy(torch.nn.Identity(), (x, y), groups=torch.tensor([0, 0, 1, 1]))
        >>> [(row["group"], row["n"], row["accuracy"]) for row in r.rows], r.summary["worst_group"]
        ([(0, 2, 1.0), (1, 2, 0.5)], 1)
    """
    import torch

    from surgeon.core.errors import ConfigError

    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) \
            and isinstance(data[1], torch.Tensor) and data[0].shape[0] == data[1].shape[0]:
        batches = [tuple(data)]
    else:
        batches = [tuple(b) for b in data]
    n_total = sum(int(b[1].shape[0]) for b in batches)
    if groups is not None and not callable(groups):
        g_all = torch.as_tensor(groups).reshape(-1)
        if g_all.numel() != n_total:
            raise ConfigError(f"groups has {g_all.numel()} entries but the data has {n_total} samples; "
                              f"give one group id per sample, in data order")
    correct: dict[int, int] = {}
    count: dict[int, int] = {}
    offset = 0
    was = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            for x, y in batches:
                pred = model(x).argmax(-1)
                if groups is None:
                    g = y
                elif callable(groups):
                    g = torch.as_tensor(groups(x, y)).reshape(-1)
                    if g.numel() != y.numel():
                        raise ConfigError(f"groups(...) returned {g.numel()} ids for a batch of {y.numel()}")
                else:
                    g = g_all[offset:offset + y.shape[0]]
                offset += y.shape[0]
                for gid in torch.unique(g).tolist():
                    sel = g == gid
                    correct[gid] = correct.get(gid, 0) + int((pred[sel] == y[sel]).sum())
                    count[gid] = count.get(gid, 0) + int(sel.sum())
    finally:
        if hasattr(model, "train"):
            model.train(was)
    rows = [{"group": gid, "n": count[gid], "accuracy": correct[gid] / count[gid]} for gid in sorted(count)]
    accs = [r["accuracy"] for r in rows]
    overall = sum(correct.values()) / max(sum(count.values()), 1)
    worst = min(rows, key=lambda r: r["accuracy"]) if rows else None
    summary = {"accuracy": overall, "worst_group": worst["group"] if worst else None,
               "worst_accuracy": worst["accuracy"] if worst else None,
               "gap": (max(accs) - min(accs)) if accs else 0.0}
    return Report("accuracy per group", ["group", "n", "accuracy"], rows, {"n": sum(count.values()), "accuracy": overall},
                  summary)
