"""surgeon eval: lm-evaluation-harness through lm-eval's own model classes, one column per route (issue 15)."""
from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
import transformers

import surgeon
from surgeon.core.errors import ConfigError
from surgeon.passes import LinearizeAttention
from surgeon_test_models import byte_tokenizer

pytest.importorskip("lm_eval", reason="pip install 'surgeon[clients]'")

from surgeon.eval import LOCAL_TASKS, evaluate, max_difference, routes_for  # noqa: E402

TASKS = ["surgeon_pydoc_ppl", "surgeon_python_mc", "surgeon_python_gen"]


def tiny_llama(vocab: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup():
    tok = byte_tokenizer()
    original = tiny_llama(len(tok))
    surgery = surgeon.apply(copy.deepcopy(original), LinearizeAttention(window=6, sinks=2))
    return tok, original, surgery


def test_every_route_through_lm_eval_same_numbers(setup, tmp_path):
    tok, original, surgery = setup
    routes = routes_for(["original", "surgered", "hf"], surgered=surgery, original=original, tokenizer=tok,
                        work_dir=tmp_path)
    # max_length 48 < every pydoc document's length: rolling windows are cut, as in a real run
    report = evaluate(routes, TASKS, tok, limit=2, max_length=48)
    assert report.routes == ["original", "surgered", "hf"]
    for route in report.routes:
        assert set(report.metrics[route]) == set(TASKS)
        ppl = report.value(route, "surgeon_pydoc_ppl", "byte_perplexity")
        assert 100 < ppl < 2000 and math.isfinite(report.value(route, "surgeon_pydoc_ppl", "word_perplexity"))
        assert report.value(route, "surgeon_python_mc", "acc") in (0.0, 0.5, 1.0)
        assert report.value(route, "surgeon_python_gen", "exact_match (strip)") == 0.0   # random weights
    # the HF folder loads the surgered model: identical numbers; the original is another model
    assert max_difference(report, "surgered", "hf") == 0.0
    assert report.value("original", "surgeon_pydoc_ppl", "byte_perplexity") != \
        report.value("surgered", "surgeon_pydoc_ppl", "byte_perplexity")
    js, md = report.save(tmp_path / "out")
    assert json.loads(js.read_text())["metrics"]["hf"]["surgeon_python_mc"] == report.metrics["hf"]["surgeon_python_mc"]
    assert md.read_text().splitlines()[0] == "| task | metric | original | surgered | hf |"


def test_local_tasks_and_bad_input(setup, tmp_path, monkeypatch):
    tok, original, surgery = setup
    assert set(TASKS) == set(LOCAL_TASKS)
    routes = routes_for(["surgered"], surgered=surgery, work_dir=tmp_path)
    assert routes[0].target is surgery.model
    # a bare *ForCausalLM (has a .model attribute of its own) is the model, not a Surgery
    assert routes_for(["surgered"], surgered=surgery.model, work_dir=tmp_path)[0].target is surgery.model
    with pytest.raises(ConfigError, match="unknown lm-eval task"):
        evaluate(routes, ["surgeon_no_such_task"], tok, include_path=[tmp_path])
    with pytest.raises(ConfigError, match="unknown route"):
        routes_for(["tflite"], surgered=surgery, work_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs the original model"):
        routes_for(["original"], surgered=surgery, work_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "lm_eval", None)            # lm-eval not installed
    with pytest.raises(ConfigError, match=r"pip install 'surgeon\[clients\]'"):
        evaluate(routes, TASKS, tok)
    from surgeon.cli.commands import main

    assert main(["eval", str(tmp_path), "--out", str(tmp_path / "e")]) == 2     # clear error, no traceback


@pytest.mark.slow
def test_onnx_routes_match_in_memory(setup, tmp_path):
    """onnxruntime-genai (to_genai folder) and plain onnxruntime (prefill.onnx, any prompt length) vs PyTorch."""
    tok, original, surgery = setup
    routes = routes_for(["surgered", "onnx", "onnxruntime"], surgered=surgery, tokenizer=tok, work_dir=tmp_path)
    report = evaluate(routes, TASKS, tok, limit=3, max_length=128)   # genai generation needs prompt + 16 <= max_length
    assert max_difference(report, "surgered", "onnx") <= 1e-5
    assert max_difference(report, "surgered", "onnxruntime") <= 1e-5
    assert report.value("onnx", "surgeon_python_gen", "exact_match (strip)") is not None
    assert "surgeon_python_gen" in report.skipped["onnxruntime"]
