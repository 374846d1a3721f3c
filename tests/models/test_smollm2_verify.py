"""SmolLM2-135M (real weights): the default verification passes a correct export at 37 / 200 / 512 /
2,048 tokens and fails each injected fault (slow: each export takes minutes on 2 cores).

Faults as in ``tests/export/test_verify_criterion.py``: a weight edited by 1e-3 relative, RMSNorm's
exponent 2 changed by 1 %, layer 15's recurrent-state update dropped in decode.onnx, decode positions
offset by one. Run both for the linearized model and for a linearized + distilled one (a few steps of
attention transfer on CPython's docs).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import onnx
import pytest
import torch

import surgeon
import surgeon.export
from surgeon.models.smollm2 import load_smollm2
from surgeon.passes import LinearizeAttention

sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
import export_faults as faults  # noqa: E402

SHAPES = [(1, 37), (1, 200), (1, 512), (1, 2048)]
pytestmark = pytest.mark.slow


def _distilled(model: torch.nn.Module, tok) -> torch.nn.Module:
    from surgeon.distill import DistillConfig
    from surgeon.distill.data import pydoc_texts

    text = " ".join(pydoc_texts()[:40])
    ids = tok(text, return_tensors="pt").input_ids[0, : 8 * 128].reshape(8, 128)
    surgeon.distill(model, data=ids, config=DistillConfig(stages=["transfer"], seq_len=128, transfer_steps=4,
                                                          progress=False))
    return model


@pytest.fixture(scope="module", params=["linearized", "distilled"])
def export(request, tmp_path_factory):
    torch.manual_seed(0)
    base, tok = load_smollm2()
    lm = surgeon.apply(base, LinearizeAttention(feature_map="hedgehog", window=64)).model.eval()
    if request.param == "distilled":
        lm = _distilled(lm, tok).eval()
    out = tmp_path_factory.mktemp(request.param)
    surgeon.export.to_onnx(lm, out / "onnx")
    return lm, out / "onnx"


def _verify(folder: Path, model: torch.nn.Module):
    return surgeon.export.verify(folder, model, shapes=SHAPES, n_generate=32, raise_on_failure=False, locate=False)


def test_correct_export_passes_at_every_length(export):
    model, out = export
    report = _verify(out, model)
    logits = {c.case: c for c in report.comparisons if c.output == "logits"}
    print({case: (f"{c.max_abs:.2e}", f"{c.snr_db:.1f} dB", c.greedy_agreement) for case, c in logits.items()})
    assert report.passed, report.first_failure
    assert set(logits) >= {f"1x{n}" for _, n in SHAPES}
    assert report.min_snr_db >= 80 and report.weight_mismatches == {}


def test_weight_edited_by_1e_3_relative_fails(export):
    model, out = export
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.layers[11].mlp.down_proj.weight.mul_(1 + 1e-3)
    report = _verify(out, edited)
    assert not report.passed and "weights differ" in report.first_failure


def test_changed_constant_fails(export, tmp_path):
    model, out = export
    proto = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    square = next(n for n, v, op in faults.scalar_constants(proto) if op == "Pow" and v == 2.0)   # RMSNorm's x²
    report = _verify(faults.change_constant(out, tmp_path / "const", square, 1.01), model)
    assert not report.passed and report.weight_mismatches == {}


def test_dropped_state_update_in_decode_fails(export, tmp_path):
    model, out = export
    report = _verify(faults.drop_state_update(out, tmp_path / "state", "15.recurrent"), model)
    assert not report.passed and "decode" in report.first_failure


def test_positions_offset_by_one_fail(export, tmp_path):
    model, out = export
    report = _verify(faults.offset_positions(out, tmp_path / "pos"), model)
    assert not report.passed and "decode" in report.first_failure
