"""Conformance of ``LinearizeAttention`` over transformers' own model families.

Every causal-LM family (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) and every text-encoder family
(``MODEL_MAPPING_NAMES`` entries that also have a masked-LM head) is built tiny from its config
(random weights, 4 layers, hidden 64, 4 heads / 2 kv heads) and converted with a softmax window
covering the whole sequence, where linear attention must reproduce the model. Outcomes:

- ``exact``: output equal to the original (fp32 ≤ 1e-5, float64 ≤ 1e-10, scaled by max(1, |output|));
  causal models also decode token by token equal to the full forward (≤ 1e-4) and ``generate`` with
  the cache gives the tokens it gives without;
- ``refused``: a surgeon error at plan time whose message names the module and the feature;
- ``failure``: anything else (a crash after apply, wrong numbers, an unexpected exception);
- ``not built``: the tiny config of this family could not be built or run by transformers itself.

Usage: ``python scripts/conformance.py [family ...] [--out docs/conformance.md] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

import surgeon
from surgeon.core.errors import SurgeonError
from surgeon.passes import LinearizeAttention

VOCAB, TOKENS, NEW_TOKENS = 128, 24, 6
MAX_PARAMS = 12_000_000
TOL_FP32, TOL_FP64, TOL_DECODE = 1e-5, 1e-10, 1e-4
TINY: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, sliding_window=TOKENS + NEW_TOKENS,
    num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, d_model=64, encoder_layers=2, decoder_layers=4, encoder_ffn_dim=128,
    decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4, embedding_size=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
# MLA (DeepSeek): every head has its own decompressed key/value; rotary runs over the qk_rope_head_dim part
MLA = dict(num_key_value_heads=4, head_dim=8, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
           v_head_dim=16, n_routed_experts=4, n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1)
SMALL_MAMBA = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_expand=2, mamba_chunk_size=16)
FAMILY_KWARGS: dict[str, dict[str, Any]] = {  # features off by default that the suite must see
    "cohere": dict(use_qk_norm=True), "stablelm": dict(qk_layernorm=True), "phi": dict(qk_layernorm=True),
    "persimmon": dict(qk_layernorm=True),
    # hybrids: at least one softmax attention layer among the 4
    "bamba": dict(attn_layer_indices=[1], **SMALL_MAMBA), "jamba": dict(attn_layer_offset=1, attn_layer_period=2),
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba", "attention"], **SMALL_MAMBA),
    "bailing_hybrid": dict(layer_types=["linear_attention", "full_attention"] * 2),
    "lfm3": dict(layer_types=["conv", "full_attention"] * 2),
    "gptj": dict(rotary_dim=8), "codegen": dict(rotary_dim=8),
    "gpt_neo": dict(attention_types=[[["global", "local"], 2]], window_size=TOKENS + NEW_TOKENS),
    "gemma4_text": dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16),
    "roc_bert": dict(pronunciation_vocab_size=32, shape_vocab_size=32),
    "deepseek_v2": MLA, "deepseek_v3": MLA,
}


class _Timeout(BaseException):
    pass


def families() -> list[tuple[str, str, bool]]:
    """(model_type, class name, causal) for every causal-LM family, then every text-encoder family."""
    causal = dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    encoders = {f: MODEL_MAPPING_NAMES[f] for f in MODEL_FOR_MASKED_LM_MAPPING_NAMES
                if f in MODEL_MAPPING_NAMES and f not in causal}
    rows = [(f, c, True) for f, c in sorted(causal.items())] + [(f, c, False) for f, c in sorted(encoders.items())]
    return [(f, c[0] if isinstance(c, (list, tuple)) else c, k) for f, c, k in rows]


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """The family's config at test size; keyword arguments the config rejects are dropped one by one."""
    cls = CONFIG_MAPPING[family]
    kw = dict(TINY, **FAMILY_KWARGS.get(family, {}))
    if "text_config" in (getattr(cls, "sub_configs", None) or {}):
        return cls(text_config=kw)
    while True:
        try:
            return cls(**kw)
        except (TypeError, AttributeError) as e:  # unknown keyword, or a read-only property (Falcon's head_dim)
            bad = [k for k in kw if f"'{k}'" in str(e)]
            if not bad:
                raise
            kw.pop(bad[0])


def build(family: str, class_name: str, causal: bool) -> torch.nn.Module:
    """The tiny random model (seed 0, eval mode); raises if it would not be tiny."""
    cfg = tiny_config(family)
    if causal:
        cfg.is_decoder = True
    cls = getattr(transformers, class_name)
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > MAX_PARAMS:
        raise RuntimeError(f"the tiny config still has {n / 1e6:.1f}M parameters")
    torch.manual_seed(0)
    return cls(cfg).eval()


def pass_config(causal: bool) -> LinearizeAttention:
    """A softmax window covering every token: the setting where the conversion must be exact."""
    if causal:
        return LinearizeAttention(feature_map="elu1", window=TOKENS + NEW_TOKENS)
    return LinearizeAttention(feature_map="elu1", window=TOKENS, local=True)


