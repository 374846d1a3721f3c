"""Run lm-evaluation-harness tasks on several routes of one model and collect the numbers side by side.

Local tasks (``surgeon/eval/tasks``) load through ``TaskManager(include_path=...)``; standard lm-eval
task names work too when their data is available (the default task index is only loaded when a
named task is not local). Nothing downloads: ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are set.

Example:
    >>> sorted(LOCAL_TASKS)
    ['surgeon_pydoc_ppl', 'surgeon_python_gen', 'surgeon_python_mc']
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from surgeon.core.errors import ConfigError
from surgeon.eval.report import EvalReport
from surgeon.eval.routes import Route, make_lm, require_lm_eval
from surgeon.eval.task_data import TASK_DIR

LOCAL_TASKS = {p.stem: p for p in TASK_DIR.glob("*.yaml")}
GENERATION_TASKS = {"surgeon_python_gen"}


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] = ()) -> Any:
    """lm-eval's ``TaskManager`` over the local tasks (+ ``include_path``), with lm-eval's own index when needed."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    extra = [str(p) for p in include_path]
    needs_defaults = any(t not in LOCAL_TASKS for t in tasks) and not extra
    manager = TaskManager(include_path=[str(TASK_DIR), *extra], include_defaults=needs_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {unknown}: use a local task ({', '.join(sorted(LOCAL_TASKS))}), "
                          "a standard lm-eval task name, or a folder of task YAMLs via include_path")
    return manager


def _metrics(task_result: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}`` -> ``{"acc": 0.5}``."""
    out = {}
    for key, value in task_result.items():
        name, _, _filter = key.partition(",")
        if not _filter or name.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        out[name if _filter == "none" else f"{name} ({_filter})"] = float(value)
    return out


def evaluate(routes: Sequence[Route], tasks: Sequence[str], tokenizer: Any = None, *, limit: int | None = None,
             max_length: int = 2048, batch_size: int = 1, include_path: Sequence[str | Path] = (),
             seed: int = 0) -> EvalReport:
    """Evaluate every route on ``tasks`` with ``lm_eval.simple_evaluate``; one report, one column per route.

    ``limit``: documents per task (the first ones: every route sees the same). ``max_length``: the
    context of every route (rolling perplexity windows depend on it, so it is the same for all).
    Routes whose lm-eval class cannot generate skip generation tasks (noted in ``report.skipped``).
    """
    lm_eval = require_lm_eval()
    if not routes:
        raise ConfigError("no routes to evaluate")
    if len({r.name for r in routes}) != len(routes):
        raise ConfigError(f"route names must be unique: {[r.name for r in routes]}")
    manager = task_manager(tasks, include_path)
    report = EvalReport(routes=[r.name for r in routes], tasks=list(tasks), metrics={},
                        config={"limit": limit, "max_length": max_length, "batch_size": batch_size, "seed": seed,
                                "lm_eval": lm_eval.__version__,
                                "routes": {r.name: {"kind": r.kind, "target": _describe(r.target)} for r in routes}})
    for route in routes:
        run = [t for t in tasks if route.generates or t not in GENERATION_TASKS]
        skipped = {t: f"lm-eval's {route.kind} model does not generate" for t in tasks if t not in run}
        if skipped:
            report.skipped[route.name] = skipped
        report.metrics[route.name] = {}
        if not run:
            continue
        t0 = time.perf_counter()
        lm = make_lm(route, tokenizer, max_length, batch_size)
        with _quiet("lm_eval"):              # per-task config notes and the --limit warning, once per route
            out = lm_eval.simple_evaluate(model=lm, tasks=run, task_manager=manager, limit=limit, bootstrap_iters=0,
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed, log_samples=False)
        report.metrics[route.name] = {t: _metrics(out["results"][t]) for t in run}
        report.seconds[route.name] = round(time.perf_counter() - t0, 3)
    return report


def max_difference(report: EvalReport, reference: str, other: str) -> float:
    """Largest relative difference of any metric between two routes (0.0 when identical)."""
    worst = 0.0
    for task, metric in report.rows():
        a, b = report.value(reference, task, metric), report.value(other, task, metric)
        if a is None or b is None:
            continue
        if a != b:
            worst = max(worst, abs(a - b) / max(abs(a), 1e-12) if math.isfinite(a) else math.inf)
    return worst


@contextlib.contextmanager
def _quiet(name: str, level: int = logging.ERROR) -> Iterator[None]:
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def _describe(target: Any) -> str:
    return str(target) if isinstance(target, (str, Path)) else type(target).__name__
