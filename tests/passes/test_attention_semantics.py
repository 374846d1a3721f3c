"""Attention semantics read from the model (module-swap path), refusals at plan time, parameters that follow the model."""
from __future__ import annotations

import pytest
import torch
import transformers

import surgeon
from surgeon.core.errors import ConfigError, PlanError
from surgeon.passes import LinearizeAttention

VOCAB = 97
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _build(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    return model_cls(config_cls(**{**SMALL, **kw})).eval()


def _ids(n: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(3))


def _exact(model, n: int = 20, **cfg) -> float:
    s = surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=n, **cfg))
    with torch.no_grad():
        return (s.model(_ids(n)).logits - model(_ids(n)).logits).abs().max().item()


def _fingerprint(model) -> list:
    return [(n, type(m).__name__) for n, m in model.named_modules()] + \
           [(n, p.detach().clone()) for n, p in model.state_dict().items()]


def _unchanged(before, model) -> bool:
    after = _fingerprint(model)
    return len(before) == len(after) and all(
        a[0] == b[0] and (torch.equal(a[1], b[1]) if isinstance(a[1], torch.Tensor) else a[1] == b[1])
        for a, b in zip(before, after))


# -- read from the model: exact at a window covering the sequence --------------------------------------
SEMANTICS = {
    "smollm3 NoPE layers": lambda: _build(transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM),
    "stablelm partial rotary + per-head LayerNorm": lambda: _build(
        transformers.StableLmConfig, transformers.StableLmForCausalLM, qk_layernorm=True),
    "cohere (heads, head_dim) q/k norm": lambda: _build(transformers.CohereConfig, transformers.CohereForCausalLM,
                                                        use_qk_norm=True),
    "cohere2 rotary on local layers only": lambda: _build(transformers.Cohere2Config, transformers.Cohere2ForCausalLM,
                                                          sliding_window=64),
    "phi3 fused qkv with GQA": lambda: _build(transformers.Phi3Config, transformers.Phi3ForCausalLM),
    "gpt_bigcode fused multi-query": lambda: _build(transformers.GPTBigCodeConfig, transformers.GPTBigCodeForCausalLM,
                                                    multi_query=True),
    "gemma3 own window >= hybrid window": lambda: _build(transformers.Gemma3TextConfig,
                                                         transformers.Gemma3ForCausalLM, head_dim=8, sliding_window=24),
}


@pytest.mark.parametrize("name", sorted(SEMANTICS))
def test_semantics_read_from_the_model_are_exact(name):
    err = _exact(SEMANTICS[name]())
    assert err <= 1e-5, (name, err)


