"""Memory slots (LoLA's sparse cache): with room for every token they leave exact softmax attention; the
state holds exactly the tokens not kept; the kept ones are the worst recalled; blocks continue exactly."""
from __future__ import annotations

import pytest
import torch

from surgeon.core.errors import ConfigError
from surgeon.ops.feature_maps import make_feature_map
from surgeon.ops.linear_attention import linear_attention
from surgeon.ops.linear_attention.common import with_ones
from surgeon.ops.linear_attention.memory import recall_error, update_memory
from surgeon.ops.linear_attention.streaming import Carry, run_blocks

F64 = torch.float64


def case(seed: int, T: int = 23, B: int = 2, H: int = 4, Hkv: int = 2, D: int = 6):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen, dtype=F64)
    k = torch.randn(B, Hkv, T, D, generator=gen, dtype=F64)
    v = torch.randn(B, Hkv, T, D, generator=gen, dtype=F64)
    torch.manual_seed(seed)
    fq, fk = make_feature_map("hedgehog", H, D).double(), make_feature_map("hedgehog", Hkv, D).double()
    return q, k, v, fq, fk


def softmax_reference(q, k, v, valid, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    T = q.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & valid[:, None, None, :]
    out = torch.softmax((scale * q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf")), -1) @ v
    return torch.where(valid[:, None, :, None], out, torch.zeros((), dtype=F64))


@torch.no_grad()
def big_memory_reference(q, k, v, fq_map, fk_map, *, scale, window, sinks, lam, valid, block):
    """Memory with room for every token, from the definition: query t in block [lo, hi) sees as exact softmax
    its window, the sinks and every token that left the window before lo (the slots); the tokens that left
    during its own block reach it through the linear branch (slots change between calls only)."""
    B, H, T, _ = q.shape
    g = H // k.shape[1]
    root = scale ** 0.5
    fq, fk = fq_map(q * root), fk_map(k * root)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=F64)
    for b in range(B):
        first = [j for j in range(T) if valid[b, j]][:sinks]
        for h in range(H):
            kh = h // g
            for t in range(T):
                if not valid[b, t]:
                    continue
                lo = t - t % block
                keys = [j for j in range(t + 1) if valid[b, j]]
                linear = [j for j in keys if j not in first and lo - window < j <= t - window]
                exact = [j for j in keys if j not in linear]
                s = torch.stack([scale * q[b, h, t] @ k[b, kh, j] for j in exact])
                a = (s - s.max()).exp()
                num, den = a @ v[b, kh, exact], a.sum()
                if linear:
                    w_ = lam * (fq[b, h, t] @ fk[b, kh, linear].T)
                    num, den = num + w_ @ v[b, kh, linear], den + w_.sum()
                out[b, h, t] = num / den
    return out


@pytest.mark.parametrize("block", [1, 3, 5, 64])
@pytest.mark.parametrize("sinks", [0, 2])
def test_memory_with_room_for_every_token_matches_its_definition(block, sinks):
    q, k, v, fq, fk = case(0)
    valid = torch.ones(2, 23, dtype=torch.bool)
    valid[1, :4] = False                                           # left padding in row 1
    got = run_blocks(q, k, v, fq, fk, Carry(), scale=0.4, window=4, sinks=sinks, memory=23, block=block,
                     key_mask=valid, linear_weight=torch.full((4,), 0.7, dtype=F64))
    want = big_memory_reference(q, k, v, fq, fk, scale=0.4, window=4, sinks=sinks, lam=0.7, valid=valid, block=block)
    assert (got.out - want).abs().max() < 1e-10
    if block == 1:   # one token per call (decoding): nothing ever reaches the linear branch — exact softmax
        assert (got.out - softmax_reference(q, k, v, valid, 0.4)).abs().max() < 1e-10
        assert got.carry.state.abs().max() < 1e-10


def test_without_memory_the_blocks_are_the_plain_hybrid():
    q, k, v, fq, fk = case(1)
    got = run_blocks(q, k, v, fq, fk, Carry(), scale=0.4, window=4, sinks=2, memory=0, block=5)
    out, state = linear_attention(q, k, v, fq, fk, scale=0.4, window=4, sinks=2, form="parallel")
    assert (got.out - out).abs().max() < 1e-12 and (got.carry.state - state).abs().max() < 1e-12


def test_one_update_keeps_the_worst_recalled_and_folds_exactly_the_rest():
    q, k, v, fq, fk = case(2, T=30)
    window, slots = 5, 6
    out, state = linear_attention(q, k, v, fq, fk, scale=0.4, window=window)
    (mk, mv, filled), new_state = update_memory(slots, window, None, k, v, state, fk, scale=0.4)
    assert filled.all()
    left = 30 - (window - 1)
    feats = fk(k[:, :, :left] * 0.4 ** 0.5)
    per_kv = state.reshape(2, 2, 2, *state.shape[2:]).mean(2)
    err = recall_error(feats, v[:, :, :left], per_kv, own=False)
    for b in range(2):
        for h in range(2):
            kept = err[b, h].topk(slots).indices
            assert torch.equal(mk[b, h].sort(0).values, k[b, h, kept].sort(0).values)
            folded = torch.ones(left, dtype=torch.bool)
            folded[kept] = False
            want = feats[b, h, folded].T @ with_ones(v[b, h, :left][folded])
            for g in range(2):
                assert (new_state[b, 2 * h + g] - want).abs().max() < 1e-10


def test_a_dropped_slot_goes_back_into_the_state():
    q, k, v, fq, fk = case(3, T=40)
    whole = run_blocks(q, k, v, fq, fk, Carry(), scale=0.4, window=3, sinks=0, memory=4, block=6)
    mk, mv, filled = whole.carry.memory_state
    # the state plus the slots' contributions is every token that left the window, whatever was kept
    feats = fk(mk * 0.4 ** 0.5)
    back = whole.carry.state + (feats.transpose(-1, -2) @ with_ones(mv)).repeat_interleave(2, 1)
    all_left = fk(k[:, :, :40 - 2] * 0.4 ** 0.5)
    want = (all_left.transpose(-1, -2) @ with_ones(v[:, :, :40 - 2])).repeat_interleave(2, 1)
    assert (back - want).abs().max() < 1e-9


def test_split_anywhere_on_a_block_boundary_continues_exactly():
    q, k, v, fq, fk = case(4, T=31)
    kw = dict(scale=0.4, window=4, sinks=2, memory=3, block=5)
    whole = run_blocks(q, k, v, fq, fk, Carry(), **kw)
    first = run_blocks(q[:, :, :10], k[:, :, :10], v[:, :, :10], fq, fk, Carry(), **kw)
    rest = run_blocks(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], fq, fk, first.carry, **kw)
    assert torch.equal(torch.cat([first.out, rest.out], 2), whole.out)
    assert torch.equal(rest.carry.memory_state[0], whole.carry.memory_state[0])


def test_bad_memory_input_is_refused_by_name():
    q, k, v, fq, fk = case(5)
    with pytest.raises(ConfigError, match="memory_block must be a positive int"):
        run_blocks(q, k, v, fq, fk, Carry(), scale=0.4, window=4, sinks=0, memory=2, block=0)
    with pytest.raises(ConfigError, match="ungated"):
        run_blocks(q, k, v, fq, fk, Carry(), scale=0.4, window=4, sinks=0, memory=2, block=4,
                   log_decay=torch.zeros(2, 4, 23, dtype=F64))
    bad = (torch.zeros(2, 2, 3, 6, dtype=F64), torch.zeros(2, 2, 3, 6, dtype=F64), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="memory filled have shape"):
        update_memory(3, 4, bad, k, v, torch.zeros(2, 4, 12, 7, dtype=F64), fk, scale=0.4)
