"""surgeon.export.to_hf: a standard Hugging Face folder that loads the rewritten model (issue 15)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import transformers

import surgeon
import surgeon.export
from surgeon.core.errors import ExportError
from surgeon.models.hf_classes import SurgeonSaveWarning
from surgeon.passes import LinearizeAttention, LinearizeReLU


def tiny_llama(layers: int = 3, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def surgery():
    # a hybrid: layers 0 and 2 linearized (window 5), layer 1 kept as softmax attention
    return surgeon.apply(tiny_llama(), LinearizeAttention(window=5, layers=[0, 2]))


@pytest.fixture(scope="module")
def folder(surgery, tmp_path_factory):
    return surgeon.export.to_hf(surgery, tmp_path_factory.mktemp("hf") / "model")


def _ids(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_folder_layout_and_config(folder, surgery):
    assert {"config.json", "model.safetensors", "configuration_surgeon.py", "modeling_surgeon.py",
            "generation_config.json"} <= set(os.listdir(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "surgeon" and config["surgeon_base_model_type"] == "llama"
    assert config["auto_map"] == {"AutoConfig": "configuration_surgeon.SurgeonLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_surgeon.SurgeonLlamaForCausalLM"}
    assert config["layer_types"] == ["hybrid_sliding", "full_attention", "hybrid_sliding"]
    assert config["sliding_window"] == 5
    assert config["surgeon_recipe"] == surgery.recipe.to_dict()
    # transformers builds the linear layers' cache from the config alone
    loaded = transformers.AutoConfig.from_pretrained(folder)
    cache = transformers.DynamicCache(config=loaded)
    assert [type(layer).__name__ for layer in cache.layers] == [
        "LinearAttentionAndSlidingWindowAttentionLayer", "DynamicLayer", "LinearAttentionAndSlidingWindowAttentionLayer"]


def test_registered_classes_equal_logits_and_generate(folder, surgery):
    lm, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(lm).__name__ == "SurgeonLlamaForCausalLM"
    assert [type(layer.self_attn).__name__ for layer in lm.model.layers] == [
        "LinearAttention", "LlamaAttention", "LinearAttention"]
    ids = _ids(2, 23)                                   # not the length to_hf checked (11)
    assert torch.equal(lm(ids).logits, surgery.model(ids).logits)
    prompt = _ids(1, 9, seed=5)
    want = surgery.model.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(lm.generate(prompt, max_new_tokens=24, do_sample=False), want)


def test_save_pretrained_round_trip(folder, surgery, tmp_path):
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder)
    lm.save_pretrained(tmp_path / "again")
    assert {"configuration_surgeon.py", "modeling_surgeon.py"} <= set(os.listdir(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_surgeon.SurgeonLlamaForCausalLM"
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    ids = _ids(1, 17)
    assert torch.equal(again(ids).logits, surgery.model(ids).logits)


def test_remote_code_without_registration(folder, surgery, tmp_path):
    """A fresh process that never imports surgeon itself: trust_remote_code runs the folder's files."""
    ids = _ids(1, 13)
    torch.save({"ids": ids, "logits": surgery.model(ids).logits.detach(),
                "gen": surgery.model.generate(ids, max_new_tokens=16, do_sample=False)}, tmp_path / "want.pt")
    script = f"""
import sys, torch, transformers
lm = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
assert type(lm).__module__.startswith("transformers_modules"), type(lm).__module__
want = torch.load({str(tmp_path / 'want.pt')!r})
assert torch.equal(lm(want["ids"]).logits, want["logits"])
assert torch.equal(lm.generate(want["ids"], max_new_tokens=16, do_sample=False), want["gen"])
print("ok", type(lm).__name__)
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok SurgeonLlamaForCausalLM" in out.stdout


def test_plain_save_pretrained_warns(surgery, tmp_path):
    with pytest.warns(SurgeonSaveWarning, match="loads as the original model.*surgeon.export.to_hf"):
        surgery.model.save_pretrained(tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SurgeonSaveWarning)
        tiny_llama(layers=1).save_pretrained(tmp_path / "untouched")    # an unsurgered model: no warning


def test_existing_folder_with_another_model_is_refused(folder, surgery, tmp_path):
    other = surgeon.apply(tiny_llama(layers=2), LinearizeAttention(window=5))
    before = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    with pytest.raises(ExportError, match="another model.*overwrite=True"):
        surgeon.export.to_hf(other, folder)
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="other files"):
        surgeon.export.to_hf(other, tmp_path / "busy")
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no staging folder left
    surgeon.export.to_hf(other, tmp_path / "busy", overwrite=True)
    assert "notes.txt" not in os.listdir(tmp_path / "busy")


def test_passes_that_cannot_be_replayed_are_refused(tmp_path):
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    fx_surgery = surgeon.apply(mlp, LinearizeReLU(granularity="layer"))
    with pytest.raises(ExportError, match="not a transformers \\*ForCausalLM"):
        surgeon.export.to_hf(fx_surgery, tmp_path / "x")
    with pytest.raises(ExportError, match="recipe"):
        surgeon.export.to_hf(tiny_llama(layers=1), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_changed_after_surgery_is_caught(surgery, tmp_path):
    """Weights a recipe does not rebuild (a module added after apply) fail the load-back check."""
    import copy

    model = copy.deepcopy(surgery.model)
    model.model.layers[1].mlp.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ExportError, match="does not load back"):
        surgeon.export.to_hf(model, tmp_path / "z", recipe=surgery.recipe)
    assert not (tmp_path / "z").exists()
