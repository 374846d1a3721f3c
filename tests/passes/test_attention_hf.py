"""LinearizeAttention on stock Hugging Face models (module-swap path): wiring, decoding, generate, padding."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import surgeon
from surgeon.passes import LinearizeAttention

from attention_models import CAUSAL_FAMILIES, VOCAB, tiny_bert, tiny_llama, tiny_vit

SEQ = 40


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decode_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill ``prefill`` tokens, then feed the rest one at a time through the cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", sorted(CAUSAL_FAMILIES))
def test_window_covering_the_sequence_is_exact_softmax(family):
    """window ≥ length: every key is in the softmax window, so the pass must reproduce the model exactly.
    This checks the wiring per family: projections, biases, rotary, q/k norms, GQA, scale, masks."""
    model = CAUSAL_FAMILIES[family]()
    ids = _tokens(2, SEQ)
    s = surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=SEQ))
    with torch.no_grad():
        ref, got = model(ids).logits, s.model(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", sorted(CAUSAL_FAMILIES))
def test_decode_equals_prefill_every_family(family):
    model = CAUSAL_FAMILIES[family]()
    s = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=16, gate="liger"))
    ids = _tokens(1, 260)
    with torch.no_grad():
        full = s.model(ids).logits
    stepped = _decode_logits(s.model, ids, prefill=5)
    err = (stepped - full).abs().max().item()
    print(f"decode vs prefill, {family}, hedgehog-liger-w16, 260 tokens: max abs {err:.2e}")
    assert err <= 1e-4, err
    assert not torch.allclose(full, model(ids).logits, atol=1e-2)  # it really is a different attention


KINDS = [
    dict(feature_map=f, gate="none", window=w) for f in ("elu1", "relu", "hedgehog", "taylor2") for w in (0, 16)
] + [
    dict(feature_map="hedgehog", gate="liger", window=0), dict(feature_map="elu1", gate="learned", window=16),
    dict(feature_map="hedgehog", gate="learned", window=1), dict(feature_map="hedgehog", gate="liger", window=64),
]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k['feature_map']}-{k['gate']}-w{k['window']}")
def test_decode_equals_prefill_every_kind(kind):
    """Token-by-token decoding through the cache gives the full forward's logits over 256+ tokens,
    including windows that fill and slide (window 16 / 64 < 270 tokens)."""
    s = surgeon.apply(tiny_llama(), LinearizeAttention(**kind))
    ids = _tokens(1, 270, seed=2)
    with torch.no_grad():
        full = s.model(ids).logits
    stepped = _decode_logits(s.model, ids, prefill=33)
    err = (stepped - full).abs().max().item()
    print(f"decode vs prefill, tiny Llama, {kind}, 270 tokens: max abs {err:.2e}")
    assert err <= 1e-4, err


def _assert_generate_is_greedy_argmax(model, prompt, n: int) -> None:
    """``generate`` (through the cache) = argmax of full forwards without any cache, for n new tokens."""
    model.generation_config.eos_token_id = None       # always n new tokens, like the reference
    out = model.generate(prompt, max_new_tokens=n, do_sample=False)
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_generate_with_every_layer_purely_linear(family):
    """window=0: no softmax anywhere; generate() through the recurrent cache = argmax of full forwards."""
    s = surgeon.apply(CAUSAL_FAMILIES[family](), LinearizeAttention(feature_map="elu1", window=0))
    _assert_generate_is_greedy_argmax(s.model, _tokens(2, 9, seed=4), 20)


def test_generate_works_unchanged_and_state_stays_constant():
    s = surgeon.apply(tiny_llama(), LinearizeAttention(feature_map="hedgehog", window=8))
    _assert_generate_is_greedy_argmax(s.model, _tokens(1, 12, seed=3), 30)
    cache = DynamicCache(config=s.model.config)
    with torch.no_grad():
        s.model(_tokens(1, 300), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == 7                      # window − 1 keys kept, not 300
    assert layer.recurrent_states[0].shape == (1, 6, 16, 9)  # (batch, heads, hedgehog 2·8 features, head_dim + 1)
    assert cache.get_seq_length() == 300


def test_left_padding_matches_unpadded_rows():
    s = surgeon.apply(tiny_llama(), LinearizeAttention(feature_map="hedgehog", window=8, gate="liger"))
    short, long = _tokens(1, 20, seed=4), _tokens(1, 29, seed=5)
    ids = torch.cat([torch.cat([torch.zeros(1, 9, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does: padding does not shift positions
    with torch.no_grad():
        batched = s.model(ids, attention_mask=mask, position_ids=positions).logits
        alone = s.model(short).logits
        out = s.model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone_gen = s.model.generate(short, max_new_tokens=6, do_sample=False)
    assert (batched[0, 9:] - alone[0]).abs().max().item() <= 1e-4
    assert torch.equal(out[0, 9:], alone_gen[0])


def test_projections_keep_their_names_and_parameters():
    model = tiny_llama()
    s = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=16, layers=[1]))
    before = model.state_dict()
    after = s.model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # every original tensor, same name, same value
    added = sorted(set(after) - set(before))
    assert added == ["model.layers.1.self_attn.feature_k.weight", "model.layers.1.self_attn.feature_q.weight",
                     "model.layers.1.self_attn.linear_log_weight", "model.layers.1.self_attn.window_logit"]
    assert type(s.model.model.layers[0].self_attn).__name__ == "LlamaAttention"  # layer 0 stays softmax
    rows = s.report["LinearizeAttention"].rows
    assert [r["layer"] for r in rows] == [1]
    assert rows[0]["params_added"] == (6 + 2) * 8 * 8 + 6 + 6   # feature maps, γ and λ per query head


def test_bert_bidirectional_linear_and_local():
    model = tiny_bert()
    ids = _tokens(2, 24)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    exact = surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=24, local=True))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        got = exact.model(ids, attention_mask=mask).last_hidden_state
    # local window 24 covers every pair: exact softmax again (padding respected)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, :18], ref[1, :18], rtol=0, atol=1e-5)
    linear = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=0))
    with torch.no_grad():
        out = linear.model(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-3)


def test_vit_local_2d_window():
    model = tiny_vit()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    exact = surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=8, local=True))  # 8x8 grid
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(exact.model(pixel_values=pixels).last_hidden_state, ref, rtol=0, atol=1e-5)
    local = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=2, local=True))
    with torch.no_grad():
        out = local.model(pixel_values=pixels).last_hidden_state
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-3)


@pytest.mark.parametrize("build, config, message", [
    (tiny_llama, LinearizeAttention(layers=[0, 5]), "out of range"),
    (tiny_bert, LinearizeAttention(causal=True, window=0), "bidirectional"),
    (tiny_bert, LinearizeAttention(gate="liger", window=0), "gate='none'"),
    (tiny_bert, LinearizeAttention(window=16), "local=True"),
    (tiny_llama, LinearizeAttention(local=True, window=4), "bidirectional models"),
    (tiny_llama, LinearizeAttention(window=4096), "maximum positions"),
    (tiny_llama, LinearizeAttention(feature_map="elu1", feature_dim=16), "feature_dim"),
    (tiny_llama, LinearizeAttention(window=-1), ">= 0"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(build, config, message):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(surgeon.SurgeonError, match=message):
        surgeon.apply(model, config, inplace=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_head_sizes_that_do_not_divide():
    model = tiny_llama()
    model.model.layers[0].self_attn.head_dim = 7  # 6 heads x 7 != 48 q outputs
    with pytest.raises(surgeon.SurgeonError, match="head sizes don't divide"):
        surgeon.apply(model, LinearizeAttention())


def test_transformers_model_with_unknown_attention_layout_lists_what_was_found():
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.qkv_weights = attn.q_proj  # rename: a layout the pass does not know
    del attn.q_proj
    for layer in model.model.layers[1:]:
        layer.self_attn.qkv_weights = layer.self_attn.q_proj
        del layer.self_attn.q_proj
    with pytest.raises(surgeon.SurgeonError, match="Attention-like modules found: \\['LlamaAttention'\\]"):
        surgeon.apply(model, LinearizeAttention())


def test_save_restore_round_trip(tmp_path):
    s = surgeon.apply(tiny_llama(), LinearizeAttention(feature_map="hedgehog", window=8, gate="learned"))
    with torch.no_grad():  # move the new parameters away from their init so restore must load them
        for name, p in s.model.named_parameters():
            if "feature_" in name or "gate_" in name or "window_logit" in name or "linear_log_weight" in name:
                p.add_(0.05 * torch.randn_like(p))
    surgeon.save(s, tmp_path / "lin")
    restored = surgeon.restore(tiny_llama(), tmp_path / "lin")
    ids = _tokens(2, 50, seed=7)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, s.model(ids).logits)


def test_bf16_long_sequence_stays_finite():
    model = tiny_llama().to(torch.bfloat16)
    s = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=64, gate="liger"))
    with torch.no_grad():
        logits = s.model(_tokens(1, 4096, seed=8)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_transfer_mode_returns_the_teacher_and_records_both(build):
    """Attention-transfer mode: the layer outputs the original softmax attention (teacher forcing), so the
    model's outputs equal the original's, and it records (linear, softmax) for the MSE loss."""
    model = build()
    s = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=0))
    units = [m for m in s.model.modules() if type(m).__name__ == "LinearAttention"]
    for unit in units:
        unit.transfer = True
    ids = _tokens(2, 30, seed=9)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        got = s.model(ids, attention_mask=mask)
    key = "logits" if hasattr(ref, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(got, key)[0], getattr(ref, key)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(getattr(got, key)[1, 6:], getattr(ref, key)[1, 6:], rtol=0, atol=1e-5)
    student, teacher = units[0].transfer_pair
    assert student.shape == teacher.shape and (student - teacher).abs().max() > 1e-3
