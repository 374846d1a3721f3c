"""LinearizeAttention at the attention kernel: families whose modules the swap would refuse, converted exactly.

The model's own module computes q/k/v, rotary, norms, gates; the registered hybrid function carries
soft-capping (Gemma 2), learned sinks (GPT-OSS), MLA's value width (DeepSeek), fused qkv (GPT-NeoX).
Exact = the converted model at a window covering the sequence reproduces the original (fp32 ≤ 1e-5
relative), decoding token by token equals the full forward (≤ 1e-4) and generate() with the cache
gives the tokens it gives without.
"""
from __future__ import annotations

import pytest
import torch
import transformers

import surgeon
from surgeon.core.errors import ConfigError
from surgeon.ops.feature_maps import make_feature_map
from surgeon.ops.hybrid_kernel import capped_hybrid_attention
from surgeon.ops.linear_attention import linear_attention
from surgeon.passes import LinearizeAttention
from surgeon.passes.attention.kernel import HYBRID, KernelHybrid

VOCAB = 97
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False)
MOE = dict(num_local_experts=2, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
           shared_expert_intermediate_size=16)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=12, n_routed_experts=2, n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
           moe_intermediate_size=16, num_experts_per_tok=1)


def _build(name: str, **kw) -> torch.nn.Module:
    config_cls, model_cls = {
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM),
        "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
        "qwen3_next": (transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM),
        "gemma4_text": (transformers.Gemma4TextConfig, transformers.Gemma4ForCausalLM),
        "llama4_text": (transformers.Llama4TextConfig, transformers.Llama4ForCausalLM),
        "gptj": (transformers.GPTJConfig, transformers.GPTJForCausalLM),
        "codegen": (transformers.CodeGenConfig, transformers.CodeGenForCausalLM),
        "diffllama": (transformers.DiffLlamaConfig, transformers.DiffLlamaForCausalLM),
        "bitnet": (transformers.BitNetConfig, transformers.BitNetForCausalLM),
    }[name]
    extra = {"gpt_oss": MOE, "qwen3_next": dict(MOE, layer_types=["linear_attention", "full_attention"]),
             "deepseek_v2": MLA, "deepseek_v3": MLA, "llama4_text": MOE, "gptj": dict(rotary_dim=4),
             "codegen": dict(rotary_dim=4), "gemma4_text": dict(vocab_size_per_layer_input=VOCAB,
                                                                hidden_size_per_layer_input=8)}.get(name, {})
    cfg = config_cls(**{**SMALL, **extra, **kw})
    torch.manual_seed(0)
    return model_cls(cfg).eval()


def _ids(n: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(5))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())


def _decode(model, ids: torch.Tensor, first: int) -> torch.Tensor:
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(ids[:, :first], past_key_values=cache, use_cache=True).logits]
        steps += [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(first, ids.shape[1])]
    return torch.cat(steps, 1)


def _check_exact(model, n: int = 14) -> None:
    ids = _ids(n)
    s = surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=n + 4))
    units = [m for m in s.model.modules() if isinstance(m, KernelHybrid)]
    assert units, "expected conversion at the attention kernel"
    with torch.no_grad():
        ref, got = model(ids).logits, s.model(ids).logits
        assert _rel(got, ref) <= 1e-5
        assert _rel(_decode(s.model, ids, 5), got) <= 1e-4
        kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(s.model.generate(ids, use_cache=True, **kw), s.model.generate(ids, use_cache=False, **kw))
    assert not any(isinstance(m, KernelHybrid) for m in model.modules())   # the original is untouched


# -- the kernel maths ----------------------------------------------------------------------------------------
def test_kernel_equals_linear_attention_without_family_semantics_prefill_and_decode():
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 11, 8
    fq, fk = make_feature_map("hedgehog", H, D).double(), make_feature_map("hedgehog", Hkv, D).double()
    q, k, v = torch.randn(B, H, T, D, dtype=torch.float64), *torch.randn(2, B, Hkv, T, D, dtype=torch.float64)
    gamma, lam = torch.rand(H, dtype=torch.float64), torch.rand(H, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :3] = False                                          # left padding never becomes a sink
    for window, sinks in ((0, 0), (3, 2), (5, 1)):
        kw = dict(scale=D ** -0.5, window=window, sinks=sinks, window_weight=gamma, linear_weight=lam)
        ref, ref_state = linear_attention(q, k, v, fq, fk, key_mask=mask, form="parallel", **kw)
        first = capped_hybrid_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], fq, fk, key_mask=mask[:, :6],
                                        chunk_size=4, **kw)
        outs, keep, state, slots = [first.out], max(window - 1, 0), first.state, first.sink_state
        for t in range(6, T):                                    # decode with the cache the kernel returned
            lo = t - keep
            step = capped_hybrid_attention(q[:, :, t:t + 1], k[:, :, lo:t + 1], v[:, :, lo:t + 1], fq, fk, past=keep,
                                           key_mask=mask[:, lo:t + 1], state=state, sink_state=slots, **kw)
            outs.append(step.out)
            state, slots = step.state, step.sink_state
        assert _rel(torch.cat(outs, 2), ref) <= 1e-12, (window, sinks)
        assert _rel(state, ref_state) <= 1e-12


