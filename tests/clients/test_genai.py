"""surgeon.export.to_genai: onnxruntime-genai's own Generator runs the linearized model (issue 15)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import surgeon
import surgeon.export
from surgeon.core.errors import ExportError
from surgeon.passes import LinearizeAttention

og = pytest.importorskip("onnxruntime_genai", reason="pip install 'surgeon[clients]'")

VOCAB = 64


def tiny_llama(layers: int = 2, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return surgeon.apply(tiny_llama(), LinearizeAttention(window=6)).model


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    return surgeon.export.to_genai(model, tmp_path_factory.mktemp("genai") / "m").onnx_path.parent


def _hf(model, prompt: list[int], new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)[0].tolist()
    eos = model.generation_config.eos_token_id
    if eos in out[len(prompt):]:                       # genai stops at EOS without appending it
        out = out[: len(prompt) + out[len(prompt):].index(eos)]
    return out


def _genai(folder, prompts: list[list[int]], new: int) -> list[list[int]]:
    m = og.Model(str(folder))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=max(map(len, prompts)) + new, do_sample=False, batch_size=len(prompts))
    g = og.Generator(m, params)
    pad = json.loads((folder / "genai_config.json").read_text())["model"]["pad_token_id"]
    width = max(map(len, prompts))
    g.append_tokens(np.array([p + [pad] * (width - len(p)) for p in prompts], dtype=np.int32))   # genai: right padding
    while not g.is_done():
        g.generate_next_token()
    return [list(g.get_sequence(i))[width:] for i in range(len(prompts))]


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_config_and_graphs(folder):
    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "decoder-pipeline"
    stages = decoder["pipeline"][0]
    assert (stages["prompt"]["run_on_prompt"], stages["prompt"]["run_on_token_gen"]) == (True, False)
    assert (stages["decode"]["run_on_prompt"], stages["decode"]["run_on_token_gen"]) == (False, True)
    assert "position_ids" not in stages["decode"]["inputs"]
    assert "past_key_values.1.conv_state" in stages["decode"]["inputs"]
    manifest = surgeon.export.load_manifest(folder)
    logits = manifest.graph("prompt").outputs[0]
    assert logits.shape == [1, 1, VOCAB]                       # last position only (the default)
    assert manifest.graph("prompt").inputs[0].shape == [1, "sequence"]


@pytest.mark.parametrize("length", [1, 64, 77])      # one token, the chunk length, past it
def test_generator_equals_hf_generate_batch1(folder, model, length):
    prompt = _prompt(length, seed=length)
    assert _genai(folder, [prompt], 64)[0] == _hf(model, prompt, 64)[length:]


def test_batches_are_refused_with_a_clear_message(folder):
    with pytest.raises(Exception, match="(?s)input_ids.*Expected: 1"):
        _genai(folder, [_prompt(5, 1), _prompt(5, 2)], 4)


def test_prompt_graph_any_length_matches_the_model(folder, model):
    """The prompt graph directly in onnxruntime: a length that is no chunk multiple, right padding."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "prompt.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.tensor([_prompt(19, 7)])
    for valid in (19, 13):                                   # 13: the last 6 tokens are right padding
        mask = torch.zeros_like(ids)
        mask[:, :valid] = 1
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        for inp in sess.get_inputs()[2:]:
            feeds[inp.name] = np.zeros(inp.shape, dtype=np.float32)
        logits = sess.run(["logits"], feeds)[0]
        with torch.no_grad():
            want = model(ids[:, :valid]).logits[0, -1]
        assert logits.shape == (1, 1, VOCAB)
        assert np.abs(logits[0, -1] - want.numpy()).max() < 1e-4


def test_softmax_layers_are_refused(tmp_path):
    hybrid = surgeon.apply(tiny_llama(layers=2), LinearizeAttention(window=6, layers=[0])).model
    with pytest.raises(ExportError, match=r"layers \[1\] are kept as softmax attention"):
        surgeon.export.to_genai(hybrid, tmp_path / "g")
    assert not (tmp_path / "g").exists() and not list(tmp_path.iterdir())
