"""Verification tells float noise from real divergence: a correct export passes, each injected fault fails.

Faults (``export_faults.py``): a weight edited by 1e-3 relative, a changed constant, a state update
dropped in the decode graph, positions offset by one. Explicit tolerances are honoured exactly, and
arguments a path does not use raise. The SmolLM2 version (real weights, 37 to 2,048 tokens) is in
``tests/models/test_smollm2_verify.py`` (slow).
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import surgeon
import surgeon.export
from surgeon.core.errors import ConfigError, ExportError
from surgeon.export import DEFAULT_CRITERION, Criterion
from surgeon.passes import LinearizeAttention

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))
sys.path.insert(0, str(Path(__file__).parent))
import export_faults as faults  # noqa: E402
from attention_models import tiny_llama  # noqa: E402


# ----------------------------------------------------------------------------- the criterion itself

def _logits(seed: int = 0, shape: tuple[int, int] = (64, 200)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 4, shape).astype(np.float32)


def test_float_noise_passes_and_a_small_relative_error_fails():
    ref = _logits()
    noise = ref + np.random.default_rng(1).normal(0, 1e-6 * np.abs(ref).max(), ref.shape).astype(np.float32)
    ok = DEFAULT_CRITERION.check("logits", noise, ref, tokens=True)      # ~108 dB, as SmolLM2's real noise
    assert ok.passed and ok.snr_db > 100 and ok.greedy_agreement == 1.0 and ok.top_k_overlap > 0.99
    scaled = DEFAULT_CRITERION.check("logits", ref * (1 + 1e-3), ref, tokens=True)   # 60 dB: a real change
    assert not scaled.passed and 59 < scaled.snr_db < 61 and any("SNR" in r for r in scaled.reasons)
    shifted = DEFAULT_CRITERION.check("logits", np.roll(ref, 1, axis=0), ref, tokens=True)
    assert not shifted.passed and shifted.greedy_agreement < 0.1 and shifted.top_k_overlap < 0.2


def test_near_ties_do_not_count_against_greedy_agreement_but_decisive_flips_do():
    ref = _logits(2)
    top = ref.argmax(-1)
    tied = ref.copy()
    second = np.argsort(ref[0])[-2]
    tied[0, second] = ref[0, top[0]] - 1e-7                   # position 0: a near tie in the reference
    got = tied.copy()
    got[0, second], got[0, top[0]] = tied[0, top[0]], tied[0, second]   # ORT picks the other token
    v = Criterion(min_snr_db=None).check("logits", got, tied, tokens=True)
    assert v.near_ties >= 1 and v.greedy_agreement == 1.0 and v.passed
    flipped = tied.copy()
    flipped[1, top[1]] -= 5.0                                 # a decisive flip: 5 logits, far beyond noise
    w = Criterion(atol=10.0, rtol=0.0, min_snr_db=None).check("logits", flipped, tied, tokens=True)
    assert not w.passed and w.greedy_agreement < 1.0 and "greedy" in w.reasons[0]


def test_explicit_tolerances_are_used_exactly():
    ref = _logits(3)
    got = ref + 2e-5
    assert Criterion.resolve(None, atol=1e-5).check("y", got, ref).n_bad == ref.size
    assert Criterion.resolve(None, atol=3e-5, rtol=0.0).check("y", got, ref).n_bad == 0
    assert Criterion.resolve(None, atol=3e-5).explicit and not DEFAULT_CRITERION.explicit
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="atol must be a finite number ≥ 0"):
            Criterion.resolve(None, atol=bad)
    with pytest.raises(ConfigError, match="Criterion"):
        Criterion.resolve({"atol": 1.0})                      # type: ignore[arg-type]


def _peaked(seed: int, shape: tuple[int, int] = (400, 2000)) -> np.ndarray:
    """Logits with max |logit| 30 (as the audit's case)."""
    ref = _logits(seed, shape)
    return (ref * (30.0 / np.abs(ref).max())).astype(np.float32)


def test_a_few_hundred_logits_off_in_one_output_fail():
    """300 logits of one vocabulary entry off by 0.9 x the element bound (0.054 at max |logit| 30): the output's
    SNR stays above its floor (the audit's finding: such a fault passed), the entry's own SNR does not."""
    ref = _peaked(4, (1000, 4000))
    bound = DEFAULT_CRITERION.element_bound(ref)
    got = ref.copy()
    got[:300, 17] += 0.9 * bound
    loose = Criterion(min_local_snr_db=None).check("logits", got, ref, tokens=True)
    assert loose.passed and loose.snr_db > 80 and loose.n_bad == 0               # what passed before
    v = DEFAULT_CRITERION.check("logits", got, ref, tokens=True)
    assert not v.passed and v.snr_db > 80
    assert v.reasons == [next(r for r in v.reasons if r.startswith("1 feature(s) (last-axis index 17) with SNR"))]
    scattered = ref.copy()                                     # the same error over 4 entries: still caught
    scattered[:300, [3, 99, 500, 3999]] -= 0.9 * bound
    assert not DEFAULT_CRITERION.check("logits", scattered, ref, tokens=True).passed


def test_float_noise_with_loud_positions_passes():
    """Float noise: relative 1e-6 everywhere, and one position (a massive activation) 340x louder, whose largest
    errors exceed half the element bound; each feature averages them over every position and passes."""
    ref = _peaked(5)
    rng = np.random.default_rng(6)
    scale = float(np.abs(ref).max())
    noise = rng.normal(0, 1e-6 * scale, ref.shape)
    noise[57] *= 340
    got = (ref + noise).astype(np.float32)
    v = DEFAULT_CRITERION.check("logits", got, ref, tokens=True)
    judged = np.abs(got.astype(np.float64) - ref).max(0) > 0.5 * DEFAULT_CRITERION.element_bound(ref)
    assert judged.sum() >= 1                                   # the per-feature check is reached, and passes
    assert v.passed, v.reasons
    assert v.snr_db > 80 and v.greedy_agreement == 1.0


def test_an_output_of_another_shape_fails_with_both_shapes():
    ref = _logits(7, (4, 10))
    v = DEFAULT_CRITERION.check("state.0.keys", ref[:, :8], ref)
    assert not v.passed and v.reasons == ["shape [4, 8] in onnxruntime, [4, 10] in PyTorch"]


def test_nan_fails_and_an_all_zero_output_with_tiny_noise_passes():
    ref = np.zeros((4, 8), np.float32)
    assert DEFAULT_CRITERION.check("y", ref + 1e-9, ref).passed
    bad = DEFAULT_CRITERION.check("y", np.full_like(ref, np.nan), ref)
    assert not bad.passed and not bad.finite and "NaN" in bad.reasons[0]


# ----------------------------------------------------------------------------- one tiny export, five verdicts

@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model = surgeon.apply(tiny_llama(), LinearizeAttention(window=4)).model.eval()
    out = tmp_path_factory.mktemp("lm")
    surgeon.export.to_onnx(model, out)
    return model, out


def _verify(folder: Path, model: torch.nn.Module, **kw):
    return surgeon.export.verify(folder, model, n_generate=16, raise_on_failure=False, **kw)


def test_correct_export_passes_with_the_default_criterion(export, tmp_path):
    model, out = export
    report = _verify(out, model)
    assert report.passed, report.first_failure
    assert report.criterion == DEFAULT_CRITERION.to_dict() and report.atol is None
    assert report.min_snr_db > 120 and report.weight_mismatches == {}
    decode = [c for c in report.comparisons if c.case.endswith("decode")]
    assert decode and all(c.passed for c in decode) and any(c.output.endswith("recurrent") for c in decode)
    report.save(tmp_path / "verify.json")
    saved = json.loads((tmp_path / "verify.json").read_text())
    assert saved["criterion"]["description"] == DEFAULT_CRITERION.describe()
    assert "Criterion: " in (tmp_path / "verify.md").read_text()


def test_weight_edited_by_1e_3_relative_fails(export):
    model, out = export
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight.mul_(1 + 1e-3)
    report = _verify(out, edited)
    assert not report.passed and "weights differ" in report.first_failure
    assert set(report.weight_mismatches) == {"prefill:model.layers.1.mlp.down_proj.weight",
                                             "decode:model.layers.1.mlp.down_proj.weight"}


def test_changed_constant_fails(export, tmp_path):
    model, out = export
    proto = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    square = next(n for n, v, op in faults.scalar_constants(proto) if op == "Pow" and v == 2.0)   # RMSNorm's x²
    report = _verify(faults.change_constant(out, tmp_path / "const", square, 1.01), model)
    assert not report.passed and report.weight_mismatches == {}
    assert report.first_failure.startswith(("logits", "state."))


def test_dropped_state_update_in_decode_fails(export, tmp_path):
    model, out = export
    report = _verify(faults.drop_state_update(out, tmp_path / "state", "1.recurrent"), model)
    assert not report.passed and "decode" in report.first_failure
    assert all(c.passed for c in report.comparisons if not c.case.endswith("decode"))   # prefill is intact


def test_positions_offset_by_one_in_decode_fail(export, tmp_path):
    model, out = export
    report = _verify(faults.offset_positions(out, tmp_path / "pos"), model)
    assert not report.passed and "decode" in report.first_failure and "SNR" in report.first_failure


# ----------------------------------------------------------------------------- no silent loosening

def test_explicit_tolerance_is_not_widened_for_causal_lms(export):
    model, out = export
    strict = _verify(out, model, atol=1e-12, rtol=0.0)           # float noise here is ~1e-7
    assert not strict.passed and strict.atol == 1e-12 and strict.rtol == 0.0
    assert "elements beyond the element bound" in strict.first_failure


def test_arguments_a_path_does_not_use_raise(export, tmp_path):
    model, out = export
    for kwargs in ({"inputs": [(torch.zeros(1, 4, dtype=torch.long),)]}, {"n_shapes": 2}, {"graph": "prefill"}):
        with pytest.raises(ConfigError, match="do not apply to a prefill/decode export"):
            surgeon.export.verify(out, model, **kwargs)
    net = torch.nn.Linear(4, 2)
    surgeon.export.to_onnx(net, tmp_path / "fwd", torch.randn(2, 4))
    with pytest.raises(ConfigError, match="shapes / n_generate apply to prefill/decode exports"):
        surgeon.export.verify(tmp_path / "fwd", net, shapes=[(1, 8)])


# ----------------------------------------------------------------------------- bad input

def test_manifest_of_another_model_is_named(export):
    _, out = export
    other = surgeon.apply(tiny_llama(num_hidden_layers=3), LinearizeAttention(window=4)).model
    with pytest.raises(ExportError, match=r"exported from another model.*num_hidden_layers"):
        surgeon.export.verify(out, other)


def test_truncated_graph_is_named(export, tmp_path):
    model, out = export
    broken = Path(shutil.copytree(out, tmp_path / "lm"))
    data = (broken / "decode.onnx").read_bytes()
    (broken / "decode.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"cannot load .*decode\.onnx"):
        surgeon.export.verify(broken, model)


def test_state_shapes_that_disagree_with_the_manifest_are_named(export, tmp_path):
    model, out = export
    broken = Path(shutil.copytree(out, tmp_path / "lm"))
    manifest = json.loads((broken / "manifest.json").read_text())
    spec = next(s for s in manifest["exporter"]["state"] if s["kind"] == "recurrent")
    spec["shape"][2] += 1
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=rf"decode\.onnx takes state_in\.{spec['layer']}\.recurrent of shape"):
        surgeon.export.verify(broken, model)


def test_last_logits_only_export_is_refused_with_a_reason(export, tmp_path):
    model, out = export
    folder = Path(shutil.copytree(out, tmp_path / "lm"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["exporter"]["last_logits_only"] = True
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="last position's logits only"):
        surgeon.export.verify(folder, model)
