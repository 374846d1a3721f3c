"""Transformer private-inference cost model: counts against hand-computed closed forms, linearized vs original."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, GPT2Config, LlamaConfig

from surgeon.core.errors import ConfigError
from surgeon.costs.transformer_private import MPCProtocol, transformer_private_costs
from surgeon.passes.attention.config import LinearizeAttention

D, INTER, LAYERS, H, KV, HD, VOCAB = 64, 128, 2, 4, 2, 16, 100


@pytest.fixture(scope="module")
def cfg() -> LlamaConfig:
    return LlamaConfig(hidden_size=D, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=H,
                       num_key_value_heads=KV, vocab_size=VOCAB)


def test_protocol_primitives_match_crypten_algorithms():
    p = MPCProtocol()
    assert p.compare() == (13 * 32 + 16, 8)            # 64-bit prefix adder (13 word ANDs, 7 rounds) + 1-bit B2A
    assert p.exp() == (8 * 16, 8)                       # 8 squarings
    assert p.reciprocal() == (8 * 16 + 10 * (16 + 32), 8 + 20)
    assert p.rsqrt() == (8 * 16 + 3 * (16 + 2 * 32), 8 + 9)


def test_softmax_counts_closed_form(cfg):
    n = 37
    r = transformer_private_costs(cfg, context=n)
    row = r.rows[0]
    assert row["exp"] == H * n                          # one exp per (query head, key)
    assert row["reciprocal"] == H                       # one 1/Σ per head
    assert row["compare"] == H * (n - 1)                # the softmax max
    assert row["rsqrt"] == 2                            # two RMSNorms
    assert row["sigmoid"] == INTER                      # SiLU
    assert row["mul"] == 2 * D + H * n + 2 * INTER      # x·rsqrt, numerator·(1/Σ), x·σ(x), gate·up
    assert row["macs_secret"] == 2 * H * n * HD         # q·Kᵀ and attention·V
    assert row["macs_weights"] == D * H * HD + 2 * D * KV * HD + H * HD * D + 3 * D * INTER
    p = MPCProtocol()
    opened = H * 2 * (HD + n * HD)
    selects = 2 * H * (n - 1)
    want = (H * n * p.exp()[0] + H * p.reciprocal()[0] + H * (n - 1) * p.compare()[0] + 2 * p.rsqrt()[0]
            + INTER * p.sigmoid()[0] + (row["mul"] + selects) * 32 + 2 * D * 16 + opened * 16)
    assert row["comm_MB"] == pytest.approx(want / 1e6, rel=1e-12)
    assert r.summary["exp_per_token"] == LAYERS * H * n
    assert r.summary["rsqrt_per_token"] == 2 * LAYERS + 1    # + the final norm


def test_linearized_hybrid_counts_and_constant_beyond_window(cfg):
    w, s = 8, 2
    att = LinearizeAttention(window=w, sinks=s, feature_map="elu1")
    r100 = transformer_private_costs(cfg, context=100, attention=att)
    r1000 = transformer_private_costs(cfg, context=1000, attention=att)
    row = r100.rows[0]
    keys = w + s
    assert row["softmax_keys"] == keys
    assert row["exp"] == H * keys + (H + KV) * HD       # window + sinks, and elu's exp on φ(q), φ(k)
    assert row["compare"] == H * (keys - 1) + (H + KV) * HD
    assert row["reciprocal"] == H                       # one shared normaliser per head
    # state update φ(k)vᵀ (KV·F·HD) + readout φ(q)·[S | z] (H·F·(HD+1)) + window q·Kᵀ, attention·V
    assert row["macs_secret"] == KV * HD * HD + H * HD * (HD + 1) + 2 * H * keys * HD
    for k in ("exp", "compare", "mul", "macs_secret", "comm_MB"):
        assert r1000.rows[0][k] == row[k]               # per-token cost no longer grows with the context
    orig = transformer_private_costs(cfg, context=100)
    assert r100.summary["comm_MB_per_token"] < orig.summary["comm_MB_per_token"]
    assert r100.summary["exp_per_token"] < orig.summary["exp_per_token"]


def test_inside_window_linearized_equals_softmax(cfg):
    att = {"window": 16, "sinks": 4, "feature_map": "hedgehog"}
    lin = transformer_private_costs(cfg, context=16, attention=att)
    orig = transformer_private_costs(cfg, context=16)
    assert lin.summary["comm_MB_per_token"] == orig.summary["comm_MB_per_token"]
    assert lin.rows[0]["exp"] == orig.rows[0]["exp"] == H * 16


def test_hedgehog_feature_map_and_partial_layers(cfg):
    f = 4
    att = {"window": 0, "sinks": 0, "feature_map": "hedgehog", "feature_dim": f, "layers": [1]}
    r = transformer_private_costs(cfg, context=50, attention=att)
    assert r.rows[0]["attention"] == "softmax" and r.rows[0]["exp"] == H * 50
    row = r.rows[1]
    assert row["attention"] == "linearized" and row["softmax_keys"] == 0
    assert row["exp"] == (H + KV) * 2 * f               # two softmaxes over f per query / key head
    assert row["reciprocal"] == H + (H + KV) * 2        # the normaliser + the φ softmaxes
    assert row["macs_weights"] - r.rows[0]["macs_weights"] == (H + KV) * HD * f
    assert r.summary["converted_layers"] == 1


def test_gpt2_family_uses_layernorm_gelu():
    c = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    row = transformer_private_costs(c, context=10).rows[0]
    assert row["sigmoid"] == 4 * 32 and row["exp"] == 2 * 10
    assert row["mul"] == 2 * 32 + 2 * 10 + 4 * 32     # no gated up-projection


def test_bad_input(cfg):
    with pytest.raises(ConfigError, match="model_type 'bert'"):
        transformer_private_costs(BertConfig(), context=8)
    with pytest.raises(ConfigError, match="context must be an int >= 1"):
        transformer_private_costs(cfg, context=0)
    with pytest.raises(ConfigError, match="feature_map"):
        transformer_private_costs(cfg, context=8, attention={"feature_map": "cosine"})
    with pytest.raises(ConfigError, match="exceed the model's 2 layers"):
        transformer_private_costs(cfg, context=8, attention={"layers": [5]})
    with pytest.raises(ConfigError, match="unknown protocol"):
        transformer_private_costs(cfg, context=8, protocol="bolt")


def test_surgeon_report_shows_private_costs_for_attention_surgery(tmp_path, capsys):
    import surgeon
    from surgeon.cli.commands import main
    from surgeon.costs.transformer_private import attention_costs_for_surgery
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    s = surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=8, sinks=2))
    surgeon.save(s, tmp_path / "lin")
    assert attention_costs_for_surgery(tmp_path / "lin") is None          # no config of the base model beside it
    model.config.save_pretrained(tmp_path / "lin")
    r = attention_costs_for_surgery(tmp_path / "lin", contexts=(8, 512))
    want = transformer_private_costs(model.config, 512, attention={"feature_map": "elu1", "window": 8, "sinks": 2})
    assert r.rows[1]["linearized_MB"] == pytest.approx(want.summary["comm_MB_per_token"])
    assert r.rows[0]["ratio"] == pytest.approx(1.0) and r.rows[1]["ratio"] > 1.0   # inside the window: equal
    assert main(["report", str(tmp_path / "lin")]) == 0
    assert "private inference per decoded token" in capsys.readouterr().out