def test_softcap_and_learned_sinks_match_a_dense_float64_reference():
    """Window 3 of 9 tokens, 1 attention sink, γ/λ mixing: the cap and s_aux sit in the one shared normaliser."""
    torch.manual_seed(1)
    H, T, D, w, cap = 2, 9, 4, 3, 2.0
    fm = make_feature_map("elu1", H, D)
    q, k, v = torch.randn(3, 1, H, T, D, dtype=torch.float64) * 2
    s_aux, gamma, lam = torch.randn(H, dtype=torch.float64), torch.full((H,), 0.7, dtype=torch.float64), \
        torch.full((H,), 0.3, dtype=torch.float64)
    got = capped_hybrid_attention(q, k, v, fm, fm, scale=0.5, window=w, sinks=1, softcap=cap, s_aux=s_aux,
                                  window_weight=gamma, linear_weight=lam, chunk_size=4).out
    ref = torch.zeros_like(got)
    fq, fk = fm(q * 0.5 ** 0.5), fm(k * 0.5 ** 0.5)
    for h in range(H):
        for t in range(T):
            exact = [j for j in range(t + 1) if j > t - w or j == 0]            # window + the sink token 0
            linear = [j for j in range(t + 1) if j <= t - w and j != 0]
            s = cap * torch.tanh(0.5 * q[0, h, t] @ k[0, h, exact].T / cap)
            m = torch.maximum(s.max(), s_aux[h])
            e = (s - m).exp()
            num = gamma[h] * e @ v[0, h, exact] + lam[h] * (fq[0, h, t] @ fk[0, h, linear].T) @ v[0, h, linear]
            den = gamma[h] * (e.sum() + (s_aux[h] - m).exp()) + lam[h] * (fq[0, h, t] @ fk[0, h, linear].T).sum()
            ref[0, h, t] = num / den
    assert _rel(got, ref) <= 1e-12


# -- families converted at the kernel (fast sample; the rest in the slow suite) --------------------------
FAST = ["gemma2", "gpt_oss", "deepseek_v2"]
SLOW = ["gpt_neox", "qwen3_next", "gemma4_text", "llama4_text", "deepseek_v3", "gptj", "codegen", "diffllama", "bitnet"]


@pytest.mark.parametrize("family", FAST)
def test_family_converts_exactly_at_the_kernel(family):
    _check_exact(_build(family))


@pytest.mark.slow
@pytest.mark.parametrize("family", SLOW)
def test_more_families_convert_exactly_at_the_kernel(family):
    _check_exact(_build(family))


def test_softcapped_hybrid_decodes_like_prefill_with_padding_and_a_short_window():
    """Gemma 2 at window 4 + 2 sinks (not the identity): decode == prefill, a left-padded row == its unpadded run."""
    model = _build("gemma2")
    s = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=4, sinks=2, linear_weight_init=0.5))
    ids = _ids(16)
    assert s.model.model.layers[0].self_attn.hybrid.window == 4
    with torch.no_grad():
        full = s.model(ids).logits
        assert _rel(_decode(s.model, ids, 3), full) <= 1e-4
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1, :13]], 1)
        mask = torch.ones_like(padded)
        mask[:, :3] = 0
        alone = s.model(ids[:1, :13]).logits
        positions = (mask.cumsum(-1) - 1).clamp_min(0)          # as generate() sets them: φ(q)·φ(k) sees absolute rotary
        got = s.model(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
    assert _rel(got, alone) <= 1e-4
    assert _rel(full, model(ids).logits) > 1e-3                  # the short window really changed the model


def test_new_parameters_attach_to_the_original_module_and_save_restore(tmp_path):
    model = _build("gpt_oss")
    s = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=4, sinks=1, linear_weight_init=0.3))
    attn = s.model.model.layers[1].self_attn
    assert type(attn) is type(model.model.layers[1].self_attn) and isinstance(attn._modules[HYBRID], KernelHybrid)
    assert any(n.startswith("model.layers.1.self_attn.hybrid.feature_q.") for n, _ in s.model.named_parameters())
    assert s.report["LinearizeAttention"].rows[0]["replaced"] == "GptOssAttention (kernel)"
    with torch.no_grad():
        attn.hybrid.linear_log_weight.add_(0.05)                 # a trained-looking value must survive the round trip
    surgeon.save(s, tmp_path / "out")
    restored = surgeon.restore(_build("gpt_oss"), tmp_path / "out")
    ids = _ids(12)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, s.model(ids).logits)


# -- bad input -----------------------------------------------------------------------------------------------
class _BiasedNeoXAttention(transformers.models.gpt_neox.modeling_gpt_neox.GPTNeoXAttention):
    """A module that passes its kernel an argument the hybrid does not know (a per-head bias)."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, head_bias=torch.ones(self.config.num_attention_heads), **kwargs)


def test_unknown_kernel_argument_is_refused_at_plan_time_naming_it_and_model_untouched():
    model = _build("gpt_neox")
    for layer in model.gpt_neox.layers:
        biased = _BiasedNeoXAttention(model.config, layer.attention.layer_idx)
        biased.load_state_dict(layer.attention.state_dict())
        layer.attention = biased
    before = {n: p.clone() for n, p in model.state_dict().items()}
    impl = model.config._attn_implementation
    with pytest.raises(ConfigError, match="'head_bias'") as err:
        surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=8), inplace=True)
    assert "gpt_neox.layers.0.attention" in str(err.value)
    assert model.config._attn_implementation == impl
    assert not any(isinstance(m, KernelHybrid) for m in model.modules())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
