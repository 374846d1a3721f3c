"""ExactTokenModel: the zero-training exact-token baselines, against the original model and float64 references."""
from __future__ import annotations

import pytest
import torch
import transformers

from surgeon.core.errors import ConfigError
from surgeon.fidelity.exact_tokens import ExactTokenModel, ExactTokenPolicy, _LayerTokens


def test_room_for_every_token_is_the_original(llama):
    ids = torch.randint(0, 259, (1, 53))
    full = llama.model(input_ids=ids).last_hidden_state
    engine = ExactTokenModel(llama, ExactTokenPolicy(sinks=1, window=200, block=7))
    assert torch.allclose(engine.prefill(ids[:, :45]), full[:, :45], atol=2e-5)
    steps = torch.cat([engine.step(int(t)) for t in ids[0, 45:]], 1)          # decode = one forward
    assert torch.allclose(steps, full[:, 45:], atol=2e-5)
    assert llama.config._attn_implementation != "surgeon_exact_tokens"        # set back


def test_sinks_window_decode_is_streaming_llm_mask(llama):
    """heavy=0, one token per step: query t sees the first `sinks` tokens and its last window + 1 (itself)."""
    sinks, window, T = 3, 9, 40
    ids = torch.randint(0, 259, (1, T))
    t = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (j <= t) & ((t - j <= window) | (j < sinks))
    mask = torch.zeros(1, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    want = llama.model(input_ids=ids, attention_mask=mask).last_hidden_state
    engine = ExactTokenModel(llama, ExactTokenPolicy(sinks=sinks, window=window, block=1))
    got = engine.prefill(ids)
    assert torch.allclose(got, want, atol=2e-5)
    assert engine.kept_tokens() == [[sinks + window] * 2] * 2


def _brute_force(q, k, v, policy: ExactTokenPolicy, budgets: list[int]):
    """Float64 token-by-token reference of the eviction definition (block 1), one layer."""
    hkv, g = k.shape[0], q.shape[0] // k.shape[0]
    kept = [[] for _ in range(hkv)]
    score = [dict() for _ in range(hkv)]
    outs = []
    for t in range(q.shape[1]):
        out_t = []
        for h in range(hkv):
            keys = kept[h] + [t]
            p = torch.softmax(torch.stack([torch.stack([q[h * g + i, t] @ k[h, j] for j in keys]) for i in range(g)])
                              * q.shape[-1] ** -0.5, -1)
            out_t += [p[i] @ v[h, keys] for i in range(g)]
            for n, j in enumerate(keys):
                score[h][j] = (score[h].get(j, 0.0) + float(p[:, n].sum())) if policy.score == "h2o" else \
                    float(p[:, n].mean())
            protected = [j for j in keys if j < policy.sinks or j > t - policy.window]
            others = sorted((j for j in keys if j not in protected), key=lambda j: -score[h][j])
            kept[h] = sorted(protected + others[:budgets[h] - len(protected)])
        outs.append(torch.stack(out_t))
    return torch.stack(outs, 1), kept


@pytest.mark.parametrize("score", ["h2o", "tova"])
def test_eviction_matches_float64_reference(score):
    torch.manual_seed(1)
    hq, hkv, T, d = 4, 2, 30, 8
    q, k, v = (torch.randn(h, T, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    policy = ExactTokenPolicy(sinks=2, window=4, heavy=((3, 6),), score=score, block=1)
    budgets = [2 + 4 + 3, 2 + 4 + 6]
    want, kept = _brute_force(q, k, v, policy, budgets)
    layer = _LayerTokens(torch.tensor(budgets), policy)
    got = torch.cat([layer.attend(q[None, :, t:t + 1].float(), k[None, :, t:t + 1].float(), v[None, :, t:t + 1].float(),
                                  d ** -0.5) for t in range(T)], 1)[0].permute(1, 0, 2)
    assert torch.allclose(got.double(), want, atol=1e-5)
    for h in range(hkv):
        assert sorted(layer.pos[h][layer.valid[h]].tolist()) == kept[h]


def test_policy_bytes_and_errors(llama):
    policy = ExactTokenPolicy(sinks=4, window=60, heavy=((1, 2), (3, 4)))
    assert policy.tokens(2, 2) == 4 * 64 + 10
    assert policy.state_bytes(llama.config) == (4 * 64 + 10) * 2 * 8 * 4
    with pytest.raises(ConfigError, match="layer 0 needs 2"):
        ExactTokenModel(llama, ExactTokenPolicy(heavy=((1,), (2,))))
    with pytest.raises(ConfigError, match="score"):
        ExactTokenPolicy(score="lru")
    with pytest.raises(ConfigError, match="batch 1"):
        ExactTokenModel(llama, ExactTokenPolicy(window=8)).prefill(torch.zeros(2, 5, dtype=torch.long))
