"""The ``surgeon`` CLI end to end: apply → report → export → verify, and its failure exit codes."""
from __future__ import annotations

import json

import pytest
import torch

import surgeon
from surgeon.cli.commands import main

MODEL = "surgeon_test_models:seeded_resnet"


@pytest.fixture
def saved(tmp_path, capsys):
    out = tmp_path / "surgery"
    config = json.dumps({"granularity": "channel", "exclude": ["head.mix.1"]})
    assert main(["apply", "--model", MODEL, "--pass", "LinearizeReLU", "--config", config,
                 "--example-shape", "2,3,12,12", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LinearizeReLU" in printed and "relu_count" in printed
    return out


def test_apply_saves_a_restorable_surgery(saved, capsys):
    from surgeon_test_models import seeded_resnet

    restored = surgeon.restore(seeded_resnet(), saved)
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), seeded_resnet()(x), rtol=0, atol=1e-6)  # masks at init
    sites = [site.name for site in surgeon.core.persist.load_recipe(saved).entries[0].sites]
    assert len(sites) == 10 and "head.mix.1" not in sites  # 11 call sites, one excluded
    assert main(["report", str(saved)]) == 0
    text = capsys.readouterr().out
    assert "LinearizeReLU" in text and "layer1.0.relu@1" in text


def test_export_then_verify_passes_and_writes_json(saved, tmp_path, capsys):
    onnx_dir = tmp_path / "onnx"
    assert main(["export", str(saved), "--out", str(onnx_dir)]) == 0
    assert (onnx_dir / "manifest.json").is_file()
    assert main(["verify", str(onnx_dir), "--model", str(saved), "--json", str(tmp_path / "v.json")]) == 0
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] and report["max_abs"] <= 1e-5


def test_verify_against_the_wrong_model_exits_1(saved, tmp_path, capsys):
    onnx_dir = tmp_path / "onnx"
    assert main(["export", str(saved), "--out", str(onnx_dir)]) == 0
    assert main(["verify", str(onnx_dir), "--model", "surgeon_test_models:other_resnet"]) == 1
    assert "FAILED" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["apply", "--model", "nope", "--pass", "LinearizeReLU", "--out", "x"], "unknown model"),
    (["apply", "--model", MODEL, "--pass", "NoSuchPass", "--out", "x"], "NoSuchPass"),
    (["apply", "--model", MODEL, "--pass", "LinearizeReLU", "--config", "{bad", "--out", "x"], "not valid JSON"),
    (["apply", "--model", MODEL, "--pass", "LinearizeReLU", "--config", '{"granularity": "row"}',
      "--example-shape", "1,3,8,8", "--out", "x"], "granularity"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("surgeon apply: error:")
    assert not (tmp_path / "x").exists()  # nothing written on failure
