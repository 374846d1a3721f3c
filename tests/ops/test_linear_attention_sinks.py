"""Attention sinks in the hybrid: every form agrees with a brute-force reference written from the
formulas (float64), a cache split anywhere continues the sequence exactly, and with a window that
covers the sequence the sinks change nothing (exact softmax)."""
from __future__ import annotations

import math

import pytest
import torch

from surgeon.core.errors import ConfigError
from surgeon.ops.feature_maps import make_feature_map
from surgeon.ops.linear_attention import linear_attention, update_sinks

F64 = torch.float64


@torch.no_grad()
def brute_force(q, k, v, fq_map, fk_map, *, scale, window, sinks, gamma, lam, log_decay, valid):
    """y_t from the package docstring's formulas, one (b, h, t) at a time."""
    B, H, T, _ = q.shape
    g = H // k.shape[1]
    root = scale ** 0.5
    fq, fk = fq_map(q * root), fk_map(k * root)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(H):
            kh = h // g
            for t in range(T):
                if not valid[b, t]:
                    continue
                win = [j for j in range(T) if t - window < j <= t and valid[b, j]]
                old = [j for j in range(T) if j <= t - window and valid[b, j]]
                first = [j for j in range(T) if valid[b, j]][:sinks]    # the first valid tokens of the row
                sink = [j for j in old if j in first]
                lin = [j for j in old if j not in first]
                exact = win + sink
                s = {j: scale * float(q[b, h, t] @ k[b, kh, j]) for j in exact}
                m = max(s.values()) if s else 0.0
                num = torch.zeros(v.shape[-1], dtype=F64)
                den = 0.0
                for j in exact:
                    a = gamma[h] * math.exp(s[j] - m)
                    num += a * v[b, kh, j]
                    den += a
                for j in lin:
                    fold = j + max(window - 1, 0)
                    decay = 1.0 if log_decay is None else math.exp(float(log_decay[b, h, fold + 1:t + 1].sum()))
                    w_ = lam[h] * float(fq[b, h, t] @ fk[b, kh, j]) * decay
                    num += w_ * v[b, kh, j]
                    den += w_
                out[b, h, t] = num / max(den, 1e-6)
    return out


def case(seed: int, T: int = 17, B: int = 2, H: int = 4, Hkv: int = 2, D: int = 6, gated: bool = True, pad: int = 2):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen, dtype=F64)
    k = torch.randn(B, Hkv, T, D, generator=gen, dtype=F64)
    v = torch.randn(B, Hkv, T, D, generator=gen, dtype=F64)
    ld = -torch.rand(B, H, T, generator=gen, dtype=F64) * 0.3 if gated else None
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :pad] = False                                  # left padding in the second row
    gamma = torch.rand(H, generator=gen, dtype=F64) + 0.2
    lam = torch.rand(H, generator=gen, dtype=F64) + 0.2
    torch.manual_seed(seed)
    fq, fk = make_feature_map("hedgehog", H, D), make_feature_map("hedgehog", Hkv, D)
    fq, fk = fq.to(F64), fk.to(F64)
    return q, k, v, fq, fk, ld, valid, gamma, lam


@pytest.mark.parametrize("window,sinks", [(0, 2), (1, 3), (4, 2), (5, 4), (9, 1), (20, 4)])
@pytest.mark.parametrize("form", ["parallel", "chunked", "recurrent"])
@pytest.mark.parametrize("gated", [False, True])
def test_every_form_matches_the_formulas(window, sinks, form, gated):
    q, k, v, fq, fk, ld, valid, gamma, lam = case(window * 10 + sinks, gated=gated)
    ref = brute_force(q, k, v, fq, fk, scale=0.4, window=window, sinks=sinks, gamma=gamma, lam=lam,
                      log_decay=ld, valid=valid)
    out, _ = linear_attention(q, k, v, fq, fk, scale=0.4, window=window, sinks=sinks, window_weight=gamma,
                              linear_weight=lam, log_decay=ld, key_mask=valid, form=form, chunk_size=4)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("window,sinks", [(0, 2), (3, 2), (6, 4), (2, 1)])
