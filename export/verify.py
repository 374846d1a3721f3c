"""Prove an ONNX export: symbolic dims stay symbolic, and onnxruntime matches PyTorch at new shapes.

Example:
    >>> import torch, surgeon.export
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    >>> _ = surgeon.export.to_onnx(net, "/tmp/doc_verify", torch.randn(2, 8))
    >>> rep = surgeon.export.verify("/tmp/doc_verify", net)
    >>> rep.passed, sorted(r.input_shapes["input"][0] for r in rep.rows)
    (True, [1, 3, 5])
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from surgeon.core.errors import ConfigError, ExportError, VerificationError
from surgeon.export.criterion import DEFAULT_CRITERION, Criterion, OutputVerdict
from surgeon.export.manifest import GraphSpec, TensorSpec, load_manifest
from surgeon.export.onnx_export import flatten_outputs, model_eval_mode
from surgeon.core.report import Report

__all__ = ["verify", "VerifyReport", "ShapeCheck", "OutputCheck", "DimCheck"]


# ----------------------------------------------------------------------------- report types

@dataclass
class DimCheck:
    """A dim the manifest declares dynamic, and what the ONNX graph has there."""

    tensor: str
    kind: str                    # "input" or "output"
    dim: int
    declared: str                # the dim's name in the manifest
    found: int | str | None      # dim_param (str) if symbolic, dim_value (int) if fixed

    @property
    def passed(self) -> bool:
        return isinstance(self.found, str) and bool(self.found)


@dataclass
class OutputCheck:
    """One output at one input shape: ORT vs torch."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    n_bad: int                   # elements beyond the criterion's element bound (or NaN)
    numel: int
    passed: bool
    snr_db: float = float("inf")
    bound: float = 0.0           # the largest per-element bound applied
    reasons: list[str] = field(default_factory=list)   # what failed (the criterion's words)

    @staticmethod
    def of(v: OutputVerdict) -> "OutputCheck":
        return OutputCheck(v.name, v.shape, v.max_abs, v.max_rel, v.n_bad, v.numel, v.passed, v.snr_db,
                           v.bound, list(v.reasons))


@dataclass
class ShapeCheck:
    """One set of inputs: its shapes, per-output errors and latencies (median ms)."""

    case: int
    input_shapes: dict[str, list[int]]
    outputs: list[OutputCheck] = field(default_factory=list)
    ort_ms: float | None = None
    torch_ms: float | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(o.passed for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def shapes_str(self) -> str:
        return ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in self.input_shapes.items())


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return value