def _output(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    out = model(ids, **kw)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to max(1, max |b|)."""
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())


def _decode_error(model: torch.nn.Module, ids: torch.Tensor, full: torch.Tensor) -> float:
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [_output(model, ids[:, :5], past_key_values=cache, use_cache=True)]
        for t in range(5, ids.shape[1]):
            steps.append(_output(model, ids[:, t:t + 1], past_key_values=cache, use_cache=True))
    return _error(torch.cat(steps, 1), full)


def _generate_agrees(model: torch.nn.Module, ids: torch.Tensor) -> bool:
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return torch.equal(model.generate(ids, use_cache=True, **kw),
                           model.generate(ids, use_cache=False, prefill_chunk_size=None, **kw))  # chunks need a cache


def classify(family: str, class_name: str, causal: bool) -> dict[str, Any]:
    """One family's outcome; see the module docstring."""
    row: dict[str, Any] = {"family": family, "class": class_name, "kind": "causal" if causal else "encoder"}
    ids = torch.randint(3, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(1))
    try:
        model = build(family, class_name, causal)
        with torch.no_grad():
            ref = _output(model, ids)
    except Exception as e:  # transformers' own tiny model does not build or run: not ours to judge
        return {**row, "outcome": "not built", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    try:
        surgery = surgeon.apply(model, pass_config(causal))
    except SurgeonError as e:
        return {**row, "outcome": "refused", "reason": f"{type(e).__name__}: {' '.join(str(e).split())}"}
    except Exception as e:
        return {**row, "outcome": "failure", "reason": f"plan crashed: {type(e).__name__}: {str(e)[:200]}"}
    problems = []
    try:
        with torch.no_grad():
            got = _output(surgery.model, ids)
        row["err_fp32"] = _error(got, ref)
        if not row["err_fp32"] <= TOL_FP32:
            problems.append(f"fp32 error {row['err_fp32']:.1e}")
        row["err_fp64"] = _float64_error(model, ids, causal)
        if row["err_fp64"] is not None and not row["err_fp64"] <= TOL_FP64:
            problems.append(f"float64 error {row['err_fp64']:.1e}")
        if causal:  # judged against the original's own consistency (e.g. Mamba layers' decode path)
            row["err_decode"] = _decode_error(surgery.model, ids, got)
            if not row["err_decode"] <= TOL_DECODE:
                own = _decode_error(model, ids, ref)
                row["reason_note"] = f"original's own decode vs prefill {own:.1e}"
                if not row["err_decode"] <= max(TOL_DECODE, 2 * own):
                    problems.append(f"decode vs prefill {row['err_decode']:.1e} (original {own:.1e})")
            if not _generate_agrees(surgery.model, ids) and _generate_agrees(model, ids):
                problems.append("generate with cache != without")
    except Exception as e:
        problems.append(f"crash after apply: {type(e).__name__}: {str(e)[:200]}")
    return {**row, "outcome": "failure" if problems else "exact", "reason": "; ".join(problems)}


@contextlib.contextmanager
def _softmax_in_input_dtype():
    """Keep float64 softmax in float64: several families' eager kernels ask for ``dtype=torch.float32``, which
    would make the float64 reference itself only float32-precise (Gemma 2: 1.5e-07)."""
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return original(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


def _float64_error(model: torch.nn.Module, ids: torch.Tensor, causal: bool) -> float | None:
    """Error of the float64 conversion, or None when the original model does not run in float64."""
    m64 = copy.deepcopy(model).double()
    with _softmax_in_input_dtype():
        try:
            with torch.no_grad():
                ref = _output(m64, ids)
        except Exception:  # e.g. grouped_mm MoE kernels have no float64
            return None
        with torch.no_grad():
            return _error(_output(surgeon.apply(m64, pass_config(causal)).model, ids), ref)


def run(selected: list[str] | None = None, timeout_s: int = 60, log=print) -> list[dict[str, Any]]:
    """Classify every family (or ``selected``), each under a ``timeout_s`` alarm."""
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    rows = []
    for family, class_name, causal in families():
        if selected and family not in selected:
            continue
        start = time.perf_counter()
        previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Timeout()))
        signal.alarm(timeout_s)
        try:
            row = classify(family, class_name, causal)
        except _Timeout:
            row = {"family": family, "class": class_name, "kind": "causal" if causal else "encoder",
                   "outcome": "failure", "reason": f"timed out ({timeout_s} s)"}
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        log(f"{family:28s} {row['outcome']:9s} {row.get('reason', '')[:110]}")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table written to docs/conformance.md."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    fmt = lambda v: "" if v is None else f"{v:.0e}"  # noqa: E731
    lines = [
        "# LinearizeAttention conformance over transformers families",
        "",
        f"Generated by `python scripts/conformance.py` (transformers {transformers.__version__}, torch "
        f"{torch.__version__}). Each family is built tiny from its config and converted with a softmax window "
        f"covering all {TOKENS} tokens, where the conversion must reproduce the model: *exact* = fp32 ≤ {TOL_FP32:g}, "
        f"float64 ≤ {TOL_FP64:g} (relative to max(1, |output|); the float64 reference keeps its softmax in float64 where "
        f"a family's eager kernel asks for float32), decode = prefill ≤ {TOL_DECODE:g} and `generate` "
        "with cache = without (causal families). Modules the module swap would refuse (output gates, soft-capping, "
        "learned sinks, MLA, unknown layouts) are converted at the attention kernel when they call transformers' "
        "attention registry; *refused* = a plan-time error naming the module and the feature, "
        "model untouched; *not built* = transformers' own tiny model does not build or run here.",
        "",
        "Totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "",
        "| family | class | kind | outcome | fp32 | float64 | decode | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reason = r.get("reason", "").replace("|", "\\|")
        lines.append(f"| {r['family']} | {r['class']} | {r['kind']} | {r['outcome']} | {fmt(r.get('err_fp32'))} | "
                     f"{fmt(r.get('err_fp64'))} | {fmt(r.get('err_decode'))} | {reason[:400]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="model types (default: all)")
    parser.add_argument("--out", default=None, help="markdown table (default docs/conformance.md for a full run)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(args.families or None)
    out = args.out or (None if args.families else str(Path(__file__).resolve().parents[1] / "docs/conformance.md"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    failures = [r["family"] for r in rows if r["outcome"] == "failure"]
    print(f"{len(rows)} families, {len(failures)} failures{': ' + ', '.join(failures) if failures else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
