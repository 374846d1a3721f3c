"""Deployment check of a prefill/decode export against the PyTorch model, in onnxruntime.

Checks, at shapes never used for export, with one :class:`surgeon.export.Criterion` (by default an
element bound scaled to each output's magnitude, an SNR floor, and for logits greedy agreement off near
ties and top-k overlap): the graphs hold the model's weights; prefill logits and every state tensor;
prefill + token-by-token decode in onnxruntime against one PyTorch forward (logits and final state);
greedy generation against ``model.generate`` over ``n_generate`` tokens (a difference at a near tie of
PyTorch's own logits excuses that token only: onnxruntime then continues from PyTorch's prefix and every
later token is compared again). Also latency, state bytes and peak RSS. A failure names the
first diverging output (logits, or the state of the earliest layer).

Example:
    >>> import torch, transformers, surgeon, surgeon.export
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> lm = surgeon.apply(transformers.LlamaForCausalLM(cfg).eval(), LinearizeAttention(window=4)).model
    >>> _ = surgeon.export.to_onnx(lm, "/tmp/doc_vlm", overwrite=True)
    >>> report = verify_causal_lm("/tmp/doc_vlm", lm, n_generate=8)
    >>> report.passed, report.greedy_agreement
    (True, 1.0)
"""
from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from surgeon.core.errors import ConfigError, ExportError, VerificationError
from surgeon.export.criterion import Criterion, OutputVerdict
from surgeon.export.generator import OnnxGenerator
from surgeon.export.stateful_lm import DecodeLM, PrefillLM
from surgeon.core.report import format_table


@dataclass
class Comparison:
    """One output at one shape, judged by the criterion (``reasons``: what failed)."""

    case: str
    output: str
    max_abs: float
    max_rel: float
    snr_db: float
    over_1e2: int
    over_1e3: int
    passed: bool
    finite: bool = True          # onnxruntime's output holds no NaN / inf
    bound: float = 0.0           # the largest per-element bound applied
    greedy_agreement: float | None = None    # logits: argmax agreement off near ties
    near_ties: int | None = None
    top_k_overlap: float | None = None
    reasons: list[str] = field(default_factory=list)


def _comparison(case: str, v: OutputVerdict, err: np.ndarray) -> Comparison:
    return Comparison(case, v.name, v.max_abs, v.max_rel, v.snr_db, int((err > 1e-2).sum()), int((err > 1e-3).sum()),
                      v.passed, v.finite, v.bound, v.greedy_agreement, v.near_ties, v.top_k_overlap, list(v.reasons))


