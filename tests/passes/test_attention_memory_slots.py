"""Memory slots on Hugging Face models: a forward in blocks equals the same blocks sent through the cache, decoding
one token at a time equals a forward with one-token blocks, generate/beam search carry the slots, memory with room
for every token is the original model; bad requests are refused with the model untouched."""
from __future__ import annotations

import pytest
import torch
import transformers

import surgeon
from surgeon.core.errors import ConfigError, ExportError
from surgeon.export.causal_lm import export_causal_lm
from surgeon.export.stateful_lm import StateLayout
from surgeon.passes import LinearizeAttention
from surgeon.passes.attention.memory_slots import set_memory
from tests.passes.attention_models import VOCAB, tiny_llama, tiny_qwen2


def _ids(T: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_blocks_through_the_cache_equal_one_forward(build):
    model = surgeon.apply(build(), LinearizeAttention(feature_map="hedgehog", window=4, sinks=2, memory=3,
                                                      memory_block=5, linear_weight_init=0.3)).model
    ids = _ids(27)
    with torch.no_grad():
        full = model(ids).logits
        cache = transformers.DynamicCache(config=model.config)
        parts = [model(ids[:, lo:lo + 5], past_key_values=cache, use_cache=True).logits for lo in range(0, 27, 5)]
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-5


def test_decoding_equals_one_token_blocks_and_generate_carries_the_slots():
    model = surgeon.apply(tiny_llama(), LinearizeAttention(feature_map="hedgehog", window=4, sinks=2, memory=3,
                                                           memory_block=1, linear_weight_init=0.3)).model
    ids = _ids(20, batch=1)
    with torch.no_grad():
        full = model(ids).logits
        cache = transformers.DynamicCache(config=model.config)
        steps = [model(ids[:, :1], past_key_values=cache, use_cache=True).logits]
        steps += [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(1, 20)]
        assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
        greedy = model.generate(ids[:, :12], max_new_tokens=8, do_sample=False, pad_token_id=0)
        # the same continuation, recomputed token by token without a cache (one-token blocks: same slots)
        seq = ids[:, :12]
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(greedy, seq)
        beams = model.generate(ids[:, :12], max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (1, 16)


def test_memory_with_room_for_every_token_is_the_original_model():
    original = tiny_llama()
    model = surgeon.apply(original, LinearizeAttention(feature_map="elu1", window=3, sinks=0, memory=64,
                                                       memory_block=1, linear_weight_init=0.5)).model
    ids = _ids(30)
    with torch.no_grad():
        assert (model(ids).logits - original(ids).logits).abs().max() <= 1e-4
        set_memory(model, 0)   # the same model without slots is the hybrid: far from the original
        assert (model(ids).logits - original(ids).logits).abs().max() > 1e-2


def test_slots_per_layer_act_per_layer():
    """[room for every token, 0]: layer 0 is exact softmax, layer 1 the hybrid, as if only layer 1 were
    linearized; a list of the wrong length is refused and changes nothing."""
    original = tiny_llama()
    kw = dict(feature_map="elu1", window=3, sinks=0, memory_block=1, linear_weight_init=0.5)
    model = surgeon.apply(original, LinearizeAttention(**kw)).model
    only_second = surgeon.apply(original, LinearizeAttention(layers=[1], **kw)).model
    ids = _ids(30)
    assert set_memory(model, [64, 0]) == 2
    with torch.no_grad():
        assert (model(ids).logits - only_second(ids).logits).abs().max() <= 1e-4
        assert (model(ids).logits - original(ids).logits).abs().max() > 1e-2
    with pytest.raises(ConfigError, match="got 3 slot counts for 2 linearized attention layers"):
        set_memory(model, [1, 2, 3])
    with pytest.raises(ConfigError, match="slots must be an int >= 0, got -1"):
        set_memory(model, [4, -1])
    assert [m.memory for m in model.modules() if hasattr(m, "memory")] == [64, 0]


def test_a_bf16_model_decodes_with_memory_slots():
    model = surgeon.apply(tiny_llama().to(torch.bfloat16), LinearizeAttention(feature_map="hedgehog", window=4,
                                                                              memory=3, memory_block=4)).model
    ids = _ids(14, batch=1)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 19) and torch.isfinite(model(ids).logits.float()).all()


def test_bad_requests_are_refused_and_the_model_is_untouched(tmp_path):
    with pytest.raises(ConfigError, match="needs ungated attention"):
        LinearizeAttention(gate="liger", memory=4).validate()
    with pytest.raises(ConfigError, match="needs causal attention"):
        LinearizeAttention(memory=4, local=True).validate()
    with pytest.raises(ConfigError, match="memory_block must be an int >= 1"):
        LinearizeAttention(memory=4, memory_block=0).validate()
    gated = surgeon.apply(tiny_llama(), LinearizeAttention(feature_map="elu1", window=4, gate="liger")).model
    with pytest.raises(ConfigError, match=r"refused layers: model\.layers\.0\.self_attn.*nothing was changed"):
        set_memory(gated, 8)
    assert all(m.memory == 0 for m in gated.modules() if hasattr(m, "memory"))
    with pytest.raises(ConfigError, match="no linearized attention layer"):
        set_memory(tiny_llama(), 8)
    model = surgeon.apply(tiny_llama(), LinearizeAttention(feature_map="elu1", window=4, memory=2)).model
    with_slots = StateLayout.of(model)       # the decode state carries the slots: keys, values, a flag per slot
    assert [s.shape for s in with_slots.specs if s.kind.startswith("memory_")] == [(2, 2, 8), (2, 2, 8), (2, 2)] * 2
    with pytest.raises(ExportError, match=r"layers \[0, 1\] have memory slots"):
        export_causal_lm(model, tmp_path / "onnx")
    set_memory(model, 0)
    assert with_slots.state_bytes() - StateLayout.of(model).state_bytes() == 2 * (2 * 2 * 2 * 8 * 4 + 2 * 2)
