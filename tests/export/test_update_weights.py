"""update_weights: an export made before fine-tuning takes the fine-tuned weights without tracing again.

The refreshed graphs pass verification (at shapes other than the export's) against the trained model,
and not against the model before training; an export of another architecture is refused before
anything is written; saved onnxruntime-optimized graphs are refused.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

import surgeon
import surgeon.export
from surgeon.core.errors import ConfigError, ExportError
from surgeon.export.background import BackgroundExport
from surgeon.export.weights import update_weights
from surgeon.passes import LinearizeAttention

MODELS = Path(__file__).parents[1] / "passes"
sys.path.insert(0, str(MODELS))
from attention_models import tiny_llama  # noqa: E402


def _train_like(model: torch.nn.Module, seed: int = 3) -> None:
    """Change what distillation changes: projections (merged LoRA), feature maps and the inline per-head scalars."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "v_proj", "feature_q", "window_logit", "linear_log_weight")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = surgeon.apply(tiny_llama(), LinearizeAttention(window=4, sinks=2)).model.eval()
    out = tmp_path_factory.mktemp("before_training")
    surgeon.export.to_onnx(model, out)
    return model, out


def test_refreshed_export_verifies_against_the_trained_model(exported, tmp_path):
    model, original_out = exported
    out = tmp_path / "onnx"
    shutil.copytree(original_out, out)
    trained = surgeon.apply(tiny_llama(), LinearizeAttention(window=4, sinks=2)).model.eval()
    trained.load_state_dict(model.state_dict())
    _train_like(trained)
    stale = surgeon.export.verify(out, trained, n_generate=8, raise_on_failure=False)
    assert not stale.passed and "weights differ" in stale.first_failure

    result = update_weights(out, trained)
    assert set(result.tensors) == {"prefill", "decode"} and min(result.tensors.values()) > 10
    fresh = surgeon.export.verify(out, trained, shapes=[(1, 11), (2, 30)], n_generate=8, raise_on_failure=False)
    assert fresh.passed, fresh.first_failure
    assert fresh.weight_mismatches == {} and fresh.min_snr_db > 100
    old = surgeon.export.verify(out, model, shapes=[(1, 11)], n_generate=4, raise_on_failure=False)
    assert not old.passed and "weights differ" in old.first_failure


def test_another_architecture_is_refused_and_nothing_is_written(exported, tmp_path):
    _, original_out = exported
    out = tmp_path / "onnx"
    shutil.copytree(original_out, out)
    before = _digest(out)
    wider = surgeon.apply(tiny_llama(intermediate_size=80), LinearizeAttention(window=4, sinks=2)).model.eval()
    with pytest.raises(ExportError, match="mlp.*shape .* another model"):
        update_weights(out, wider)
    assert _digest(out) == before


def test_saved_optimized_graphs_are_refused(exported, tmp_path):
    model, original_out = exported
    out = tmp_path / "onnx"
    shutil.copytree(original_out, out)
    manifest = surgeon.export.load_manifest(out)
    manifest.onnxruntime = {"optimized_models": {"prefill": {"file": "prefill.ort-extended.onnx"}}}
    manifest.save(out / "manifest.json")
    with pytest.raises(ExportError, match="export again"):
        update_weights(out, model)


@pytest.mark.slow   # ~1 min: a child process exports while this one "trains"
def test_background_export_while_training_then_finish_with_the_trained_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"{MODELS}{':' + __import__('os').environ.get('PYTHONPATH', '')}")
    surgery = surgeon.apply(tiny_llama(), LinearizeAttention(window=4, sinks=2))
    surgery.recipe.source = {"model": "attention_models:tiny_llama"}     # the child process rebuilds it
    with BackgroundExport.start(surgery, tmp_path / "onnx") as job:
        _train_like(surgery.model)                                        # "distillation" meanwhile
        assert job.running or job.process.returncode == 0
        update = job.finish(surgery.model)
    assert update.tensors["prefill"] > 10 and job.export_seconds > 0
    report = surgeon.export.verify(tmp_path / "onnx", surgery.model, shapes=[(1, 9), (2, 23)], n_generate=8,
                                   raise_on_failure=False)
    assert report.passed, report.first_failure


def test_background_export_errors_are_clear(tmp_path):
    surgery = surgeon.apply(tiny_llama(), LinearizeAttention(window=4))
    with pytest.raises(ConfigError, match="names its base model"):
        BackgroundExport.start(surgery, tmp_path / "onnx")
    surgery.recipe.source = {"model": "no_such_module:factory"}
    job = BackgroundExport.start(surgery, tmp_path / "onnx")
    with pytest.raises(ExportError, match="(?s)failed .*no_such_module"):
        job.wait(120)
