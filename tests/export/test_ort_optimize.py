"""onnxruntime graph optimization levels: parity at unseen shapes, the manifest's choice, sessions, saved graphs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import surgeon
import surgeon.export
from surgeon.core.errors import ConfigError, ExportError, VerificationError
from surgeon.export import ort_optimize as ortopt
from surgeon.export.stateful_lm import PrefillLM
from surgeon.passes import LinearizeAttention

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))
from attention_models import VOCAB, tiny_llama  # noqa: E402

FAST = {"threads": 1, "repeats": 2}


def make_cnn(seed: int = 0) -> torch.nn.Module:
    """Conv + BN + ReLU twice (fusable at the higher levels), global mean, linear head."""
    torch.manual_seed(seed)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory):
    """A tiny linearized Llama exported once, every level checked, the extended graphs saved."""
    model = surgeon.apply(tiny_llama(num_hidden_layers=1), LinearizeAttention(feature_map="hedgehog", window=8)).model
    out = tmp_path_factory.mktemp("ortlm") / "onnx"
    result = surgeon.export.to_onnx(model, out, ort_optimize=FAST, save_optimized=True)
    return model, out, result


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory):
    model = make_cnn().eval()
    out = tmp_path_factory.mktemp("ortcnn") / "onnx"
    result = surgeon.export.to_onnx(model, out, torch.randn(2, 3, 16, 16), ort_optimize=FAST)
    return model, out, result


def _level(sess) -> str:
    return ortopt.parse_level(sess.get_session_options().graph_optimization_level)


def test_every_level_keeps_parity_at_unseen_shapes(lm_export, cnn_export):
    for _, _, result in (lm_export, cnn_export):
        report = result.ort
        graphs = sorted(result.manifest.graphs)
        assert sorted({r.graph for r in report.results}) == graphs
        assert {r.level for r in report.results} == set(ortopt.LEVELS)
        for r in report.results:
            assert r.passed and r.max_abs <= 1e-4 and r.n_bad == 0 and r.ms > 0, r
        assert report.reference == "pytorch"
    lm_shapes = lm_export[2].ort.shapes["prefill"]
    assert lm_shapes == ["1x64", "3x128"] and "2x192" not in lm_shapes          # export example: 2 x 192
    assert all("x=2x" not in s for s in cnn_export[2].ort.shapes["model"])      # export batch: 2
    # the optimizations did something: the extended graph has fewer nodes than the raw one
    nodes = {(r.graph, r.level): r.nodes for r in lm_export[2].ort.results}
    assert nodes[("prefill", "extended")] < nodes[("prefill", "disabled")]


def test_manifest_records_the_fastest_passing_level(lm_export, cnn_export):
    for _, out, result in (lm_export, cnn_export):
        manifest = surgeon.export.load_manifest(out)
        for gname, graph in manifest.graphs.items():
            rows = [r for r in result.ort.results if r.graph == gname]
            fastest = min(r.ms for r in rows)
            chosen = next(r for r in rows if r.level == graph.ort_level)
            assert chosen.ms <= fastest * (1 + ortopt.TIE)
            assert graph.ort_level == result.ort.best[gname]
        table = manifest.onnxruntime["optimization"]
        assert table["best"] == result.ort.best and manifest.onnxruntime["onnxruntime"] == ort.__version__
        assert ortopt.OptimizeReport.from_dict(table).best == result.ort.best
        assert "chosen" in str(result.ort) and "parity" in str(result.ort)


def test_sessions_honour_the_manifest_level(lm_export, cnn_export):
    model, out, result = lm_export
    gen = surgeon.export.OnnxGenerator(out, threads=1)
    assert gen.levels == result.ort.best
    assert _level(gen.prefill) == result.ort.best["prefill"] and _level(gen.decode) == result.ort.best["decode"]
    forced = surgeon.export.OnnxGenerator(out, threads=1, level="basic")
    assert _level(forced.prefill) == _level(forced.decode) == "basic"
    report = surgeon.export.verify(out, model)
    assert report.passed and report.ort_levels == result.ort.best
    cnn, cnn_out, cnn_result = cnn_export
    rep = surgeon.export.verify(cnn_out, cnn)
    assert rep.passed and rep.ort_level == cnn_result.ort.best["model"]
    assert surgeon.export.verify(cnn_out, cnn, ort_level="disabled").ort_level == "disabled"


def test_saved_optimized_graphs_load_and_match(lm_export):
    model, out, result = lm_export
    saved = surgeon.export.load_manifest(out).onnxruntime["optimized_models"]
    assert sorted(saved) == ["decode", "prefill"]
    info = saved["prefill"]
    assert info["file"] == "prefill.ort-extended.onnx" and info["level"] == "extended" and info["passed"]
    assert "warning" not in info                                  # extended: no hardware-specific fusions
    for s in saved.values():
        assert (out / s["file"]).is_file() and all((out / f).is_file() for f in s["data_files"])
    sess = ortopt.make_session(out / info["file"], "disabled", threads=1)
    ids = torch.randint(0, VOCAB, (2, 320), generator=torch.Generator().manual_seed(5))   # another new shape
    mask = torch.ones_like(ids)
    mask[0, :50] = 0
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = PrefillLM(model)(ids, mask)
    assert np.abs(got[0] - want[0].numpy()).max() <= 1e-4
    for g, w in zip(got[1:], want[1:]):
        assert np.allclose(g, w.numpy(), atol=1e-4, rtol=1e-3)


def test_a_level_that_breaks_parity_is_reported_and_not_chosen(cnn_export, monkeypatch):
    model, out, _ = cnn_export
    real = ortopt.make_session

    class Broken:                        # what a buggy fusion would do: shift every float output
        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feeds):
            return [o + 0.5 if o.dtype.kind == "f" else o for o in self.sess.run(names, feeds)]

    def fake(path, level=None, *args, **kw):
        sess = real(path, level, *args, **kw)
        return Broken(sess) if level == "layout" else sess

    monkeypatch.setattr(ortopt, "make_session", fake)
    before = (out / "manifest.json").read_text()
    report = surgeon.export.optimize(out, model, levels=["layout", "extended"], record=False, **FAST)
    bad = [r for r in report.results if not r.passed]
    assert [r.level for r in bad] == ["layout"] and bad[0].max_abs >= 0.4
    assert report.best["model"] in ("disabled", "extended")
    assert "layout: breaks parity; not chosen" in str(report)
    with pytest.raises(VerificationError, match="breaks parity"):       # and it is never saved
        surgeon.export.optimize(out, model, levels=["layout"], save="layout", **FAST)
    assert (out / "manifest.json").read_text() == before and not list(out.glob("*.ort-layout*"))


def test_no_level_keeps_parity_raises_and_leaves_the_manifest(cnn_export):
    model, out, _ = cnn_export
    other = make_cnn(seed=1).eval()
    before = (out / "manifest.json").read_text()
    with pytest.raises(VerificationError, match="no onnxruntime optimization level keeps") as err:
        surgeon.export.optimize(out, other, **FAST)
    assert err.value.report.failed()
    assert (out / "manifest.json").read_text() == before


def test_bad_levels_are_clear_errors(cnn_export, tmp_path):
    model, out, _ = cnn_export
    for bad in ("fast", "O3", 7, True):
        with pytest.raises(ConfigError, match="unknown onnxruntime graph optimization level"):
            ortopt.parse_level(bad)
    with pytest.raises(ConfigError, match=r"use one of \['disabled', 'basic', 'extended'"):
        surgeon.export.to_onnx(model, tmp_path / "never", torch.randn(2, 3, 16, 16), ort_optimize=["turbo"])
    assert not (tmp_path / "never").exists()                   # refused before any export work
    with pytest.raises(ConfigError):
        surgeon.export.optimize(out, model, save="max")
    data = json.loads((out / "manifest.json").read_text())
    data["graphs"]["model"]["ort_level"] = "fastest"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match="'ort_level' must be one of"):
        surgeon.export.load_manifest(tmp_path / "m")
    assert ortopt.parse_level(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED) == "extended"


def test_cli_export_with_levels_and_verify_prints_the_table(tmp_path, capsys):
    from surgeon.cli.commands import main

    surgery, onnx_dir = tmp_path / "surgery", tmp_path / "onnx"
    assert main(["apply", "--model", "surgeon_test_models:seeded_resnet", "--pass", "LinearizeReLU",
                 "--example-shape", "2,3,12,12", "--out", str(surgery)]) == 0
    assert main(["export", str(surgery), "--out", str(onnx_dir), "--ort-optimize", "basic", "extended",
                 "--ort-threads", "1", "--save-optimized"]) == 0
    manifest = surgeon.export.load_manifest(onnx_dir)
    assert manifest.graph().ort_level in ("disabled", "basic", "extended")
    assert (onnx_dir / "model.ort-extended.onnx").is_file()
    capsys.readouterr()
    assert main(["verify", str(onnx_dir), "--model", str(surgery)]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime graph optimization levels" in out and "recorded at export" in out
    assert f"onnxruntime optimization level: {manifest.graph().ort_level}" in out
