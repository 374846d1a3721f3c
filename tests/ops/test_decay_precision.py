"""Gated linear attention in float32 stays accurate at long lengths (vs float64), and bad log-decays are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from surgeon.core.errors import ConfigError
from surgeon.ops.feature_maps import make_feature_map
from surgeon.ops.linear_attention import linear_attention

T, H, D = 8192, 2, 16


def _inputs(kind: str):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    if kind == "none":
        decay = None
    elif kind == "head":   # liger / learned gates: one decay per head and token
        decay = F.logsigmoid(torch.randn(1, H, T, generator=g, dtype=torch.float64)) / 16  # ≈ -0.05: Σ ≈ -400
    else:                  # per feature channel (GLA-style)
        decay = F.logsigmoid(torch.randn(1, H, T, 2 * D, generator=g, dtype=torch.float64)) / 16
    return q, k, v, decay


@pytest.mark.parametrize("window", [0, 64])
@pytest.mark.parametrize("kind", ["none", "head", "channel"])
def test_float32_at_8k_tokens_matches_float64(kind, window):
    q, k, v, decay = _inputs(kind)
    fq, fk = make_feature_map("hedgehog", H, D).double(), make_feature_map("hedgehog", H, D).double()
    fk.load_state_dict(fq.state_dict())
    ref, state_ref = linear_attention(q, k, v, fq, fk, scale=D ** -0.5, window=window, log_decay=decay)
    f32 = [t.float() if t is not None else None for t in (q, k, v, decay)]
    got, state = linear_attention(*f32[:3], fq.float(), fk.float(), scale=D ** -0.5, window=window, log_decay=f32[3])
    err = (got.double() - ref).abs().max().item()
    print(f"float32 vs float64, {T} tokens, decay {kind}, window {window}: max abs {err:.1e}")
    assert err <= 2e-6, err  # the per-head form used to lose 1.3e-5 here (exclusive sums as total − inclusive)
    assert (state.double() - state_ref).abs().max() <= 1e-3 * state_ref.abs().max()


@pytest.mark.parametrize("bad", [float("-inf"), float("nan"), float("inf")])
def test_non_finite_log_decay_is_refused(bad):
    q, k, v, decay = _inputs("head")
    decay = decay[..., :32].clone()
    decay[0, 1, 5] = bad
    fq = make_feature_map("elu1", H, D)
    with pytest.raises(ConfigError, match="finite|≤ 0|positive"):
        linear_attention(q[..., :32, :], k[..., :32, :], v[..., :32, :], fq, fq, scale=0.25, log_decay=decay)
