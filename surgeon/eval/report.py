"""Evaluation results of several routes side by side: JSON and a markdown table (one column per route).

Example:
    >>> r = EvalReport(routes=["original", "surgered"], tasks=["t"],
    ...                metrics={"original": {"t": {"acc": 0.5}}, "surgered": {"t": {"acc": 0.25}}})
    >>> print(r.to_markdown())
    | task | metric | original | surgered |
    |---|---|---|---|
    | t | acc | 0.5 | 0.25 |
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass
class EvalReport:
    """``metrics[route][task][metric]``; ``skipped[route]`` lists tasks a route cannot run (with why)."""

    routes: list[str]
    tasks: list[str]
    metrics: dict[str, dict[str, dict[str, float]]]
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def value(self, route: str, task: str, metric: str) -> float | None:
        return self.metrics.get(route, {}).get(task, {}).get(metric)

    def rows(self) -> list[tuple[str, str]]:
        """(task, metric) pairs in first-seen order over all routes."""
        seen: dict[tuple[str, str], None] = {}
        for task in self.tasks:
            for route in self.routes:
                for metric in self.metrics.get(route, {}).get(task, {}):
                    seen[(task, metric)] = None
        return list(seen)

    def to_markdown(self) -> str:
        lines = ["| task | metric | " + " | ".join(self.routes) + " |", "|---|---|" + "---|" * len(self.routes)]
        for task, metric in self.rows():
            cells = [_cell(self.value(r, task, metric)) for r in self.routes]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
        notes = [f"- {route}: {task} not run ({why})" for route, tasks in self.skipped.items()
                 for task, why in tasks.items()]
        return "\n".join(lines + ([""] + notes if notes else []))

    def save(self, out_dir: str | Path, name: str = "eval") -> tuple[Path, Path]:
        """Write ``<name>.json`` and ``<name>.md`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js, md = out / f"{name}.json", out / f"{name}.md"
        js.write_text(json.dumps(asdict(self), indent=2, default=str) + "\n")
        md.write_text(self.to_markdown() + "\n")
        return js, md
