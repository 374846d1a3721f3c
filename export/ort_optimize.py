"""onnxruntime graph optimization levels: check each for parity and speed, record the best, save.

onnxruntime rewrites a graph when it creates a session (constant folding, node fusions, layout
changes), at one of the levels ``disabled < basic < extended < layout < all``. :func:`optimize`
runs every level on an export at shapes other than the export's, compares each to PyTorch (or to
the ``disabled`` level when no model is given), times it (median of ``repeats`` runs), and records
the fastest level that keeps parity — judged by the same :class:`surgeon.export.Criterion` as
:func:`surgeon.export.verify` (default ``DEFAULT_CRITERION``) — in the manifest (``GraphSpec.ort_level``). Sessions made by
:func:`surgeon.export.verify` and :class:`surgeon.export.OnnxGenerator` then use that level. A level
that breaks parity is reported and never chosen. ``save=True`` also writes the onnxruntime-optimized
graph (``<stem>.ort-extended.onnx``), so a deployment can skip the optimization at load time.
Graphs saved at ``layout`` or ``all`` may hold fused, hardware-specific operators that only run on
the kind of machine (and onnxruntime build) that saved them, so saving defaults to ``extended``.

Example:
    >>> import torch, surgeon.export
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    >>> _ = surgeon.export.to_onnx(net, "/tmp/doc_ortopt", torch.randn(2, 8))
    >>> rep = surgeon.export.optimize("/tmp/doc_ortopt", net, threads=1)
    >>> rep.best["model"] in LEVELS, all(r.passed for r in rep.results)
    (True, True)
    >>> surgeon.export.load_manifest("/tmp/doc_ortopt").graph().ort_level == rep.best["model"]
    True
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from surgeon.core.errors import ConfigError, ExportError, VerificationError
from surgeon.export.manifest import ORT_LEVELS, Manifest, load_manifest, manifest_path_for
from surgeon.core.report import Report
from surgeon.export.criterion import Criterion
from surgeon.export.runtime import LEVELS, levels as _levels, make_session, parse_level, session_options

__all__ = ["LEVELS", "SAVE_LEVEL", "LevelResult", "OptimizeReport", "optimize", "parse_level",
           "session_options", "make_session"]

#: the level :func:`optimize` saves at with ``save=True``: portable (no hardware-specific fusions)
SAVE_LEVEL = "extended"
#: a higher level is chosen only when faster than a lower passing one by more than this fraction
TIE = 0.02


@dataclass
class LevelResult:
    """One graph at one level: parity against the reference, and median latency."""

    graph: str
    level: str
    passed: bool
    max_abs: float
    max_rel: float
    n_bad: int
    ms: float | None
    session_s: float | None = None
    nodes: int | None = None
    error: str | None = None


@dataclass
class OptimizeReport:
    """What :func:`optimize` measured and chose; prints as a table, saves as JSON."""

    results: list[LevelResult]
    best: dict[str, str]
    reference: str                       # "pytorch" or "disabled"
    shapes: dict[str, list[str]]
    timing_shape: dict[str, str]
    atol: float | None                   # explicit element bounds (None: the criterion's scaled bound)
    rtol: float | None
    threads: int | None
    criterion: str = ""                  # what every output had to satisfy (Criterion.describe())
    saved: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def failed(self) -> list[LevelResult]:
        """Levels that broke parity (or failed to run)."""
        return [r for r in self.results if not r.passed]

    def to_report(self) -> Report:
        rows = []
        for r in self.results:
            rows.append({"graph": r.graph, "level": r.level, "max_abs": r.max_abs, "n_bad": r.n_bad,
                         "ms": r.ms, "session_s": r.session_s, "nodes": r.nodes, "parity": r.passed,
                         "chosen": self.best.get(r.graph) == r.level})
        notes = [f"{r.graph} at {r.level}: {r.error or 'breaks parity'}; not chosen"
                 for r in self.failed()]
        notes += [f"saved {g}: {s['file']} (level {s['level']}, parity {'ok' if s['passed'] else 'FAILED'},"
                  f" max abs {s['max_abs']:.3e})" for g, s in self.saved.items()]
        judged = self.criterion or f"atol {self.atol:g}, rtol {self.rtol:g}"
        return Report(title=f"onnxruntime graph optimization levels (reference: {self.reference}; {judged})",
                      columns=["graph", "level", "max_abs", "n_bad", "ms", "session_s", "nodes",
                               "parity", "chosen"],
                      rows=rows, summary={"timed at": self.timing_shape, "checked at": self.shapes,
                                          "threads": self.threads or "onnxruntime default"},
                      notes=[*self.notes, *notes])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for r in d["results"]:
            for k in ("max_abs", "max_rel"):
                if isinstance(r[k], float) and not np.isfinite(r[k]):
                    r[k] = str(r[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizeReport:
        """Rebuild from :meth:`to_dict` data (e.g. ``manifest.onnxruntime["optimization"]``)."""
        d = dict(d)
        rows = []
        for r in d.pop("results"):
            r = dict(r)
            for k in ("max_abs", "max_rel"):
                r[k] = float(r[k])
            rows.append(LevelResult(**r))
        return cls(results=rows, **d)

    def __str__(self) -> str:
        return str(self.to_report())


# ----------------------------------------------------------------------------- inputs

Feeds = dict[str, np.ndarray]
Case = tuple[str, Feeds, list[np.ndarray] | None]     # label, ORT feeds, reference outputs


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _single_cases(manifest: Manifest, gname: str, model: nn.Module | None, n: int, seed: int
                  ) -> list[Case]:
    from surgeon.export.onnx_export import flatten_outputs, model_eval_mode
    from surgeon.export.verify import _make_cases

    g = manifest.graph(gname)
    names = [t.name for t in g.inputs]
    cases = []
    for inputs in _make_cases(g, n, seed)[0]:
        ref = None
        if model is not None:
            with torch.no_grad(), model_eval_mode(model):
                ref = [_np(t) for _, t in flatten_outputs(model(*inputs))]
        label = ", ".join(f"{k}={'x'.join(map(str, t.shape))}" for k, t in zip(names, inputs))
        cases.append((label, {k: _np(t) for k, t in zip(names, inputs)}, ref))
    return cases


def _lm_cases(manifest: Manifest, model: nn.Module | None, shapes: Sequence[tuple[int, int]],
              seed: int, disabled_prefill: Callable[[Feeds], list[np.ndarray]]
              ) -> dict[str, list[Case]]:
    """Prefill feeds at ``shapes``; decode feeds from the reference prefill's state at each shape."""
    from surgeon.export.stateful_lm import DecodeLM, PrefillLM

    chunk = int(manifest.exporter.get("chunk", 64))
    ids_spec = next(t for t in manifest.graph("prefill").inputs if t.name == "input_ids")
    vocab = int((manifest.exporter.get("model_config") or {}).get("vocab_size")
                or (ids_spec.value_range or [0, 1])[1] + 1)
    state_names = [t.name for t in manifest.graph("decode").inputs][2:]
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[Case]] = {"prefill": [], "decode": []}
    for batch, length in shapes:
        if length % chunk:
            raise ConfigError(f"prefill shapes must be multiples of the export's chunk ({chunk}); got {length}")
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[-1, : length // 4] = 0                      # left padding in the last row
        feeds = {"input_ids": _np(ids), "attention_mask": _np(mask)}
        if model is not None:
            with torch.no_grad():
                pre_ref = [_np(t) for t in PrefillLM(model.eval())(ids, mask)]
        else:
            pre_ref = disabled_prefill(feeds)
        out["prefill"].append((f"{batch}x{length}", feeds, pre_ref if model is not None else None))
        token = torch.randint(0, vocab, (batch, 1), generator=gen)
        position = mask.sum(-1, keepdim=True)
        state = pre_ref[1:]
        dfeeds = {"input_ids": _np(token), "position_ids": _np(position),
                  **dict(zip(state_names, state))}
        dref = None
        if model is not None:
            with torch.no_grad():
                dref = [_np(t) for t in DecodeLM(model.eval())(
                    token, position, *(torch.from_numpy(s) for s in state))]
        out["decode"].append((f"{batch}x1 after {length}", dfeeds, dref))
    return out


# ----------------------------------------------------------------------------- measuring

def _compare(got: list[np.ndarray], ref: list[np.ndarray], crit: Criterion
             ) -> tuple[float, float, int, bool]:
    """Every output judged by ``crit`` (as verify does): (max abs, max rel, elements out of bound, passed)."""
    if len(got) != len(ref):
        return float("inf"), float("inf"), 1, False
    verdicts = [crit.check(f"output {i}", a, b) for i, (a, b) in enumerate(zip(got, ref))]
    max_abs = max((v.max_abs for v in verdicts), default=0.0)
    max_rel = max((v.max_rel for v in verdicts), default=0.0)
    passed = all(v.passed for v in verdicts)
    return max_abs, max_rel, sum(v.n_bad for v in verdicts), passed and not np.isnan(max_abs)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _external(opts: Any, data_name: str) -> None:
    """Save an optimized model's weights in an external file (a big model would not fit in 2 GB)."""
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                  "1024")