@dataclass
class LMVerifyReport:
    """What :func:`verify_causal_lm` measured."""

    comparisons: list[Comparison] = field(default_factory=list)
    decode_vs_prefill_max_abs: float = 0.0   # inside onnxruntime: decode steps vs one prefill (information)
    greedy_agreement: float = 0.0            # generated tokens equal to model.generate's
    greedy_tokens: int = 0
    greedy_first_divergence: int | None = None    # step of the first differing token (None: all equal)
    greedy_divergence_margin: float | None = None  # PyTorch's top-2 logit margin at that step
    greedy_divergences: list[tuple[int, float]] = field(default_factory=list)  # (step, margin), same prefix
    prefill_ms: dict[str, float] = field(default_factory=dict)
    decode_ms_per_token: float = 0.0
    state_bytes_per_sequence: int = 0
    kv_cache_bytes_per_token: int = 0       # layers kept as softmax attention; 0 when all are linear
    peak_rss_mib: float = 0.0
    atol: float | None = None               # explicit element bounds (None: the criterion's scaled bound)
    rtol: float | None = None
    criterion: dict[str, Any] = field(default_factory=dict)
    weight_mismatches: dict[str, float] = field(default_factory=dict)   # graph:param -> max abs difference
    passed: bool = False
    first_failure: str | None = None
    ort_levels: dict[str, str | None] = field(default_factory=dict)   # graph -> level used
    divergence: dict[str, Any] | None = None   # locate_divergence on the first failing prefill case

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.comparisons if c.output == "logits"), default=0.0)

    @property
    def min_snr_db(self) -> float:
        """Lowest SNR of the logits over every case (prefill and decode)."""
        return min((c.snr_db for c in self.comparisons if c.output == "logits"), default=float("inf"))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs": self.max_abs, "min_snr_db": self.min_snr_db}

    def to_markdown(self) -> str:
        rows = [c for c in self.comparisons if c.output == "logits" or not c.passed]
        lines = [f"# ONNX deployment check: {'PASSED' if self.passed else 'FAILED'}", "",
                 f"Criterion: {self.criterion.get('description', '')}", "",
                 "| case | output | max abs | bound | SNR dB | greedy | ties | top-k | ok |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c.case} | {c.output} | {c.max_abs:.3e} | {c.bound:.3e} | {c.snr_db:.1f} | "
                  f"{'' if c.greedy_agreement is None else f'{c.greedy_agreement:.1%}'} | "
                  f"{'' if c.near_ties is None else c.near_ties} | "
                  f"{'' if c.top_k_overlap is None else f'{c.top_k_overlap:.1%}'} | {'yes' if c.passed else 'no'} |"
                  for c in rows]
        gen = (f"{self.greedy_agreement:.1%} of {self.greedy_tokens} tokens" + (
            "" if self.greedy_first_divergence is None else
            f" (first difference at step {self.greedy_first_divergence}, PyTorch top-2 margin "
            f"{self.greedy_divergence_margin:.3g})"))
        lines += ["", f"- graphs hold the model's weights: "
                      f"{'yes' if not self.weight_mismatches else 'NO: ' + ', '.join(self.weight_mismatches)}",
                  f"- decode vs prefill inside ORT: max abs {self.decode_vs_prefill_max_abs:.3e}",
                  f"- greedy generation vs PyTorch: {gen}",
                  f"- prefill latency (ms): {self.prefill_ms}", f"- decode step: {self.decode_ms_per_token:.2f} ms",
                  f"- decode state: {self.state_bytes_per_sequence:,} bytes per sequence " + (
                      f"+ {self.kv_cache_bytes_per_token:,} bytes per token of context (softmax layers' KV cache)"
                      if self.kv_cache_bytes_per_token else "(constant in context)"),
                  f"- peak RSS: {self.peak_rss_mib:.0f} MiB",
                  f"- onnxruntime graph optimization levels: {self.ort_levels}"]
        if self.first_failure:
            lines.append(f"- first failure: {self.first_failure}")
        if self.divergence is not None:
            lines.append(f"- where: {self.divergence['summary']}")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        rows = [asdict(c) for c in self.comparisons if c.output == "logits" or not c.passed]
        head = f"ONNX prefill/decode verification: {'PASSED' if self.passed else 'FAILED'}"
        table = format_table(["case", "output", "max_abs", "bound", "snr_db", "greedy_agreement", "near_ties",
                              "top_k_overlap", "passed"], rows)
        tail = self.to_markdown().split("| ok |", 1)[1].split("\n\n", 1)[-1]
        return "\n".join([head, f"criterion: {self.criterion.get('description', '')}", table, tail.strip()])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=float))
        path.with_suffix(".md").write_text(self.to_markdown())


def _check(crit: Criterion, case: str, name: str, got: np.ndarray, ref: np.ndarray, tokens: bool = False
           ) -> Comparison:
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64)) if got.dtype != np.bool_ else np.zeros(0)
    return _comparison(case, crit.check(name, got, ref, tokens=tokens), err)


def _exported_prefill(gen: OnnxGenerator, model: nn.Module) -> nn.Module:
    """The module prefill.onnx was exported from (its parameter names are the graph's initializer names)."""
    from surgeon.export.weights import exported_modules

    return exported_modules(gen.manifest, model)["prefill"]


def _weights(path: str | Path, prefill: nn.Module, model: nn.Module) -> dict[str, float]:
    """graph:parameter -> max abs difference, for weights the graphs hold with values other than the model's."""
    from surgeon.export.divergence import weight_mismatches

    out: dict[str, float] = {}
    for graph, wrapper in (("prefill", prefill), ("decode", DecodeLM(model))):
        for w in weight_mismatches(path, wrapper, graph=graph):
            out[f"{graph}:{w.name.removeprefix('prefill.').removeprefix('step.model.')}"] = w.max_abs
    return out


