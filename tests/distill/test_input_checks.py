"""Bad input to the distillation helpers is refused with a ConfigError that says what to pass; the forms
that mean something (retrieval_heads' tensor, a per-layer list, JSON's string keys) are accepted."""
from __future__ import annotations

import json

import pytest
import torch

from surgeon.core.errors import ConfigError
from surgeon.distill.data import pack
from surgeon.distill.evaluate import held_out_windows
from surgeon.distill.planning import plan_memory

MASS = {0: 0.1, 1: 0.8, 2: 0.6, 3: 0.2}
PLAN = [1, 16, 14, 1]                # plan_memory(MASS, slots=8, boost=2.0), as its docstring


@pytest.mark.parametrize("scores", [
    json.loads(json.dumps(MASS)),                                    # string keys, as read back from JSON
    [0.1, 0.8, 0.6, 0.2],                                             # one score per layer
    torch.tensor([0.1, 0.8, 0.6, 0.2]),
    torch.tensor([[0.1, 0.0], [0.2, 0.8], [0.6, 0.1], [0.05, 0.2]]),  # retrieval_heads: (layers, heads), best head
], ids=["json-keys", "list", "1d-tensor", "heads-tensor"])
def test_plan_memory_accepts_every_meaningful_form(scores):
    assert plan_memory(scores, slots=8, boost=2.0) == PLAN


def test_plan_memory_keeps_the_none_exact_entry_from_json():
    scores = {-1: 0.25, 0: 0.25, 1: 0.75, 2: 0.5, 3: 0.0, 4: 0.25}
    assert plan_memory(json.loads(json.dumps(scores)), slots=64, boost=2.0) == [32, 128, 96, 32, 32]


@pytest.mark.parametrize("scores, message", [
    ({"first": 0.5}, "retrieval key 'first' is not a layer index"),
    ({0: "high"}, "the score of layer 0 is 'high'"),
    ({0: float("nan"), 1: 0.5}, "the score of layer 0 is nan"),
    (torch.zeros(2, 3, 4), r"a tensor of retrieval scores of shape \(2, 3, 4\)"),
    ("0.5,0.8", "retrieval is a str"),
    ({"1": 0.2, 1: 0.3}, "layer 1 appears twice"),
])
def test_plan_memory_names_the_expected_form(scores, message):
    with pytest.raises(ConfigError, match=message) as info:
        plan_memory(scores, slots=8)
    assert "per-layer list" in str(info.value) or "twice" in str(info.value)


@pytest.mark.parametrize("data", [torch.rand(4, 64) * 50, [torch.rand(64) * 50], torch.ones(2, 64, dtype=torch.bool)],
                         ids=["float-tensor", "float-item", "bool-tensor"])
def test_token_data_of_a_non_integer_dtype_is_refused(data):
    with pytest.raises(ConfigError, match=r"dtype torch\.(float32|bool); token ids must be an integer tensor"):
        pack(data, seq_len=16, vocab_size=100)
    assert pack(torch.randint(0, 100, (4, 64)), seq_len=16, vocab_size=100).shape == (16, 16)


def test_distill_refuses_float_token_ids_and_leaves_the_model_alone():
    import transformers

    import surgeon
    from surgeon.passes import LinearizeAttention

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)
    model = surgeon.apply(transformers.LlamaForCausalLM(cfg).eval(), LinearizeAttention(window=4)).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="dtype torch.float32"):
        surgeon.distill(model, data=torch.rand(8, 32) * 49, config=surgeon.DistillConfig(seq_len=16, transfer_steps=1,
                                                                                          lora_steps=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_held_out_windows_names_how_many_exist():
    data = torch.arange(10 * 32).remainder(50).view(10, 32)
    assert held_out_windows(None, 32, 10, data).shape == (10, 32)
    with pytest.raises(ConfigError, match="11 windows of 32 tokens asked for, but the evaluation data holds 10"):
        held_out_windows(None, 32, 11, data)
    with pytest.raises(ConfigError, match="holds 5; ask for at most 5"):
        held_out_windows(None, 64, 6, [list(range(40))] * 8)      # 320 tokens (no EOS between): 5 windows of 64
    with pytest.raises(ConfigError, match="n_windows must be an int >= 1"):
        held_out_windows(None, 32, 0, data)