@dataclass
class VerifyReport:
    """Result of :func:`verify`; prints as a table, saves as JSON."""

    onnx_path: str
    graph: str
    providers: list[str]
    atol: float | None           # explicit element bounds (None: the criterion's scaled bound)
    rtol: float | None
    dim_checks: list[DimCheck]
    rows: list[ShapeCheck]
    passed: bool
    notes: list[str] = field(default_factory=list)
    ort_level: str | None = None     # onnxruntime graph optimization level used (None: its default)
    divergence: dict[str, Any] | None = None   # surgeon.export.locate_divergence on the first failing case
    criterion: dict[str, Any] = field(default_factory=dict)   # the Criterion applied (to_dict)

    @property
    def max_abs(self) -> float:
        """Largest absolute error over every output and shape."""
        return max((r.max_abs for r in self.rows), default=0.0)

    def _failures(self) -> list[tuple[str, str]]:
        """``(what failed, what to try)`` for every failed check."""
        out: list[tuple[str, str]] = []
        for c in self.dim_checks:
            if not c.passed:
                found = "missing" if c.found is None else f"fixed to {c.found}"
                out.append((
                    f"ONNX {c.kind} {c.tensor!r} dim {c.dim} is declared dynamic ({c.declared!r}) "
                    f"in the manifest but is {found} in {Path(self.onnx_path).name}, so the graph "
                    "only runs at that size.",
                    "re-export with surgeon.export.to_onnx(..., dynamic_axes="
                    f"{{{c.tensor!r}: {{{c.dim}: {c.declared!r}}}}}) from an example with that dim "
                    ">= 2 (to_onnx refuses graphs that fix a declared dim); if the graph was edited "
                    "after export, keep the dim_param."))
        for r in self.rows:
            if r.error is not None:
                out.append((f"at input shapes {r.shapes_str()}: {r.error}.",
                            "run the graph by hand with onnxruntime at these shapes to see which "
                            "node fails."))
                continue
            for o in r.outputs:
                if not o.passed:
                    out.append((
                        f"output {o.name!r} at input shapes {r.shapes_str()}: ONNX Runtime differs "
                        f"from PyTorch by max abs error {o.max_abs:.3e} (max rel {o.max_rel:.3e}, SNR "
                        f"{o.snr_db:.1f} dB): {'; '.join(o.reasons)}.",
                        "check that the model passed to verify is the exported one (same weights, "
                        "no edits since export); if only shapes other than the export shape fail, "
                        "the export specialised a dim (shape-dependent Python code); if the error "
                        "is float noise (fp16, long reductions), pass a looser surgeon.export.Criterion."))
        return out

    def failures(self) -> list[str]:
        """One line per failed check (empty when passed)."""
        return [what for what, _ in self._failures()]

    def error_message(self) -> str:
        """The message :func:`verify` raises with: first failure, what to try, how many more."""
        fails = self._failures()
        if not fails:
            return "ONNX verification passed"
        what, todo = fails[0]
        if self.divergence is not None:
            todo = f"{todo}. Where: {self.divergence['summary']}"
        more = f"\n(+{len(fails) - 1} more failures; see the error's .report)" if len(fails) > 1 else ""
        return f"ONNX verification failed: {what} What to try: {todo}{more}"

    def to_report(self) -> Report:
        """The result as a :class:`surgeon.core.report.Report` table (one line per shape and output)."""
        rows: list[dict[str, Any]] = []
        for r in self.rows:
            base = {"case": r.case, "inputs": r.shapes_str(), "ort_ms": r.ort_ms,
                    "torch_ms": r.torch_ms}
            if r.error is not None:
                rows.append({**base, "output": "ERROR", "ok": False})
            for o in r.outputs:
                rows.append({**base, "output": o.name, "max_abs": o.max_abs, "max_rel": o.max_rel,
                             "snr_db": o.snr_db, "n_bad": o.n_bad, "ok": o.passed})
                base = {"case": "", "inputs": "", "ort_ms": None, "torch_ms": None}
        n_dyn = len(self.dim_checks)
        summary = {"graph": Path(self.onnx_path).name, "providers": ", ".join(self.providers),
                   "onnxruntime optimization level": self.ort_level or "all (onnxruntime default)",
                   "criterion": self.criterion.get("description", ""),
                   "dynamic dims symbolic": f"{sum(c.passed for c in self.dim_checks)}/{n_dyn}",
                   "max abs error": self.max_abs, "passed": self.passed}
        where = [f"where: {self.divergence['summary']}"] if self.divergence is not None else []
        return Report(
            title=f"ONNX verification: {'PASSED' if self.passed else 'FAILED'}",
            columns=["case", "inputs", "output", "max_abs", "max_rel", "snr_db", "n_bad", "ort_ms",
                     "torch_ms", "ok"],
            rows=rows, summary=summary, notes=[*self.notes, *self.failures(), *where])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_abs"] = self.max_abs
        for c, cd in zip(self.dim_checks, d["dim_checks"]):
            cd["passed"] = c.passed
        for r, rd in zip(self.rows, d["rows"]):
            rd["passed"] = r.passed
        d["failures"] = self.failures()
        return _json_safe(d)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def __str__(self) -> str:
        return str(self.to_report())


# ----------------------------------------------------------------------------- helpers

