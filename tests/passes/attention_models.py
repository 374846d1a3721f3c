"""Tiny random-init Hugging Face models of every family the attention pass must handle."""
from __future__ import annotations

import torch
import transformers

VOCAB = 97


def _seeded(build):
    torch.manual_seed(0)
    model = build()
    return model.eval()


def tiny_llama(**overrides) -> transformers.LlamaForCausalLM:
    cfg = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024)
    return _seeded(lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **overrides})))


def tiny_qwen2() -> transformers.Qwen2ForCausalLM:  # q/k/v biases
    cfg = transformers.Qwen2Config(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=3, vocab_size=VOCAB, max_position_embeddings=1024)
    return _seeded(lambda: transformers.Qwen2ForCausalLM(cfg))


def tiny_qwen3() -> transformers.Qwen3ForCausalLM:  # per-head q/k RMSNorm, explicit head_dim
    cfg = transformers.Qwen3Config(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=1024)
    return _seeded(lambda: transformers.Qwen3ForCausalLM(cfg))


def tiny_mistral() -> transformers.MistralForCausalLM:  # config.sliding_window set (4096 > every test length)
    cfg = transformers.MistralConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                                     num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024)
    return _seeded(lambda: transformers.MistralForCausalLM(cfg))


def tiny_gpt2() -> transformers.GPT2LMHeadModel:  # fused c_attn Conv1D, absolute positions
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=1024,
                                  bos_token_id=0, eos_token_id=0)
    return _seeded(lambda: transformers.GPT2LMHeadModel(cfg))


def tiny_bert() -> transformers.BertModel:
    cfg = transformers.BertConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=VOCAB, max_position_embeddings=256)
    return _seeded(lambda: transformers.BertModel(cfg, add_pooling_layer=False))


def tiny_vit() -> transformers.ViTModel:
    cfg = transformers.ViTConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=4, num_channels=3)
    return _seeded(lambda: transformers.ViTModel(cfg, add_pooling_layer=False))


CAUSAL_FAMILIES = {
    "llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "mistral": tiny_mistral, "gpt2": tiny_gpt2,
}
