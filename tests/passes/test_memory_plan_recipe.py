"""A per-layer memory-slot plan lives in the recipe: ``LinearizeAttention(memory=[..])`` builds it, and
``set_memory`` on a live (distilled) model is written by ``surgeon.save`` and rebuilt by ``surgeon.restore``
with identical outputs at prompts long enough to fill the slots."""
from __future__ import annotations

import json

import pytest
import torch

import surgeon
from surgeon.core.errors import ConfigError
from surgeon.passes import LinearizeAttention
from surgeon.passes.attention.memory_slots import set_memory
from tests.passes.attention_models import VOCAB, tiny_llama

KW = dict(feature_map="hedgehog", window=4, sinks=2, memory_block=8, linear_weight_init=0.3)


def _slots(model: torch.nn.Module) -> list[int]:
    return [layer.self_attn.memory for layer in model.model.layers if hasattr(layer.self_attn, "memory")]


def _ids(T: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(1))


def test_a_plan_set_after_apply_is_saved_and_restored(tmp_path):
    base = tiny_llama(num_hidden_layers=4)
    surgery = surgeon.apply(base, LinearizeAttention(**KW))
    for p in surgery.model.parameters():          # stand-in for distillation: weights the base does not have
        if p.requires_grad:
            p.data.add_(0.01 * torch.randn_like(p))
    set_memory(surgery.model, [4, 12, 8, 8])
    surgeon.save(surgery, tmp_path)
    saved = json.loads((tmp_path / "recipe.json").read_text())["passes"][0]["config"]
    assert saved["memory"] == [4, 12, 8, 8] and saved["memory_block"] == 8
    restored = surgeon.restore(tiny_llama(num_hidden_layers=4), tmp_path)
    assert _slots(restored) == [4, 12, 8, 8]
    ids = _ids(4 + 12 + 64)                       # window + slots + 64: every slot filled and replaced
    with torch.no_grad():
        want, got = surgery.model(ids).logits, restored(ids).logits
        uniform = surgeon.restore(tiny_llama(num_hidden_layers=4), tmp_path)
        set_memory(uniform, 8)
        other = uniform(ids).logits
    assert torch.equal(got, want)
    assert (other - want).abs().max() > 1e-4      # the plan matters at this length: a uniform one differs


def test_the_plan_in_the_config_builds_it_and_a_uniform_plan_stays_an_int(tmp_path):
    surgery = surgeon.apply(tiny_llama(num_hidden_layers=3), LinearizeAttention(memory=[0, 5, 2], **KW))
    assert _slots(surgery.model) == [0, 5, 2]
    set_memory(surgery.model, 3)
    surgeon.save(surgery, tmp_path)
    assert json.loads((tmp_path / "recipe.json").read_text())["passes"][0]["config"]["memory"] == 3
    hybrid = surgeon.apply(tiny_llama(num_hidden_layers=3), LinearizeAttention(layers=[0, 2], memory=[6, 1], **KW))
    assert [getattr(layer.self_attn, "memory", None) for layer in hybrid.model.model.layers] == [6, None, 1]


def test_bad_plans_are_refused_naming_the_layers():
    base = tiny_llama(num_hidden_layers=3)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match=r"gives 2 slot counts for 3 converted layers \(model\.layers\.0\.self_attn"):
        surgeon.apply(base, LinearizeAttention(memory=[1, 2], **KW))
    assert type(base.model.layers[0].self_attn).__name__ == "LlamaAttention"
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match=r"memory must be an int >= 0 \(or a list of them"):
        LinearizeAttention(memory=[1, -2]).validate()
    with pytest.raises(ConfigError, match="needs ungated attention"):
        LinearizeAttention(memory=[0, 3], gate="liger").validate()
    model = surgeon.apply(base, LinearizeAttention(**KW)).model
    with pytest.raises(ConfigError, match="per-head plan"):
        set_memory(model, [[1, 2], 3, 4])
    assert _slots(model) == [0, 0, 0]
