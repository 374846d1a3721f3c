"""SmolLM2-135M (real weights): block linearity and one ReplaceMe-style replacement vs dropping (slow)."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.passes import ReplaceLinearBlocks
from surgeon.passes.linear_blocks.handler import SkippedBlock
from surgeon.data.text import perplexity, token_chunks

pytestmark = pytest.mark.slow


def test_smollm2_replace_one_block_beats_dropping():
    pytest.importorskip("gguf")
    from surgeon.models.smollm2 import load_smollm2

    model, tok = load_smollm2()
    calib = token_chunks(tok, "train", 64, 16, batch_size=8)
    held = token_chunks(tok, "held_out", 128, 8, batch_size=4)
    s = surgeon.apply(model, ReplaceLinearBlocks(k=1, calibration=calib))
    rows = s.report["ReplaceLinearBlocks"].rows
    assert len(rows) == 30 and all(0.9 < r["r2"] <= 1.0 for r in rows if r["block"] > 0)
    (block,) = [r["block"] for r in rows if r["replaced"]]
    dropped = copy.deepcopy(model)
    dropped.model.layers[block] = SkippedBlock(block)
    base, rep, drop = perplexity(model, held), perplexity(s.model, held), perplexity(dropped, held)
    assert base < rep < drop
    with torch.no_grad():
        assert s.model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=3).shape[1] > 3