@pytest.mark.parametrize("split", [1, 2, 5, 11])
def test_cache_split_continues_exactly(window, sinks, split):
    """Prefill `split` tokens, then decode the rest one token at a time through the sink/window/state cache
    (the second row is left-padded by 3: padding never becomes a sink)."""
    q, k, v, fq, fk, ld, valid, gamma, lam = case(split, T=15, gated=True, pad=3)
    kw = dict(scale=0.4, window=window, sinks=sinks, window_weight=gamma, linear_weight=lam)
    full, full_state = linear_attention(q, k, v, fq, fk, log_decay=ld, key_mask=valid, form="parallel", **kw)
    outs = []
    out, state = linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], fq, fk,
                                  log_decay=ld[:, :, :split], key_mask=valid[:, :split], chunk_size=4, **kw)
    outs.append(out)
    sinks_state = update_sinks(sinks, window, None, k[:, :, :split], v[:, :, :split], valid[:, :split])
    keep = max(window - 1, 0)
    lo = max(split - keep, 0)
    past = (k[:, :, lo:split], v[:, :, lo:split], valid[:, lo:split]) if keep else (None, None, valid[:, :0])
    for t in range(split, q.shape[2]):
        pk, pv, pvalid = past
        seen_valid = torch.cat([pvalid, valid[:, t:t + 1]], 1)
        out, state = linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], fq, fk,
                                      log_decay=ld[:, :, t:t + 1], past_k=pk, past_v=pv, state=state,
                                      key_mask=seen_valid, sink_state=sinks_state, form="recurrent", **kw)
        outs.append(out)
        seen_k = k[:, :, t:t + 1] if pk is None else torch.cat([pk, k[:, :, t:t + 1]], 2)
        seen_v = v[:, :, t:t + 1] if pv is None else torch.cat([pv, v[:, :, t:t + 1]], 2)
        sinks_state = update_sinks(sinks, window, sinks_state, seen_k, seen_v, seen_valid)
        past = ((seen_k[:, :, -keep:], seen_v[:, :, -keep:], seen_valid[:, -keep:]) if keep
                else (None, None, valid[:, :0]))
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(state, full_state, atol=1e-12, rtol=1e-10)
    n_left = q.shape[2] - max(window - 1, 0)
    assert sinks_state[2].sum(-1).tolist() == [min(sinks, n_left), min(sinks, n_left - 3)]


def test_window_covering_the_sequence_is_exact_softmax_with_or_without_sinks():
    q, k, v, fq, fk, *_ = case(3, T=12, gated=False, pad=0)
    ref = torch.softmax(0.4 * q @ k.repeat_interleave(2, 1).transpose(-1, -2)
                        + torch.full((12, 12), float("-inf"), dtype=F64).triu(1), -1) @ v.repeat_interleave(2, 1)
    for sinks in (0, 4):
        out, _ = linear_attention(q, k, v, fq, fk, scale=0.4, window=12, sinks=sinks, eps=0.0)
        torch.testing.assert_close(out, ref, atol=1e-13, rtol=1e-12)


def test_sinks_are_not_folded_into_the_state():
    q, k, v, fq, fk, *_ = case(4, T=10, gated=False, pad=0)
    _, with_sinks = linear_attention(q, k, v, fq, fk, scale=0.4, window=3, sinks=2)
    _, without = linear_attention(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], fq, fk, scale=0.4, window=3)
    torch.testing.assert_close(with_sinks, without, atol=1e-12, rtol=1e-10)


def test_bad_sink_arguments_are_clear_errors():
    q, k, v, fq, fk, *_ = case(5, T=6, gated=False, pad=0)
    with pytest.raises(ConfigError, match="sinks must be an int"):
        linear_attention(q, k, v, fq, fk, scale=0.4, window=2, sinks=-1)
    state = update_sinks(2, 2, None, k, v)
    with pytest.raises(ConfigError, match="sinks=0"):
        linear_attention(q, k, v, fq, fk, scale=0.4, window=2, sink_state=state)
    with pytest.raises(ConfigError, match=r"sink_k has shape .* \(B, Hkv, sinks, D\)"):
        linear_attention(q, k, v, fq, fk, scale=0.4, window=2, sinks=1, sink_state=state)
    with pytest.raises(ConfigError, match="non-finite"):
        ld = torch.zeros(q.shape[:3], dtype=F64)
        ld[0, 0, 3] = float("-inf")
        linear_attention(q, k, v, fq, fk, scale=0.4, window=2, log_decay=ld)


@pytest.mark.parametrize("window,sinks,gated", [(0, 0, False), (3, 2, True), (5, 0, True), (1, 4, False)])
def test_long_calls_run_in_blocks_exactly(monkeypatch, window, sinks, gated):
    """A chunked call longer than BLOCK_TOKENS runs as cached blocks: the same output and state as one call."""
    import surgeon.ops.linear_attention.api as api

    q, k, v, fq, fk, ld, valid, gamma, lam = case(7, T=29, gated=gated, pad=3)
    kw = dict(scale=0.4, window=window, sinks=sinks, window_weight=gamma, linear_weight=lam, log_decay=ld,
              key_mask=valid, chunk_size=4)
    whole, whole_state = linear_attention(q, k, v, fq, fk, **kw)
    monkeypatch.setattr(api, "BLOCK_TOKENS", 6)
    blocked, blocked_state = linear_attention(q, k, v, fq, fk, **kw)
    torch.testing.assert_close(blocked, whole, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(blocked_state, whole_state, atol=1e-12, rtol=1e-10)
