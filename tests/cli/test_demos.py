"""The two demos `surgeon demo` runs, end to end on the real pretrained weights (slow)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_efficientnet_demo_linearizes_exports_and_verifies(tmp_path):
    from surgeon.cli.demo import run_demo

    result = run_demo(tmp_path, show=False)
    assert result["sites"] == 33 and result["mask_init_max_abs_error"] <= 1e-5
    assert result["relu_count_before"] == 6_157_536
    assert 0 < result["relu_count_after"] < result["relu_count_before"] and result["channels_linearized"] > 0
    assert all(t["correct"] for t in result["top1_original"])            # chelsea, coffee: held-out photos
    held = result["held_out"]                                            # 3 photos x 18 views, never calibrated on
    assert held["photos"] == ["chelsea", "coffee", "retina"] and held["views"] == 54
    assert not set(held["photos"]) & set(result["calibration_photos"]) and result["calibration_views"] == 6 * 18
    assert held["agreeing_views"] == round(held["agreement"] * 54) and 0.0 <= held["agreement"] <= 1.0
    assert result["provenance"]["counts"]["held_out_views"] == 54
    assert result["verify"]["passed"] and result["verify"]["max_abs"] <= 1e-4
    assert json.loads((tmp_path / "demo.json").read_text())["relu_count_after"] == result["relu_count_after"]
    assert (tmp_path / "onnx" / "manifest.json").is_file() and (tmp_path / "surgery").is_dir()


@pytest.mark.slow
def test_smollm2_demo_linearizes_every_layer_and_still_answers(tmp_path):
    from surgeon.cli.demo_llm import run_llm_demo

    result = run_llm_demo(tmp_path, show=False, max_new_tokens=8)
    assert result["layers_converted"] == 30 and result["params_added"] == 369_180     # hedgehog, 16 features
    assert result["config"]["feature_map"] == "hedgehog" and result["config"]["window"] == 128
    assert result["config"]["sinks"] == 4 and result["prompt_tokens"] == 1152 and result["linear_fraction"] > 0.75
    base = result["equal_bytes_baseline"]                   # the same decode-state bytes, within one token's K/V
    assert 0 <= result["equal_bytes_baseline"]["converted_state_bytes"] - base["state_bytes"] < 30 * 3 * 2 * 64 * 4
    answers = result["answers"]
    assert base["policy"] == "sinks 4 + window 88 + h2o 87" and f"baseline ({base['policy']})" in answers
    assert answers["original (softmax)"]["text"].strip() and answers["linearized"]["text"].strip()
    assert answers["original (softmax)"]["agreement"] == 1.0 and 0.0 <= answers["linearized"]["agreement"] <= 1.0
    assert result["passed"]
    assert result["distill"] is None and result["onnx"] is None
    assert (tmp_path / "surgery").is_dir() and (tmp_path / "demo.json").is_file()