@pytest.mark.slow  # flex_attention compiles its kernels on first use (~25 s on 2 cores)
def test_flex_attention_implementation_with_padding_and_decode():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SMALL)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="flex_attention").eval()
    ids, mask = _ids(18), torch.ones(2, 18, dtype=torch.long)
    mask[1, :4] = 0
    s = surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=24))
    with torch.no_grad():
        ref, got = model(ids, attention_mask=mask).logits, s.model(ids, attention_mask=mask).logits
    assert (got[0] - ref[0]).abs().max() <= 1e-5 and (got[1, 4:] - ref[1, 4:]).abs().max() <= 1e-5
    short = surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=4))
    cache = transformers.DynamicCache(config=short.model.config)
    with torch.no_grad():
        full = short.model(ids[:1]).logits
        steps = [short.model(ids[:1, :6], past_key_values=cache, use_cache=True).logits]
        steps += [short.model(ids[:1, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(6, 18)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


# -- refused at plan time, model untouched -------------------------------------------------------------------
REFUSALS = [
    # soft-capping (Gemma 2), learned sinks (GPT-OSS), DiffLlama, BitNet's sub-norm: converted at the attention
    # kernel now (tests/passes/test_attention_kernel.py); ALiBi in a module that does not call the registry stays refused
    ("mpt ALiBi", lambda: _build(transformers.MptConfig, transformers.MptForCausalLM, d_model=32, n_heads=4,
                                 n_layers=2), {}, "transformer.blocks.0.attn"),
    ("window beyond the model's own sliding window",
     lambda: _build(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=8), {"window": 16},
     "own sliding window is 8 tokens"),
    ("layer the model lacks", lambda: _build(transformers.LlamaConfig, transformers.LlamaForCausalLM),
     {"layers": [1, 7]}, "[7] out of range"),
    ("gemma3 local layers' own window", lambda: _build(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                                                       head_dim=8, sliding_window=8), {"window": 12},
     "model.layers.0.self_attn: the model's own sliding window is 8 tokens"),
    # BERT's position_embedding_type="relative_key" is ignored by transformers 5.24's BertSelfAttention (it calls the
    # attention registry with plain q/k/v): converted at the kernel, its probe checks the result is exact
]


@pytest.mark.parametrize("name,build,cfg,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_at_plan_time_with_the_reason_and_model_untouched(name, build, cfg, message):
    model = build()
    before = _fingerprint(model)
    with pytest.raises((ConfigError, PlanError), match="") as err:
        surgeon.apply(model, LinearizeAttention(**{"feature_map": "elu1", **cfg}), inplace=True)
    assert message in str(err.value), str(err.value)
    assert _unchanged(before, model)


def test_already_linearized_model_is_refused():
    s = surgeon.apply(_build(transformers.LlamaConfig, transformers.LlamaForCausalLM), LinearizeAttention(window=4))
    before = _fingerprint(s.model)
    with pytest.raises(PlanError, match="already linearized"):
        surgeon.apply(s.model, LinearizeAttention(window=4))
    assert _unchanged(before, s.model)


def test_the_probe_decides_what_a_module_does_not_say():
    """TrOCR's self-attention has no is_causal attribute: the plan-time probe finds it causal (exact)."""
    model = _build(transformers.TrOCRConfig, transformers.TrOCRForCausalLM, d_model=32, decoder_layers=2,
                   decoder_attention_heads=4, decoder_ffn_dim=64, is_decoder=True)
    err = _exact(model)
    assert err <= 1e-5


# -- new parameters follow the module they replace -----------------------------------------------------------
def _own_parameters(model) -> list[tuple[str, torch.Tensor]]:
    names = ("feature_q", "feature_k", "window_logit", "gate_", "linear_log_weight")
    return [(n, p) for n, p in model.named_parameters() if any(k in n for k in names)]


def test_new_parameters_on_a_meta_model_stay_meta_and_load():
    cfg = transformers.LlamaConfig(**SMALL)
    torch.manual_seed(0)
    real = surgeon.apply(transformers.LlamaForCausalLM(cfg).eval(),
                         LinearizeAttention(feature_map="hedgehog", window=4, gate="learned"))
    with torch.device("meta"):
        meta_model = transformers.LlamaForCausalLM(cfg).eval()
    s = surgeon.apply(meta_model, LinearizeAttention(feature_map="hedgehog", window=4, gate="learned"))
    assert _own_parameters(s.model) and all(p.is_meta for _, p in _own_parameters(s.model))
    assert {p.device.type for p in s.model.parameters()} == {"meta"}
    assert any("not verified numerically" in n for n in s.report["LinearizeAttention"].notes)
    s.model.to_empty(device="cpu")
    s.model.load_state_dict(real.model.state_dict())
    buffers = dict(real.model.named_buffers())   # non-persistent ones (rotary inv_freq) are not in the state dict
    for name, buf in s.model.named_buffers():
        buf.copy_(buffers[name])
    with torch.no_grad():
        torch.testing.assert_close(s.model(_ids(12)).logits, real.model(_ids(12)).logits, rtol=0, atol=1e-6)


def test_new_parameters_of_a_bf16_model_are_bf16():
    model = _build(transformers.LlamaConfig, transformers.LlamaForCausalLM).to(torch.bfloat16)
    s = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=8, gate="learned"))
    assert _own_parameters(s.model) and {p.dtype for _, p in _own_parameters(s.model)} == {torch.bfloat16}
    fp32 = surgeon.apply(model.float(), LinearizeAttention(feature_map="hedgehog", window=8, gate="learned"))
    with torch.no_grad():
        low, ref = s.model(_ids(16)).logits.float(), fp32.model(_ids(16)).logits
    assert torch.isfinite(low).all() and (low - ref).abs().max() <= 0.1 * ref.abs().max()


# -- peft: the base model inside the wrapper is converted -------------------------------------------------------
def test_peft_wrapped_model_is_converted_with_its_lora_layers():
    peft = pytest.importorskip("peft")
    model = _build(transformers.LlamaConfig, transformers.LlamaForCausalLM)
    with torch.no_grad():
        base = model(_ids(20)).logits
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for n, p in wrapped.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)     # a trained-looking adapter: it must stay in the computation
    wrapped.eval()
    s = surgeon.apply(wrapped, LinearizeAttention(feature_map="elu1", window=20))
    with torch.no_grad():
        ref, got = wrapped(input_ids=_ids(20)).logits, s.model(input_ids=_ids(20)).logits
    assert (got - ref).abs().max() <= 1e-5
    assert (ref - base).abs().max() > 1e-3    # the adapter changes the output, and the conversion kept it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_new_parameters_of_a_cuda_model_are_on_cuda():
    model = _build(transformers.LlamaConfig, transformers.LlamaForCausalLM).cuda()
    s = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=8, gate="learned"))
    assert {p.device.type for p in s.model.parameters()} == {"cuda"}
    with torch.no_grad():
        assert torch.isfinite(s.model(_ids(16).cuda()).logits).all()