def _graph_dims(proto: Any) -> dict[tuple[str, str], list[int | str | None]]:
    from surgeon.export.onnx_export import _onnx_dims

    dims: dict[tuple[str, str], list[int | str | None]] = {}
    for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for v in values:
            dims[(kind, v.name)] = _onnx_dims(v)
    return dims


def _check_dims(g: GraphSpec, proto: Any) -> list[DimCheck]:
    dims = _graph_dims(proto)
    checks: list[DimCheck] = []
    for kind, specs in (("input", g.inputs), ("output", g.outputs)):
        for t in specs:
            have = dims.get((kind, t.name))
            for d, name in t.dynamic_dims.items():
                found = have[d] if have is not None and d < len(have) else None
                checks.append(DimCheck(t.name, kind, d, name, found))
    return checks


def _probe_sizes(name: str, example: int, n: int) -> list[int]:
    """``n`` sizes for a dynamic dim, all different from the export example size."""
    if name == "batch":
        cands = [1, 3, 5, 7, 4, 6]
    else:
        cands = [example // 2, 2 * example, example + max(1, example // 2), 3 * example]
    out: list[int] = []
    for c in cands + list(range(example + 1, example + n + 2)):
        if c >= 1 and c != example and c not in out:
            out.append(c)
    return out[:n]


def _random_input(spec: TensorSpec, shape: list[int], gen: torch.Generator) -> Tensor:
    try:
        dtype = getattr(torch, spec.dtype)
    except AttributeError as e:
        raise ExportError(f"manifest input {spec.name!r} has dtype {spec.dtype!r}, which torch "
                          "does not know; pass explicit inputs to verify") from e
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    lo, hi = spec.value_range if spec.value_range is not None else (0, 1)
    values = torch.randint(int(lo), int(hi) + 1, shape, generator=gen, dtype=torch.int64)
    return values.to(dtype)


def _make_cases(g: GraphSpec, n: int, seed: int) -> tuple[list[tuple[Tensor, ...]], list[str]]:
    examples: dict[str, int] = {}
    for t in g.inputs:
        for d, name in t.dynamic_dims.items():
            examples.setdefault(name, t.example_shape[d])
    gen = torch.Generator().manual_seed(seed)
    notes: list[str] = []
    if not examples:
        n = 1
        notes.append("the graph declares no dynamic dims: checked at the export shape only")
        sizes: dict[str, list[int]] = {}
    else:
        sizes = {name: _probe_sizes(name, e, n) for name, e in examples.items()}
        notes.append("generated inputs (seed %d) at shapes other than the export example: %s" % (
            seed, "; ".join(f"{k} {examples[k]} -> {v}" for k, v in sizes.items())))
    cases = []
    for i in range(n):
        case = []
        for t in g.inputs:
            shape = [sizes[d][i] if isinstance(d, str) else int(ex)
                     for d, ex in zip(t.shape, t.example_shape)]
            case.append(_random_input(t, shape, gen))
        cases.append(tuple(case))
    return cases, notes


def _to_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _short(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{' [...]' if len(text) > limit else ''}"


def _run_case(i: int, case: tuple[Tensor, ...], names: list[str], sess: Any,
              model: nn.Module, device: torch.device, criterion: Criterion,
              repeats: int) -> ShapeCheck:
    row = ShapeCheck(case=i, input_shapes={n: list(t.shape) for n, t in zip(names, case)})
    ort_names = {x.name for x in sess.get_inputs()}
    feeds = {n: _to_numpy(t) for n, t in zip(names, case) if n in ort_names}
    missing = sorted(ort_names - set(feeds))
    if missing:
        row.error = f"the ONNX graph needs inputs {missing} that the manifest does not list"
        return row
    try:
        ort_out = sess.run(None, feeds)
        row.ort_ms = _median_ms(lambda: sess.run(None, feeds), repeats)
    except Exception as e:  # onnxruntime rejects the shapes, a node fails, ...
        row.error = (f"onnxruntime failed: {_short(e)}. A shape error here usually means the "
                     "export fixed a dim that should be dynamic; re-export with it in dynamic_axes")
        return row
    targs = tuple(t.to(device) for t in case)
    try:
        with torch.no_grad():
            ref = flatten_outputs(model(*targs))
            row.torch_ms = _median_ms(lambda: model(*targs), repeats)
    except Exception as e:
        row.error = f"the PyTorch model failed on these inputs: {_short(e)}"
        return row
    out_names = [o.name for o in sess.get_outputs()]
    if len(ref) != len(ort_out):
        row.error = (f"the model returns {len(ref)} tensors ({[n for n, _ in ref]}) but the graph "
                     f"has {len(ort_out)} outputs ({out_names}); is this the exported model?")
        return row
    for oname, got, (_, want) in zip(out_names, ort_out, ref):
        want_np = _to_numpy(want)
        if tuple(got.shape) != tuple(want_np.shape):
            row.error = (f"output {oname!r} has shape {list(got.shape)} in ONNX Runtime but "
                         f"{list(want_np.shape)} in PyTorch")
            return row
        row.outputs.append(OutputCheck.of(criterion.check(oname, got, want_np)))
    return row


# ----------------------------------------------------------------------------- entry point

def verify(
    path: str | Path,
    model: nn.Module,
    inputs: list[tuple[Tensor, ...]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    raise_on_failure: bool = True,
    *,
    graph: str | None = None,
    n_shapes: int | None = None,
    repeats: int | None = None,
    seed: int = 0,
    ort_level: str | None = None,
    locate: bool = True,
    criterion: Criterion | None = None,
    shapes: list[tuple[int, int]] | None = None,
    n_generate: int | None = None,
) -> Any:
    """Check an export against ``model`` in onnxruntime, at shapes other than the export shape.

    Loads the manifest written by :func:`surgeon.export.to_onnx` (``path``: the export folder, the
    ``.onnx`` file, or the manifest), checks every dim the manifest declares dynamic is still a
    symbolic ``dim_param`` in the graph, then runs ONNX Runtime and ``model`` (eval mode, no_grad;
    training flags restored) on ``inputs`` or, when ``None``, on ``n_shapes`` seeded random input
    sets that vary every dynamic dim (batch 1, 3, 5; other dims at 1/2, 2x and 1.5x the example).
    An output passes the :class:`surgeon.export.Criterion` given, by default
    ``DEFAULT_CRITERION`` (an element bound scaled to the output's magnitude and an SNR floor);
    ``atol`` / ``rtol``, when given, replace its element bound exactly (nothing is widened).
    ``repeats`` (default 3) timed runs after a warm-up give the median latency of each. On failure raises :class:`VerificationError` (with
    ``.report``) unless ``raise_on_failure=False``. Sessions use the onnxruntime graph optimization
    level the manifest records (:func:`surgeon.export.optimize`), or ``ort_level`` when given.
    When outputs differ and ``locate`` is true, :func:`surgeon.export.locate_divergence` runs on
    the first failing case and the report (``.divergence``, the error message) names the first
    module whose output diverges, its ONNX node, and any weight that changed since export.

    A prefill/decode export of a causal LM is checked by :func:`surgeon.export.verify_causal_lm`
    (returns its :class:`LMVerifyReport`; ``shapes`` and ``n_generate`` go to it). Arguments a path
    does not use raise :class:`ConfigError` rather than being ignored: ``inputs``, ``graph`` and
    ``n_shapes`` for a causal LM; ``shapes`` and ``n_generate`` for any other graph.

    Example:
        >>> import torch, surgeon.export
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        >>> _ = surgeon.export.to_onnx(net, "/tmp/doc_conv", torch.randn(2, 3, 8, 8))
        >>> rep = surgeon.export.verify("/tmp/doc_conv", net)
        >>> rep.passed and rep.max_abs <= 1e-5
        True
    """
    import onnx
    import onnxruntime as ort

    crit = Criterion.resolve(criterion, atol, rtol)
    manifest = load_manifest(path)
    if manifest.exporter.get("kind") == "causal_lm_stateful":
        from surgeon.export.verify_lm import verify_causal_lm

        unused = {"inputs": inputs, "graph": graph, "n_shapes": n_shapes}
        given = [k for k, v in unused.items() if v is not None]
        if given:
            raise ConfigError(f"verify: {given} do not apply to a prefill/decode export ({path}): it is checked "
                              "at shapes=[(batch, length), ...] (random prompts, both graphs, greedy generation); "
                              "drop them or pass shapes=...")
        extra = {k: v for k, v in (("shapes", shapes), ("n_generate", n_generate), ("repeats", repeats))
                 if v is not None}
        return verify_causal_lm(path, model, criterion=crit, raise_on_failure=raise_on_failure, seed=seed,
                                ort_level=ort_level, locate=locate, providers=providers, **extra)
    if shapes is not None or n_generate is not None:
        raise ConfigError(f"verify: shapes / n_generate apply to prefill/decode exports of causal LMs only; "
                          f"{path} is a {manifest.exporter.get('kind', 'forward')!r} export: pass inputs=[...] "
                          "or n_shapes=")
    n_shapes = 3 if n_shapes is None else n_shapes
    repeats = 3 if repeats is None else repeats
    gname = graph if graph is not None else (
        next(iter(manifest.graphs)) if len(manifest.graphs) == 1 else "model")
    g = manifest.graph(gname)
    onnx_path = manifest.graph_path(gname)
    if not onnx_path.is_file():
        raise ExportError(f"the manifest names graph file {onnx_path}, which does not exist; keep "
                          "the export folder together (graph, .data files, manifest) or re-export")
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise ExportError(f"cannot read ONNX graph {onnx_path}: {_short(e)}; re-export") from e
    dim_checks = _check_dims(g, proto)
    del proto

    names = [t.name for t in g.inputs]
    notes: list[str] = []
    if inputs is None:
        cases, notes = _make_cases(g, n_shapes, seed)
    else:
        cases = [(c,) if isinstance(c, Tensor) else tuple(c) for c in inputs]
        for c in cases:
            if len(c) != len(names):
                raise ExportError(f"each inputs entry needs {len(names)} tensors ({names}), got "
                                  f"{len(c)}")

    from surgeon.export.ort_optimize import parse_level, session_options

    level = parse_level(ort_level) if ort_level is not None else g.ort_level
    # No busy-waiting ORT threads between runs (session_options turns spinning off): on few cores
    # they would steal time from the torch timings that follow and make the latencies unfair.
    opts = session_options(level)
    if level is not None:
        notes.append(f"onnxruntime graph optimization level {level!r} "
                     f"({'given' if ort_level is not None else 'recorded in the manifest'})")
    try:
        sess = ort.InferenceSession(str(onnx_path), opts, providers=list(providers))
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {onnx_path}: {_short(e)}. Check the external "
                          f"data files {g.data_files} sit next to it and the providers "
                          f"{list(providers)} are installed") from e

    device = _model_device(model)
    rows: list[ShapeCheck] = []
    with model_eval_mode(model):
        for i, case in enumerate(cases):
            rows.append(_run_case(i, case, names, sess, model, device, crit, repeats))

    passed = all(c.passed for c in dim_checks) and all(r.passed for r in rows)
    used_providers = list(sess.get_providers())
    del sess
    report = VerifyReport(onnx_path=str(onnx_path), graph=gname,
                          providers=used_providers, atol=crit.atol, rtol=crit.rtol,
                          dim_checks=dim_checks, rows=rows, passed=passed, notes=notes,
                          ort_level=level, criterion=crit.to_dict())
    failing = next((c for c, r in zip(cases, rows) if r.error is None and not r.passed), None)
    if locate and failing is not None:
        from surgeon.export.divergence import divergence_or_reason

        report.divergence = divergence_or_reason(path, model, failing, graph=gname, criterion=crit,
                                                 ort_level=level, providers=providers)
    if not passed and raise_on_failure:
        raise VerificationError(report.error_message(), report)
    return report