def _measure(graph: str, path: Path, level: str, cases: list[Case], ref: list[list[np.ndarray]],
             crit: Criterion, repeats: int, threads: int | None,
             providers: Sequence[str], count_nodes: bool) -> LevelResult:
    import onnx

    tmp = tempfile.mkdtemp(prefix="surgeon-ort-") if count_nodes else None
    try:
        opts = session_options(level, threads)
        if tmp is not None:   # the optimized graph, to count what the level left of it
            opts.optimized_model_filepath = str(Path(tmp) / "m.onnx")
            _external(opts, "m.onnx.data")
        t0 = time.perf_counter()
        sess = make_session(path, level, threads, providers, options=opts)
        session_s = time.perf_counter() - t0
        worst = (0.0, 0.0, 0, True)
        for (_, feeds, _), want in zip(cases, ref):
            got = sess.run(None, feeds)
            m = _compare(got, want, crit)
            worst = (max(worst[0], m[0]), max(worst[1], m[1]), worst[2] + m[2], worst[3] and m[3])
        feeds = cases[-1][1]
        ms = _median_ms(lambda: sess.run(None, feeds), repeats)
        del sess
        nodes = None
        if tmp is not None and (Path(tmp) / "m.onnx").is_file():
            nodes = len(onnx.load(str(Path(tmp) / "m.onnx"), load_external_data=False).graph.node)
    except Exception as e:  # a level that cannot even run is reported, never chosen
        return LevelResult(graph, level, False, float("nan"), float("nan"), 0, None,
                           error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return LevelResult(graph, level, worst[3], worst[0], worst[1], worst[2], round(ms, 4),
                       round(session_s, 3), nodes)


def _choose(results: list[LevelResult]) -> str | None:
    ok = [r for r in results if r.passed and r.ms is not None]
    if not ok:
        return None
    fastest = min(r.ms for r in ok)
    # the lowest (most portable) level within TIE of the fastest: timing noise picks no fusions
    return min((r for r in ok if r.ms <= fastest * (1 + TIE)), key=lambda r: ORT_LEVELS.index(r.level)).level


def _save(manifest: Manifest, gname: str, level: str, cases: list[Case], ref: list[list[np.ndarray]],
          crit: Criterion, threads: int | None, providers: Sequence[str],
          staging: Path) -> dict[str, Any]:
    """Write ``<stem>.ort-<level>.onnx`` (+ external weights) into ``staging``, reload and check it."""
    stem = Path(manifest.graph(gname).file).stem
    name = f"{stem}.ort-{level}.onnx"
    opts = session_options(level, threads)
    opts.optimized_model_filepath = str(staging / name)
    _external(opts, f"{name}.data")
    make_session(manifest.graph_path(gname), level, providers=providers, options=opts)
    sess = make_session(staging / name, "disabled", threads, providers)    # already optimized
    worst = 0.0
    passed = True
    for (_, feeds, _), want in zip(cases, ref):
        max_abs, _, _, ok = _compare(sess.run(None, feeds), want, crit)
        worst, passed = max(worst, max_abs), passed and ok
    info: dict[str, Any] = {
        "file": name, "data_files": sorted(p.name for p in staging.iterdir() if p.name.startswith(name + ".")),
        "level": level, "passed": passed, "max_abs": worst,
        "load_with": "graph optimization level 'disabled' (the optimizations are already applied)"}
    if level in ("layout", "all"):
        info["warning"] = (f"saved at level {level!r}: may contain hardware-specific fused operators; "
                           "run it only on this kind of CPU with this onnxruntime build")
    return info


def optimize(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    levels: Sequence[Any] | str | bool | None = None,
    save: bool | str = False,
    record: bool = True,
    criterion: Criterion | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    repeats: int = 5,
    threads: int | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    shapes: Sequence[tuple[int, int]] | None = None,
    n_shapes: int = 2,
    seed: int = 0,
    count_nodes: bool | None = None,
) -> OptimizeReport:
    """Check an export under onnxruntime's graph optimization levels and record the best one.

    ``path``: an export folder (or its ``.onnx`` / manifest). Every graph in the manifest runs at
    each of ``levels`` (default: all of :data:`LEVELS`; ``"disabled"`` always runs as the baseline)
    on inputs at shapes other than the export's: ``n_shapes`` random sets varying every dynamic dim
    for a single graph; for prefill/decode exports, prefill at ``shapes`` (``(batch, tokens)``,
    tokens a multiple of the chunk; default ``[(1, 64), (3, 128)]``) and one decode step from each
    resulting state. Outputs are compared with ``model`` (PyTorch) when given, else with the
    ``disabled`` level, by ``criterion`` (default ``surgeon.export.DEFAULT_CRITERION``, the one
    :func:`surgeon.export.verify` applies; ``atol`` / ``rtol`` replace its element bound exactly);
    latency is the median of ``repeats`` runs at the last shape. The best level
    is the fastest that passes (a higher level must beat a lower passing one by more than 2 %). With
    ``record`` the manifest gets each graph's ``ort_level`` and the table (``manifest.onnxruntime``).
    ``save`` (``True`` → ``"extended"``, or a level) writes ``<stem>.ort-<level>.onnx`` beside the
    graph and checks it reloads and matches. If no level passes for a graph, nothing is written and
    :class:`VerificationError` (with ``.report``) is raised. ``count_nodes`` (default: for exports
    under 64 MB) adds each level's node count, from a temporary copy of the optimized graph.

    Example:
        >>> import torch, surgeon.export
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval(), torch.nn.ReLU())
        >>> _ = surgeon.export.to_onnx(net, "/tmp/doc_ortopt2", torch.randn(2, 3, 8, 8))
        >>> rep = optimize("/tmp/doc_ortopt2", net, levels=["basic"], save=True, threads=1, repeats=2)
        >>> [r.level for r in rep.results], rep.saved["model"]["file"], rep.saved["model"]["passed"]
        (['disabled', 'basic'], 'model.ort-extended.onnx', True)
    """
    crit = Criterion.resolve(criterion, atol, rtol)
    manifest = load_manifest(path)
    assert manifest.root is not None
    candidates = _levels(levels)
    wanted = sorted(set(candidates) | {"disabled"}, key=ORT_LEVELS.index)
    save_level = None if save is False else SAVE_LEVEL if save is True else parse_level(save)
    if repeats < 1 or n_shapes < 1:
        raise ConfigError(f"repeats and n_shapes must be >= 1, got {repeats} and {n_shapes}")
    for gname in manifest.graphs:
        if not manifest.graph_path(gname).is_file():
            raise ExportError(f"{manifest.graph_path(gname)} is missing; keep the export folder together or re-export")
    is_lm = manifest.exporter.get("kind") == "causal_lm_stateful"
    if model is not None:
        model.eval()
    if count_nodes is None:
        files = [f for g in manifest.graphs.values() for f in [g.file, *g.data_files]]
        count_nodes = sum((manifest.root / f).stat().st_size for f in files
                          if (manifest.root / f).is_file()) < 64 * 2**20

    cases: dict[str, list[Case]]
    if is_lm:
        disabled_prefill = None
        if model is None:
            sess = make_session(manifest.graph_path("prefill"), "disabled", threads, providers)
            disabled_prefill = lambda feeds: sess.run(None, feeds)  # noqa: E731
        cases = _lm_cases(manifest, model, shapes or [(1, 64), (3, 128)], seed, disabled_prefill)
    else:
        cases = {g: _single_cases(manifest, g, model, n_shapes, seed) for g in manifest.graphs}

    results: list[LevelResult] = []
    best: dict[str, str] = {}
    notes: list[str] = []
    refs: dict[str, list[list[np.ndarray]]] = {}
    for gname, gcases in cases.items():
        gpath = manifest.graph_path(gname)
        ref = [c[2] for c in gcases]
        if model is None:      # the reference is the unoptimized graph itself
            base = make_session(gpath, "disabled", threads, providers)
            ref = [base.run(None, feeds) for _, feeds, _ in gcases]
            del base
        refs[gname] = ref
        graph_results = [_measure(gname, gpath, lv, gcases, ref, crit, repeats, threads, providers,
                                  count_nodes) for lv in wanted]
        results += graph_results
        chosen = _choose([r for r in graph_results if r.level in candidates])
        if chosen is None and graph_results[0].passed:    # every requested level broke parity
            chosen = "disabled"
            notes.append(f"{gname}: no requested level {candidates} keeps parity; using 'disabled'")
        if chosen is not None:
            best[gname] = chosen
    report = OptimizeReport(
        results=results, best=best, reference="pytorch" if model is not None else "disabled",
        shapes={g: [c[0] for c in cs] for g, cs in cases.items()},
        timing_shape={g: cs[-1][0] for g, cs in cases.items()}, atol=crit.atol, rtol=crit.rtol, threads=threads,
        criterion=crit.describe(), notes=notes)
    missing = [g for g in manifest.graphs if g not in best]
    if missing:
        raise VerificationError(
            f"no onnxruntime optimization level keeps {missing} within the criterion ({crit.describe()}) of "
            f"the {report.reference} reference (levels tried: {wanted}); the manifest was not changed. "
            f"Run surgeon.export.verify to see which output diverges.\n{report}", report)

    staging = None
    try:
        if save_level is not None:
            bad = [r for r in results if r.level == save_level and not r.passed]
            if bad:
                raise VerificationError(f"level {save_level!r} breaks parity for {[r.graph for r in bad]}; "
                                        "not saving it. Save at a level that passes (see the report).", report)
            if save_level in ("layout", "all"):
                warnings.warn(f"saving onnxruntime-optimized graphs at level {save_level!r}: they may contain "
                              "hardware-specific fused operators; save at 'extended' for a portable graph",
                              stacklevel=2)
            staging = Path(tempfile.mkdtemp(prefix=".ort-save-", dir=manifest.root))
            for gname, gcases in cases.items():
                report.saved[gname] = _save(manifest, gname, save_level, gcases, refs[gname], crit,
                                            threads, providers, staging)
            broken = [g for g, info in report.saved.items() if not info["passed"]]
            if broken:
                raise VerificationError(f"the saved {save_level!r}-optimized graphs of {broken} do not match the "
                                        f"{report.reference} reference; nothing was saved", report)
        if record:
            for gname, level in best.items():
                manifest.graphs[gname].ort_level = level
            manifest.onnxruntime = {"optimization": report.to_dict(),
                                    "onnxruntime": _ort_version()}
            if report.saved:
                manifest.onnxruntime["optimized_models"] = report.saved
        if staging is not None:
            for p in staging.iterdir():
                os.replace(p, manifest.root / p.name)
        if record:
            manifest.save(manifest_path_for(path))
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return report


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__