def verify_causal_lm(path: str | Path, model: nn.Module, *, shapes: list[tuple[int, int]] | None = None,
                     atol: float | None = None, rtol: float | None = None, criterion: Criterion | None = None,
                     n_generate: int = 64, seed: int = 0, raise_on_failure: bool = True,
                     ort_level: str | None = None, locate: bool = True,
                     providers: tuple[str, ...] | list[str] = ("CPUExecutionProvider",),
                     repeats: int = 1) -> LMVerifyReport:
    """Check a prefill/decode export against ``model``; raises :class:`VerificationError` on failure.

    ``criterion`` (default ``surgeon.export.DEFAULT_CRITERION``) judges every output; ``atol`` /
    ``rtol``, when given, replace its element bound exactly. ``shapes``: (batch, length) prompts
    (default (1, 37), (3, 100), (2, 200); batches > 1 left-pad their last row). ``repeats``: timed
    prefill runs per shape (median). Sessions use the manifest's onnxruntime optimization levels, or
    ``ort_level``. When a prefill output fails and ``locate`` is true,
    :func:`surgeon.export.locate_divergence` names the first module whose output diverges in
    ``prefill.onnx`` (and weights changed since export).
    """
    crit = Criterion.resolve(criterion, atol, rtol)
    if not isinstance(repeats, int) or repeats < 1 or not isinstance(n_generate, int) or n_generate < 1:
        raise ConfigError(f"verify_causal_lm: repeats and n_generate must be ints ≥ 1, got {repeats!r}, {n_generate!r}")
    gen = OnnxGenerator(path, providers=tuple(providers), level=ort_level)
    if gen.manifest.exporter.get("last_logits_only"):
        raise ConfigError(f"{path}: prefill.onnx returns the last position's logits only, and verification compares "
                          "every position; verify an export_causal_lm(..., last_logits_only=False) of the same model "
                          "(its graphs are otherwise the same)")
    _check_same_model(gen, model)
    model.eval()
    prefill_torch = PrefillLM(model)
    vocab = model.config.vocab_size
    rng = torch.Generator().manual_seed(seed)
    report = LMVerifyReport(atol=crit.atol, rtol=crit.rtol, criterion=crit.to_dict(),
                            state_bytes_per_sequence=gen.state_bytes(),
                            kv_cache_bytes_per_token=gen.state_bytes(context=1) - gen.state_bytes(),
                            ort_levels=dict(gen.levels))
    exported_prefill = _exported_prefill(gen, model)
    report.weight_mismatches = _weights(path, exported_prefill, model)
    names = ["logits"] + [s["name"] for s in gen.state_specs]
    padded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}     # case -> the prefill graph's inputs
    for batch, length in shapes or [(1, 37), (3, 100), (2, 200)]:
        ids = torch.randint(0, vocab, (batch, length), generator=rng)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[-1, : length // 4] = 0                  # left padding in the last row
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            logits, state = gen.run_prefill(ids, mask)
            times.append(1000 * (time.perf_counter() - start))
        report.prefill_ms[f"{batch}x{length}"] = round(float(np.median(times)), 2)
        pad = (-length) % gen.chunk
        padded[f"{batch}x{length}"] = (torch.nn.functional.pad(ids, (pad, 0)), torch.nn.functional.pad(mask, (pad, 0)))
        with torch.no_grad():
            ref = prefill_torch(*padded[f"{batch}x{length}"])
        real = mask.bool().numpy()
        report.comparisons.append(_check(crit, f"{batch}x{length}", "logits", logits[real],
                                         ref[0][:, pad:].numpy()[real], tokens=True))
        for name, g, r in zip(names[1:], state, ref[1:]):
            report.comparisons.append(_check(crit, f"{batch}x{length}", name, g, r.numpy()))

    _check_decode(gen, prefill_torch, crit, report, torch.randint(0, vocab, (2, 96), generator=rng))
    _check_generation(gen, model, crit, report, torch.randint(0, vocab, (1, 16), generator=rng), n_generate)
    report.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    blocks = bool(gen.manifest.exporter.get("prefill_blocks"))    # block prefill: no whole-prompt graph to search
    _judge(report, path, exported_prefill, padded, crit, gen.levels["prefill"], locate and not blocks)
    if not report.passed and raise_on_failure:
        where = f". Where: {report.divergence['summary']}" if report.divergence is not None else ""
        raise VerificationError(f"ONNX deployment check failed: {report.first_failure}{where}", report)
    return report


def _check_same_model(gen: OnnxGenerator, model: nn.Module) -> None:
    """The export's recorded model config matches ``model``'s (a clear error instead of a shape failure)."""
    from surgeon.export.causal_lm import config_fingerprint

    recorded = gen.manifest.exporter.get("model_config")
    mine = config_fingerprint(model)
    if recorded is not None and recorded != mine:
        diff = {k: (recorded.get(k), mine.get(k)) for k in sorted(set(recorded) | set(mine))
                if recorded.get(k) != mine.get(k)}
        raise ExportError(f"{gen.manifest.root} was exported from another model: (manifest, model) differ at {diff}; "
                          f"verify it against the model that was exported, or re-export {type(model).__name__}")


def _check_decode(gen: OnnxGenerator, prefill_torch: nn.Module, crit: Criterion, report: LMVerifyReport,
                  ids: torch.Tensor) -> None:
    """Prefill 64 tokens + 32 decode steps in onnxruntime vs one PyTorch forward over all 96."""
    blocks = bool(gen.manifest.exporter.get("prefill_blocks"))
    full = None if blocks else gen.run_prefill(ids)[0]
    logits, state = gen.run_prefill(ids[:, :64])
    steps = [logits]
    start = time.perf_counter()
    for t in range(64, 96):
        out, state = gen.run_decode(ids[:, t:t + 1].numpy(), np.full((2, 1), t), state)
        steps.append(out)
    report.decode_ms_per_token = round(1000 * (time.perf_counter() - start) / 32, 3)
    decoded = np.concatenate(steps, 1)
    with torch.no_grad():
        if blocks:      # memory slots change once per call: the reference decodes token by token too
            ref = _decoded_in_torch(prefill_torch, ids, 64)
        else:
            ref = prefill_torch(ids, torch.ones_like(ids))
            report.decode_vs_prefill_max_abs = float(np.abs(decoded - full).max())
    case = "2x64+32 decode"
    report.comparisons.append(_check(crit, case, "logits", decoded[:, 64:], ref[0][:, 64:].numpy(), tokens=True))
    for spec, g, r in zip(gen.state_specs, state, ref[1:]):
        r = r.numpy()
        if "past" in spec["shape"] and g.ndim == r.ndim and g.shape != r.shape:
            axis = list(spec["shape"]).index("past")   # softmax KV caches: padding in front differs in length
            n = min(g.shape[axis], r.shape[axis])       # the newest n slots (96 tokens + the window's pad slots)
            g, r = (np.take(x, range(x.shape[axis] - n, x.shape[axis]), axis=axis) for x in (g, r))
        report.comparisons.append(_check(crit, case, spec["name"], g, r))   # a shape that still differs fails


def _decoded_in_torch(prefill_torch: nn.Module, ids: torch.Tensor, n_prompt: int) -> tuple[torch.Tensor, ...]:
    """PyTorch prefill of ``n_prompt`` tokens, then one decode call per token: (logits, *final state)."""
    logits, *state = prefill_torch(ids[:, :n_prompt], torch.ones_like(ids[:, :n_prompt]))
    decode = DecodeLM(prefill_torch.step.model)
    steps = [logits]
    for t in range(n_prompt, ids.shape[1]):
        out, *state = decode(ids[:, t:t + 1], torch.full((ids.shape[0], 1), t), *state)
        steps.append(out)
    return (torch.cat(steps, 1), *state)


def _check_generation(gen: OnnxGenerator, model: nn.Module, crit: Criterion, report: LMVerifyReport,
                      prompt: torch.Tensor, n_generate: int) -> None:
    """Greedy tokens on onnxruntime vs ``model.generate``.

    A difference at a near tie of PyTorch's logits is float noise for *that* token only: onnxruntime then
    continues from PyTorch's own prefix, and every later token is compared again (a decisive difference
    after a tie still fails). ``greedy_divergences``: (step, PyTorch's top-2 margin) of each difference.
    """
    report.greedy_tokens = n_generate
    start = prompt.shape[1]
    try:
        ort_tokens = gen.generate(prompt, max_new_tokens=n_generate)[0, start:]
    except ExportError as e:                 # NaN/inf logits: recorded, the comparisons name them
        report.first_failure = f"generation on onnxruntime failed: {e}"
        ort_tokens = torch.full((n_generate,), -1)
    eos = getattr(model.generation_config, "eos_token_id", None)
    model.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=n_generate, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        model.generation_config.eos_token_id = eos
    torch_tokens = out.sequences[0, start:]
    report.greedy_agreement = float((ort_tokens == torch_tokens).float().mean())   # free-running
    tie = 2 * max((c.bound for c in report.comparisons if c.output == "logits"), default=0.0)
    at, got = 0, ort_tokens
    while report.first_failure is None:
        same = got == torch_tokens[at:]
        if bool(same.all()):
            break
        step = at + int((~same).nonzero()[0, 0])
        top2 = np.sort(out.logits[step][0].double().numpy())[-2:]
        report.greedy_divergences.append((step, float(top2[1] - top2[0])))
        at = step + 1
        if top2[1] - top2[0] > tie or at >= n_generate:  # decisive (judged in _judge), or nothing left
            break
        try:                                            # the same prefix as PyTorch: only the tied token excused
            got = gen.generate(out.sequences[:, :start + at], max_new_tokens=n_generate - at)[0, start + at:]
        except ExportError as e:
            report.first_failure = f"generation on onnxruntime failed after step {step}: {e}"
    if report.greedy_divergences:
        report.greedy_first_divergence, report.greedy_divergence_margin = report.greedy_divergences[0]


def _judge(report: LMVerifyReport, path: str | Path, prefill_torch: nn.Module,
           padded: dict[str, tuple[torch.Tensor, torch.Tensor]], crit: Criterion, level: str | None,
           locate: bool) -> None:
    """Set ``passed`` / ``first_failure`` (weights, outputs, then generation) and locate a prefill failure."""
    generation_error = report.first_failure
    report.first_failure = None
    failures = [c for c in report.comparisons if not c.passed]
    if report.weight_mismatches:
        names = ", ".join(f"{n} (max abs {e:.3g})" for n, e in list(report.weight_mismatches.items())[:4])
        report.first_failure = (f"the graphs' weights differ from the model's at {names}: the model changed after "
                                "export, or this is another model's export; re-export it")
    elif failures:
        c = failures[0]
        report.first_failure = (
            f"{c.output} at {c.case}: onnxruntime returned NaN/inf" if not c.finite else
            f"{c.output} at {c.case}: {'; '.join(c.reasons)}"
            + ("" if c.output == "logits" else " — the earliest layer whose state diverges"))
    elif generation_error is not None:
        report.first_failure = generation_error
    elif report.greedy_divergences and crit.min_greedy is not None:
        logits_bound = max((c.bound for c in report.comparisons if c.output == "logits"), default=0.0)
        decisive = [(step, m) for step, m in report.greedy_divergences if m > 2 * logits_bound]
        if decisive:
            step, margin = decisive[0]
            ties = len(report.greedy_divergences) - 1
            report.first_failure = (
                f"greedy generation differs from model.generate at step {step} "
                + (f"(after {ties} near tie(s) excused, onnxruntime continuing PyTorch's prefix) " if ties else "")
                + f"({report.greedy_agreement:.1%} of {report.greedy_tokens} tokens agree free-running), where "
                f"PyTorch's top-2 margin {margin:.3g} is not a near tie (> 2 × bound {logits_bound:.3g})")
    report.passed = report.first_failure is None
    prefill_failure = next((c.case for c in failures if c.case in padded), None)
    if prefill_failure is None and report.weight_mismatches and padded:
        prefill_failure = next(iter(padded))            # changed weights: show where they make outputs diverge
    if locate and prefill_failure is not None:
        from surgeon.export.divergence import divergence_or_reason

        report.divergence = divergence_or_reason(path, prefill_torch, padded[prefill_failure], graph="prefill",
                                                 criterion=crit, ort_level=level)
