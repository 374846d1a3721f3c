"""Every ``surgeon`` verb turns bad input into exit status 2 and a message naming what to change, never a
traceback; 1 stays the status of a failed check (``test_cli.py``: verify against the wrong model)."""
from __future__ import annotations

import pytest

from surgeon.cli.commands import main

MODEL = "surgeon_test_models:seeded_resnet"


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    # verify: tolerances must be finite numbers >= 0 (a raw ValueError, exit 1, before)
    (["verify", "x/onnx", "--model", MODEL, "--atol", "-1"], "argument --atol: must be a finite number >= 0, got '-1'"),
    (["verify", "x/onnx", "--model", MODEL, "--atol", "nan"], "argument --atol: must be a finite number >= 0, got 'nan'"),
    (["verify", "x/onnx", "--model", MODEL, "--rtol", "inf"], "argument --rtol: must be a finite number >= 0"),
    (["verify", "x/onnx", "--model", MODEL, "--ort-level", "fastest"], "unknown onnxruntime level 'fastest'"),
    (["verify", "x/onnx", "--model", MODEL, "--ort-threads", "0"], "argument --ort-threads: must be an integer >= 1"),
    (["verify", "x/onnx", "--model", MODEL], "no export manifest"),
    # apply: shapes
    (["apply", "--model", MODEL, "--pass", "LinearizeReLU", "--example-shape", "0,3,8,8", "--out", "x"],
     "shape must hold positive sizes"),
    (["apply", "--model", MODEL, "--pass", "LinearizeReLU", "--example-shape", "2,3,a", "--out", "x"],
     "shape must look like 2,3,224,224"),
    (["apply", "--model", MODEL, "--pass", "LinearizeReLU", "--example-shape", "2,5,8,8", "--out", "x"],
     "module 'stem.0' (Conv2d) expects 3 input channels"),
    # export
    (["export", "x/none", "--out", "x/onnx"], "recipe.json does not exist"),
    (["export", "x/none", "--out", "x/onnx", "--ort-optimize", "turbo"], "unknown onnxruntime level 'turbo'"),
    (["export", "x/none", "--out", "x/onnx", "--save-optimized", "turbo"], "unknown onnxruntime level 'turbo'"),
    (["export", "x/none", "--out", "x/onnx", "--ort-threads", "-2"], "must be an integer >= 1"),
    # report
    (["report", "x/none"], "holds neither a saved surgery"),
    (["report"], "needs a saved-surgery directory"),
    (["report", "--linearity", "smollm2", "--chunks", "0"], "argument --chunks: must be an integer >= 1"),
    (["report", "--linearity", "smollm2", "--seq-len", "x"], "argument --seq-len: must be an integer >= 1"),
    # demo
    (["demo", "--model", "efficientnet_lite0", "--min-fraction", "2"], "must be a fraction in (0, 1]"),
    (["demo", "--window", "-3"], "argument --window: must be an integer >= 0"),
    (["demo", "--distill-minutes", "nan"], "argument --distill-minutes: must be a finite number >= 0"),
    (["demo", "--model", "resnet"], "invalid choice: 'resnet'"),
    # distill
    (["distill", "x/none", "--out", "x/d", "--seq-len", "0"], "argument --seq-len: must be an integer >= 1"),
    (["distill", "x/none", "--out", "x/d", "--minutes", "-1"], "argument --minutes: must be a finite number > 0"),
    (["distill", "x/none", "--out", "x/d", "--eval-windows", "0"], "must be an integer >= 1"),
    (["distill", "x/none", "--out", "x/d", "--config", "{bad"], "--config is not valid JSON"),
    (["distill", "x/none", "--out", "x/d"], "recipe.json does not exist"),
    # export-hf, eval
    (["export-hf", "x/none", "--out", "x/hf"], "recipe.json does not exist"),
    (["eval", "x/none", "--out", "x/e", "--limit", "0"], "argument --limit: must be an integer >= 1"),
    (["eval", "x/none", "--out", "x/e", "--max-length", "-5"], "must be an integer >= 1"),
    (["eval", "x/none", "--out", "x/e", "--batch-size", "0"], "must be an integer >= 1"),
    # no verb / unknown verb
    ([], "required: command"),
    (["transplant"], "invalid choice: 'transplant'"),
])
def test_bad_input_exits_2_naming_what_to_change(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    verb = argv[0] if argv and argv[0] != "transplant" else ""
    assert err.splitlines()[-1].startswith(f"surgeon {verb}".rstrip() + ": error:" if verb else "surgeon: error:")
    assert not (tmp_path / "x").exists()                 # nothing written on failure


def test_help_exits_0(capsys):
    assert main(["verify", "--help"]) == 0
    assert "--atol" in capsys.readouterr().out
