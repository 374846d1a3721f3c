"""Deployment check of a prefill/decode export against the PyTorch model, in onnxruntime.

Checks, at shapes never used for export: prefill logits and every state tensor (max abs / rel error,
SNR, elements beyond 1e-2 and 1e-3), one prefill vs prefill + token-by-token decode inside ORT, greedy
agreement with ``model.generate`` over ``n_generate`` tokens, latency, state bytes and peak RSS.
A failure names the first diverging output (logits, or the state of the earliest layer).

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

from surgeon.core.errors import ExportError, VerificationError
from surgeon.export.generator import OnnxGenerator
from surgeon.export.stateful_lm import PrefillLM
from surgeon.core.report import format_table


@dataclass
class Comparison:
    """One output at one shape."""

    case: str
    output: str
    max_abs: float
    max_rel: float
    snr_db: float
    over_1e2: int
    over_1e3: int
    passed: bool
    finite: bool = True          # onnxruntime's output holds no NaN / inf


@dataclass
class LMVerifyReport:
    """What :func:`verify_causal_lm` measured."""

    comparisons: list[Comparison] = field(default_factory=list)
    decode_vs_prefill_max_abs: float = 0.0
    greedy_agreement: float = 0.0
    greedy_tokens: int = 0
    prefill_ms: dict[str, float] = field(default_factory=dict)
    decode_ms_per_token: float = 0.0
    state_bytes_per_sequence: int = 0
    kv_cache_bytes_per_token: int = 0       # layers kept as softmax attention; 0 when all are linear
    peak_rss_mib: float = 0.0
    atol: float = 1e-4
    rtol: float = 1e-3
    passed: bool = False
    first_failure: str | None = None
    ort_levels: dict[str, str | None] = field(default_factory=dict)   # graph -> level used
    divergence: dict[str, Any] | None = None   # locate_divergence on the first failing prefill case

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.comparisons if c.output == "logits"), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs": self.max_abs}

    def to_markdown(self) -> str:
        rows = [asdict(c) for c in self.comparisons if c.output == "logits" or not c.passed]
        lines = [f"# ONNX deployment check: {'PASSED' if self.passed else 'FAILED'}", "",
                 "| case | output | max abs | max rel | SNR dB | >1e-2 | >1e-3 | ok |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['output']} | {r['max_abs']:.3e} | {r['max_rel']:.3e} | {r['snr_db']:.1f} | "
                  f"{r['over_1e2']} | {r['over_1e3']} | {'yes' if r['passed'] else 'no'} |" for r in rows]
        lines += ["", f"- decode vs prefill inside ORT: max abs {self.decode_vs_prefill_max_abs:.3e}",
                  f"- greedy agreement with PyTorch: {self.greedy_agreement:.1%} of {self.greedy_tokens} tokens",
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
        table = format_table(["case", "output", "max_abs", "max_rel", "snr_db", "over_1e2", "over_1e3", "passed"], rows)
        tail = self.to_markdown().split("\n\n", 1)[1].split("\n", 1)[1] if "\n\n" in self.to_markdown() else ""
        return "\n".join([head, table, tail.strip()])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=float))
        path.with_suffix(".md").write_text(self.to_markdown())


def _compare(case: str, name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> Comparison:
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    if got.dtype == np.bool_:
        bad = int((got != ref).sum())
        return Comparison(case, name, float(bad), 0.0, float("inf"), bad, bad, bad == 0)
    err = np.abs(got64 - ref64)
    finite = bool(np.isfinite(got64).all())
    noise = float((err ** 2).sum())
    snr = float("inf") if noise == 0 else 10 * np.log10(float((ref64 ** 2).sum()) / noise)
    passed = finite and bool((err <= atol + rtol * np.abs(ref64)).all())
    return Comparison(case, name, float(err.max()) if err.size else 0.0,
                      float((err / (np.abs(ref64) + 1e-12)).max()) if err.size else 0.0, snr,
                      int((err > 1e-2).sum()), int((err > 1e-3).sum()), passed, finite)


def verify_causal_lm(path: str | Path, model: nn.Module, *, shapes: list[tuple[int, int]] | None = None,
                     atol: float = 1e-4, rtol: float = 1e-3, n_generate: int = 64, seed: int = 0,
                     raise_on_failure: bool = True, ort_level: str | None = None,
                     locate: bool = True) -> LMVerifyReport:
    """Check a prefill/decode export against ``model``; raises :class:`VerificationError` on failure.

    Sessions use the manifest's onnxruntime optimization levels, or ``ort_level`` when given. When a
    prefill output differs and ``locate`` is true, :func:`surgeon.export.locate_divergence` names the
    first module whose output diverges in ``prefill.onnx`` (and weights changed since export).
    """
    gen = OnnxGenerator(path, level=ort_level)
    model.eval()
    prefill_torch = PrefillLM(model)
    vocab = model.config.vocab_size
    rng = torch.Generator().manual_seed(seed)
    report = LMVerifyReport(atol=atol, rtol=rtol, state_bytes_per_sequence=gen.state_bytes(),
                            kv_cache_bytes_per_token=gen.state_bytes(context=1) - gen.state_bytes(),
                            ort_levels=dict(gen.levels))
    names = ["logits"] + [s["name"] for s in gen.state_specs]
    padded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}     # case -> the prefill graph's inputs
    for batch, length in shapes or [(1, 37), (3, 100), (2, 200)]:
        ids = torch.randint(0, vocab, (batch, length), generator=rng)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[-1, : length // 4] = 0                  # left padding in the last row
        start = time.perf_counter()
        logits, state = gen.run_prefill(ids, mask)
        report.prefill_ms[f"{batch}x{length}"] = round(1000 * (time.perf_counter() - start), 2)
        pad = (-length) % gen.chunk
        padded[f"{batch}x{length}"] = (torch.nn.functional.pad(ids, (pad, 0)), torch.nn.functional.pad(mask, (pad, 0)))
        with torch.no_grad():
            ref = prefill_torch(*padded[f"{batch}x{length}"])
        real = mask.bool().numpy()
        got_logits, ref_logits = logits[real], ref[0][:, pad:].numpy()[real]
        report.comparisons.append(_compare(f"{batch}x{length}", "logits", got_logits, ref_logits, atol, rtol))
        for name, g, r in zip(names[1:], state, ref[1:]):
            report.comparisons.append(_compare(f"{batch}x{length}", name, g, r.numpy(), atol, rtol))

    # one prefill vs prefill + token-by-token decode, inside onnxruntime
    ids = torch.randint(0, vocab, (2, 96), generator=rng)
    full, _ = gen.run_prefill(ids)
    logits, state = gen.run_prefill(ids[:, :64])
    steps = [logits]
    start = time.perf_counter()
    for t in range(64, 96):
        out, state = gen.run_decode(ids[:, t:t + 1].numpy(), np.full((2, 1), t), state)
        steps.append(out)
    report.decode_ms_per_token = round(1000 * (time.perf_counter() - start) / 32, 3)
    report.decode_vs_prefill_max_abs = float(np.abs(np.concatenate(steps, 1) - full).max())

    # greedy generation agreement with PyTorch
    prompt = torch.randint(0, vocab, (1, 16), generator=rng)
    generation_error = None
    try:
        ort_tokens = gen.generate(prompt, max_new_tokens=n_generate)[0, 16:]
    except ExportError as e:                 # NaN/inf logits: recorded, the comparisons above name them
        generation_error = f"generation on onnxruntime failed: {e}"
        ort_tokens = torch.full((n_generate,), -1)
    eos = getattr(model.generation_config, "eos_token_id", None)
    model.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            torch_tokens = model.generate(prompt, max_new_tokens=n_generate, do_sample=False)[0, 16:]
    finally:
        model.generation_config.eos_token_id = eos
    report.greedy_tokens = n_generate
    report.greedy_agreement = float((ort_tokens == torch_tokens).float().mean())
    report.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    failures = [c for c in report.comparisons if not c.passed]
    if failures:
        c = failures[0]
        report.first_failure = (
            f"{c.output} at shape {c.case}: onnxruntime returned NaN/inf" if not c.finite else
            f"{c.output} at shape {c.case}: max abs {c.max_abs:.3e} (atol {atol}, rtol {rtol})"
            + ("" if c.output == "logits" else " — the earliest layer whose state diverges"))
        if locate:
            from surgeon.export.divergence import divergence_or_reason

            report.divergence = divergence_or_reason(path, prefill_torch, padded[c.case], graph="prefill",
                                                     atol=atol, rtol=rtol, ort_level=gen.levels["prefill"])
    elif report.decode_vs_prefill_max_abs > atol:
        report.first_failure = (f"decode.onnx step-by-step differs from prefill.onnx by "
                                f"{report.decode_vs_prefill_max_abs:.3e}")
    elif generation_error is not None:
        report.first_failure = generation_error
    elif report.greedy_agreement < 1.0:
        report.first_failure = f"greedy tokens agree on only {report.greedy_agreement:.1%} of {n_generate}"
    report.passed = report.first_failure is None
    if not report.passed and raise_on_failure:
        where = f". Where: {report.divergence['summary']}" if report.divergence is not None else ""
        raise VerificationError(f"ONNX deployment check failed: {report.first_failure}{where}", report)
    return report

