"""to_hf with memory slots: a per-layer plan set on the live model after apply is written into the folder
(not the recipe's original count), the folder loads back with it and generates the same tokens, and the
folder check runs a prompt long enough to reach the linear branch, the sinks and the slots."""
from __future__ import annotations

import pytest
import torch
import transformers

import surgeon
import surgeon.export
from surgeon.core.errors import ExportError
from surgeon.export.hf_folder import check_length
from surgeon.passes import LinearizeAttention
from surgeon.passes.attention.memory_slots import set_memory
from tests.clients.test_hf_folder import tiny_llama


def _slots(model: torch.nn.Module) -> list[int]:
    return [layer.self_attn.memory for layer in model.model.layers]


def test_a_live_plan_reaches_the_folder_and_generates_the_same(tmp_path):
    surgery = surgeon.apply(tiny_llama(layers=4), LinearizeAttention(feature_map="hedgehog", window=6, sinks=2,
                                                                     memory_block=8, linear_weight_init=0.3))
    set_memory(surgery.model, [4, 12, 8, 8])
    assert check_length(surgery.model) == 6 + 2 + 12 + 64
    path = surgeon.export.to_hf(surgery, tmp_path / "m")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert _slots(loaded) == [4, 12, 8, 8]
    ids = torch.randint(0, 64, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, surgery.model(ids).logits)
        want = surgery.model.generate(ids[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)
        got = loaded.generate(ids[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_the_folder_check_sees_what_only_long_prompts_show(tmp_path):
    """A window changed on the live model (state outside the recipe) is invisible at 11 tokens (both
    windows hold the whole prompt) and caught at the check's length."""
    surgery = surgeon.apply(tiny_llama(), LinearizeAttention(feature_map="elu1", window=16, sinks=0,
                                                             linear_weight_init=0.5))
    surgery.model.model.layers[1].self_attn.window = 12
    short = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    reference = surgeon.apply(tiny_llama(), LinearizeAttention(feature_map="elu1", window=16, sinks=0,
                                                               linear_weight_init=0.5)).model
    with torch.no_grad():
        want = reference(short).logits
        assert (surgery.model(short).logits - want).abs().max() <= 1e-6 * want.abs().max()   # under to_hf's bound
    with pytest.raises(ExportError, match="logits differ from the rewritten model's"):
        surgeon.export.to_hf(surgery, tmp_path / "m")
    assert not (tmp_path / "m").exists()
