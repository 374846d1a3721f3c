"""prefill.onnx takes prompts of any length (padded to the chunk inside the graph) and can return the
last position's logits only (issue 15, generic ONNX clients such as lm-eval's ``onnxruntime`` model)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import surgeon
import surgeon.export
from surgeon.export.prompt_padding import AnyLengthPrefill
from surgeon.export.stateful_lm import PrefillLM
from surgeon.passes import LinearizeAttention

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))
from attention_models import VOCAB, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def hybrid():
    """Layer 0 kept as softmax attention (a KV cache of its own), layer 1 linear with window 8 and sinks."""
    return surgeon.apply(tiny_llama(), LinearizeAttention(window=8, sinks=2, layers=[1])).model


def _inputs(batch: int, length: int, pad_last: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, :pad_last] = 0
    return ids, mask


def test_padding_inside_the_module_matches_the_model(hybrid):
    ids, mask = _inputs(2, 37, pad_last=5)                  # 37: not a multiple of the chunk (64)
    with torch.no_grad():
        want = hybrid(ids, attention_mask=mask).logits
        full = AnyLengthPrefill(PrefillLM(hybrid), 64)(ids, mask)
        last = AnyLengthPrefill(PrefillLM(hybrid), 64, last_only=True)(ids, mask)
    assert full[0].shape == (2, 37, VOCAB) and last[0].shape == (2, 1, VOCAB)
    assert (full[0][0] - want[0]).abs().max() <= 1e-5 and (full[0][1, 5:] - want[1, 5:]).abs().max() <= 1e-5
    assert torch.equal(last[0], full[0][:, -1:])
    assert all(torch.equal(a, b) for a, b in zip(full[1:], last[1:]))      # same state either way


@pytest.fixture(scope="module")
def exports(hybrid, tmp_path_factory):
    root = tmp_path_factory.mktemp("any_length")
    full = surgeon.export.export_causal_lm(hybrid, root / "full")
    last = surgeon.export.export_causal_lm(hybrid, root / "last", last_logits_only=True)
    return full, last


@pytest.mark.slow
def test_onnx_prefill_any_length_and_last_logits_only(hybrid, exports):
    import onnxruntime as ort

    full, last = exports
    assert full.manifest.exporter["prefill_pads"] and last.manifest.exporter["last_logits_only"]
    run_full = ort.InferenceSession(str(full.onnx_path))
    run_last = ort.InferenceSession(str(last.onnx_path))
    for batch, length, pad in [(1, 5, 0), (2, 37, 5), (2, 130, 17)]:
        ids, mask = _inputs(batch, length, pad, seed=length)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        got, *state = run_full.run(None, feeds)
        got_last, *state_last = run_last.run(None, feeds)
        with torch.no_grad():
            want = hybrid(ids, attention_mask=mask).logits.numpy()
        assert got.shape == (batch, length, VOCAB) and got_last.shape == (batch, 1, VOCAB)
        real = mask.numpy().astype(bool)
        assert np.abs(got - want)[real].max() <= 1e-4, (batch, length)
        np.testing.assert_array_equal(got_last, got[:, -1:])
        assert all(np.array_equal(a, b) for a, b in zip(state, state_last))


@pytest.mark.slow
def test_generator_on_both_exports_matches_generate(hybrid, exports):
    prompt = torch.randint(0, VOCAB, (1, 21), generator=torch.Generator().manual_seed(4))
    want = hybrid.generate(prompt, max_new_tokens=12, do_sample=False)
    for res in exports:
        got = surgeon.export.OnnxGenerator(res.onnx_path.parent).generate(prompt, max_new_tokens=12)
        assert torch.equal(got[:, :want.shape[1]], want)        # generate stops at EOS, the generator does not
