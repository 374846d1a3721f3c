"""Conformance over transformers' own families (scripts/conformance.py): exact, or refused at plan time — never a failure."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "surgeon_conformance", Path(__file__).resolve().parents[2] / "scripts" / "conformance.py")
conformance = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conformance)

# diverse on purpose: plain GQA + rotary, NoPE layers, partial rotary + per-head LayerNorm, fused GQA qkv,
# fused Conv1D (absolute positions), soft-capping (converted at the attention kernel), ALiBi in a module that does
# not call the attention registry (refused), causal BERT, an encoder with a fused Wqkv
SAMPLE = {
    "llama": "exact", "smollm3": "exact", "stablelm": "exact", "phi3": "exact", "gpt2": "exact",
    "gemma2": "exact", "mpt": "refused", "bert": "exact", "modernbert": "exact",
}


def test_fast_sample_of_families():
    rows = {r["family"]: r for r in conformance.run(list(SAMPLE), log=lambda *_: None)}
    assert set(rows) == set(SAMPLE)
    for family, expected in SAMPLE.items():
        assert rows[family]["outcome"] == expected, rows[family]
    assert rows["gemma2"]["err_fp64"] <= 1e-10 and rows["gemma2"]["err_decode"] <= 1e-4
    assert "transformer.blocks.0.attn" in rows["mpt"]["reason"]
    assert rows["llama"]["err_fp64"] <= 1e-10 and rows["llama"]["err_decode"] <= 1e-4


def test_markdown_table_lists_every_row():
    rows = [{"family": "x", "class": "XModel", "kind": "causal", "outcome": "refused", "reason": "a | b"}]
    text = conformance.markdown(rows)
    assert "| x | XModel | causal | refused |" in text and "a \\| b" in text and "refused 1" in text


@pytest.mark.slow
def test_every_family_converts_exactly_or_is_refused_up_front():
    rows = conformance.run(log=lambda *_: None)
    failures = {r["family"]: r["reason"] for r in rows if r["outcome"] == "failure"}
    assert len(rows) > 200
    assert not failures, failures
