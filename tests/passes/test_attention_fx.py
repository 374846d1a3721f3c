"""FX path of LinearizeAttention: hand-written attention in traceable models is found and rewritten.

Each model below spells attention differently. For each: the matcher finds exactly its sites, the
rewritten graph has no softmax / SDPA left, the rewritten model equals a direct call of the ops
functions on the model's own q, k, v (float64, at another sequence length than the traced example),
and with every key inside the softmax window it equals the original model (the rewrite wires q, k, v,
scale and masks correctly).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import surgeon
from surgeon.core.errors import ConfigError, PlanError, SelectionError
from surgeon.ops.fx_attention_unit import FxLinearAttention, key_mask_from
from surgeon.ops.linear_attention import bidirectional_linear_attention, linear_attention, local_window_mask
from surgeon.core.handler import PassContext
from surgeon.passes import LinearizeAttention
from surgeon.passes.attention.fx import find_attention, plan_fx_attention, rewrite_fx_attention, trace_for_attention
from surgeon.fx.tracing import propagate_shapes

# ----------------------------------------------------------------------------------------------
# models: each attention module has project() (q, k, v) and finish() so a reference can re-run it


class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: fused c_attn, tril buffer + masked_fill(-inf), F.softmax, dropout."""

    def __init__(self, n_embd: int = 16, n_head: int = 2, block_size: int = 32) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(0.1)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def project(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        return q, k, v

    def finish(self, y):
        B, H, T, D = y.shape
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, H * D))

    def forward(self, x):
        T = x.size(1)
        q, k, v = self.project(x)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        return self.finish(att @ v)


class GPTBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), NanoGPTAttention(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(32, d)
        self.h = nn.ModuleList([GPTBlock(d), GPTBlock(d)])
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(0, idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def ref_gpt(m, inputs, attend):
    (idx,) = inputs
    x = m.wte(idx) + m.wpe(torch.arange(idx.shape[1]))
    for i, blk in enumerate(m.h):
        q, k, v = blk.attn.project(blk.ln_1(x))
        x = x + blk.attn.finish(attend(i, q, k, v, scale=1 / math.sqrt(8), causal=True))
        x = x + blk.mlp(blk.ln_2(x))
    return m.lm_head(m.ln_f(x))


class SDPAAttention(nn.Module):
    """``F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)``: 4 query heads, 2 kv heads."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.h, self.kv, self.hd = 4, 2, d // 4
        self.wq, self.wkv, self.wo = nn.Linear(d, d), nn.Linear(d, 2 * 2 * (d // 4)), nn.Linear(d, d)

    def project(self, x):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k, v = self.wkv(x).view(B, T, 2, self.kv, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def finish(self, y):
        return self.wo(y.transpose(1, 2).flatten(2))

    def forward(self, x):
        q, k, v = self.project(x)
        return self.finish(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


class SDPANet(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": SDPAAttention(d)}) for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = x + b["attn"](x)
        return x


def ref_sdpa(m, inputs, attend):
    (x,) = inputs
    for i, b in enumerate(m.blocks):
        q, k, v = b["attn"].project(x)
        x = x + b["attn"].finish(attend(i, q, k, v, scale=0.5, causal=True))
    return x


class ViTAttention(nn.Module):
    """timm-style: fused qkv, ``(q @ k.transpose(-2, -1)) / math.sqrt(d)``, an ``nn.Softmax(dim=-1)`` module."""

    def __init__(self, d: int = 16, h: int = 2) -> None:
        super().__init__()
        self.h, self.hd = h, d // h
        self.qkv, self.proj, self.softmax = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Softmax(dim=-1)

    def project(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        return q, k, v

    def finish(self, y):
        return self.proj(y.transpose(1, 2).flatten(2))

    def forward(self, x):
        q, k, v = self.project(x)
        attn = self.softmax((q @ k.transpose(-2, -1)) / math.sqrt(self.hd))
        return self.finish(attn @ v)


class ViT(nn.Module):
    def __init__(self, d: int = 16, patch: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.attn = nn.ModuleList([ViTAttention(d), ViTAttention(d)])
        self.head = nn.Linear(d, 5)

    def embed(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)

    def forward(self, img):
        x = self.embed(img)
        for a in self.attn:
            x = x + a(x)
        return self.head(x[:, 0])


def ref_vit(m, inputs, attend):
    (img,) = inputs
    x = m.embed(img)
    for i, a in enumerate(m.attn):
        q, k, v = a.project(x)
        x = x + a.finish(attend(i, q, k, v, scale=1 / math.sqrt(8), causal=False))
    return m.head(x[:, 0])


class BmmAttention(nn.Module):
    """3-D (B·H, T, D) attention: ``torch.bmm``, ``.transpose(1, 2)``, a pre-scaled q."""

    def __init__(self, d: int = 16, h: int = 2) -> None:
        super().__init__()
        self.h, self.hd = h, d // h
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def project(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return [t.reshape(B, T, self.h, self.hd).transpose(1, 2).reshape(B * self.h, T, self.hd) for t in (q, k, v)]

    def finish(self, y, B):
        return self.out(y.reshape(B, self.h, -1, self.hd).transpose(1, 2).flatten(2))

    def forward(self, x):
        q, k, v = self.project(x)
        q = q * self.hd ** -0.5
        w = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        return self.finish(torch.bmm(w, v), x.shape[0])


def ref_bmm(m, inputs, attend):
    (x,) = inputs
    q, k, v = m.project(x)
    return m.finish(attend(0, q, k, v, scale=8 ** -0.5, causal=False), x.shape[0])


class EinsumAttention(nn.Module):
    """``torch.einsum`` both ways, ``* q.size(-1) ** -0.5``, a bool triu buffer + ``masked_fill(finfo.min)``."""

    def __init__(self, d: int = 16, h: int = 2) -> None:
        super().__init__()
        self.h, self.hd = h, d // h
        self.qkv = nn.Linear(d, 3 * d)
        self.register_buffer("future", torch.ones(64, 64, dtype=torch.bool).triu(1))

    def project(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.project(x)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.size(-1) ** -0.5
        s = s.masked_fill(self.future[:T, :T], torch.finfo(torch.float32).min)
        p = s.softmax(dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", p, v).transpose(1, 2).flatten(2)


def ref_einsum(m, inputs, attend):
    (x,) = inputs
    q, k, v = m.project(x)
    return attend(0, q, k, v, scale=8 ** -0.5, causal=True).transpose(1, 2).flatten(2)


class PaddedAttention(nn.Module):
    """Bidirectional with a padding mask input: ``torch.matmul(q, k.mT) / 2``, ``masked_fill(~mask, -inf)``,
    ``torch.softmax(s, -1)``, ``F.dropout``."""

    def __init__(self, d: int = 16, h: int = 2) -> None:
        super().__init__()
        self.h, self.hd = h, d // h
        self.qkv = nn.Linear(d, 3 * d)

    def project(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x, mask):
        q, k, v = self.project(x)
        s = torch.matmul(q, k.mT) / 2.0
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        p = F.dropout(torch.softmax(s, -1), 0.0, self.training)
        return torch.matmul(p, v).transpose(1, 2).flatten(2)


def ref_padded(m, inputs, attend):
    x, mask = inputs
    q, k, v = m.project(x)
    return attend(0, q, k, v, scale=0.5, causal=False, key_mask=mask).transpose(1, 2).flatten(2)


def _tokens(b, t):
    return (torch.randint(0, 32, (b, t)),)


def _seq(b, t):
    return (torch.randn(b, t, 16),)


def _images(b, t):
    return (torch.randn(b, 3, t, t),)


def _padded(b, t):
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -3:] = False  # right padding in row 0, left padding in row 1
    mask[-1, :2] = False
    return torch.randn(b, t, 16), mask


# name: (model, inputs(batch, size), example size, test size, sites, spelling, causal, ops config, identity config, ref)
CASES = {
    "nanogpt": (NanoGPT, _tokens, 8, 11, ["h.0.attn.softmax", "h.1.attn.softmax"],
                "matmul/transpose/masked_fill/softmax/dropout/matmul", True, dict(window=3), dict(window=16), ref_gpt),
    "sdpa_gqa": (SDPANet, _seq, 8, 11, ["blocks.0.attn.sdpa", "blocks.1.attn.sdpa"], "sdpa/is_causal", True,
                 dict(window=2, feature_map="elu1"), dict(window=16), ref_sdpa),
    "vit": (ViT, _images, 8, 12, ["attn.0.softmax", "attn.1.softmax"], "matmul/transpose/nn.Softmax/matmul", False,
            dict(local=True, window=2), dict(local=True, window=8), ref_vit),
    "bmm_3d": (BmmAttention, _seq, 8, 11, ["softmax"], "bmm/transpose/softmax/bmm", False, dict(window=0),
               dict(local=True, window=16, window_weight_init=0.5), ref_bmm),
    "einsum": (EinsumAttention, _seq, 8, 11, ["softmax"], "einsum/masked_fill/softmax/einsum", True,
               dict(window=4, feature_map="taylor2"), dict(window=16), ref_einsum),
    "padded": (PaddedAttention, _padded, 8, 11, ["softmax"], "matmul/mT/masked_fill/softmax/dropout/matmul", False,
               dict(window=0, feature_map="relu"), dict(local=True, window=16, window_weight_init=0.5), ref_padded),
}


def _build(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    factory, make_inputs, t_example, t_test = CASES[name][:4]
    model = factory().to(dtype).eval()

    def cast(xs):
        return tuple(x.to(dtype) if x.is_floating_point() else x for x in xs)

    torch.manual_seed(1)
    return model, cast(make_inputs(2, t_example)), cast(make_inputs(3, t_test))


def _exact(q, k, v, *, scale, causal, key_mask=None):
    if q.dim() == 3:
        return _exact(q[:, None], k[:, None], v[:, None], scale=scale, causal=causal, key_mask=key_mask)[:, 0]
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    T = q.shape[-2]
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(q.shape[0], 1, T, T)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    s = (q @ k.transpose(-2, -1) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


def _units(gm: nn.Module) -> list[FxLinearAttention]:
    return [m for m in gm.modules() if isinstance(m, FxLinearAttention)]


def _apply_fx(model, config, example):
    ctx = PassContext(example_inputs=example)
    plan = plan_fx_attention(model, config, ctx)
    return rewrite_fx_attention(model, config, plan, ctx), plan


def _attention_nodes(gm: fx.GraphModule) -> list[str]:
    names = []
    for n in gm.graph.nodes:
        target = n.target if n.op != "call_module" else type(gm.get_submodule(n.target)).__name__
        if "softmax" in str(target).lower() or "scaled_dot_product" in str(target):
            names.append(n.name)
    return names


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_matcher_finds_exactly_the_attention_sites(name):
    model, example, _ = _build(name)
    sites, spelling, causal = CASES[name][4:7]
    gm = trace_for_attention(model)
    propagate_shapes(gm, example)
    matches = find_attention(gm)
    assert len(matches) == len(sites)
    assert {m.spelling for m in matches} == {spelling}
    for m in matches:
        assert m.output in m.dead and m.anchor in m.dead
        assert m.q not in m.dead and m.k not in m.dead and m.v not in m.dead
    plan = plan_fx_attention(model, LinearizeAttention(**CASES[name][7]), PassContext(example_inputs=example))
    assert plan.names == sites
    assert [s.data["causal"] for s in plan.sites] == [causal] * len(sites)


@pytest.mark.parametrize("name", list(CASES))
def test_rewrite_equals_the_ops_on_the_models_own_qkv(name):
    """float64, another sequence length than the traced example, chunked unit vs parallel reference."""
    model, example, test_inputs = _build(name, torch.float64)
    cfg_kw, ref = CASES[name][7], CASES[name][9]
    config = LinearizeAttention(chunk_size=4, **cfg_kw)
    original = copy.deepcopy(model)
    gm, plan = _apply_fx(model, config, example)
    assert _attention_nodes(gm) == []
    units = [gm.get_submodule(s.data["unit"]) for s in plan.sites]
    assert len(_units(gm)) == len(units) == len(CASES[name][4])
    with torch.no_grad():  # training the hedgehog maps / γ would change them: make them non-trivial
        for u in units:
            for p in u.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def attend(i, q, k, v, *, scale, causal, key_mask=None):
        u = units[i]
        squeeze = q.dim() == 3
        if squeeze:
            q, k, v = q[:, None], k[:, None], v[:, None]
        gamma = torch.sigmoid(u.window_logit) if config.window > 0 else None
        if causal:
            out, _ = linear_attention(q, k, v, u.feature_q, u.feature_k, scale=scale, window=config.window,
                                      window_weight=gamma, linear_weight=u.linear_weight(), sinks=config.sinks,
                                      key_mask=key_mask, form="parallel")
        else:
            local = None
            if config.local:
                n = q.shape[-2] - 1
                local = local_window_mask(q.shape[-2], config.window, grid=(math.isqrt(n),) * 2, n_prefix=1)
            out = bidirectional_linear_attention(q, k, v, u.feature_q, u.feature_k, scale=scale, local_mask=local,
                                                 window_weight=gamma, key_mask=key_mask, form="parallel")
        return out[:, 0] if squeeze else out

    with torch.no_grad():
        got, want = gm(*test_inputs), ref(original, test_inputs, attend)
        # the reference is the original model with softmax attention swapped: check it is that model
        torch.testing.assert_close(ref(original, test_inputs, lambda i, *a, **kw: _exact(*a, **kw)),
                                   original(*test_inputs), rtol=0, atol=1e-12)
    if name == "padded":  # linear attention outputs 0 at padded queries; the original does not
        keep = test_inputs[1][..., None]
        got, want = got * keep, want * keep
    err = (got - want).abs().max().item()
    assert err <= 1e-10, err
    assert (got - original(*test_inputs)).abs().max().item() > 1e-4  # it is not softmax attention any more


@pytest.mark.parametrize("name", list(CASES))
def test_every_key_in_the_softmax_window_reproduces_the_original(name):
    """window ≥ T: only exact-softmax terms exist, γ cancels in the shared normaliser: the original model."""
    model, example, test_inputs = _build(name)
    before = model(*test_inputs)
    gm, _ = _apply_fx(model, LinearizeAttention(**CASES[name][8]), example)
    for unit in _units(gm):
        unit.eps = 0.0  # the normaliser's eps otherwise biases outputs by ~eps/γ
    got = gm(*test_inputs)
    if name == "padded":
        keep = test_inputs[1][..., None]
        got, before = got * keep, before * keep
    err = (got - before).abs().max().item()
    # (bidirectional cases use γ = 0.5: the chunked form subtracts local terms from global sums, and that
    # fp32 cancellation is divided by γ; at γ = 0.1 the padded case is off by 1.1e-6)
    assert err <= 1e-6, err


def test_padding_masks_become_key_masks():
    additive = torch.zeros(2, 1, 1, 5)
    additive[0, ..., -2:] = torch.finfo(torch.float32).min
    assert key_mask_from([additive], ["additive"], 2, 5).tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    causal_and_padding = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5).clone()
    causal_and_padding[1, ..., 0] = False  # left padding: no query sees key 0
    got = key_mask_from([causal_and_padding], ["sdpa"], 2, 5)
    assert got.tolist() == [[True] * 5, [False] + [True] * 4]
    assert key_mask_from([torch.zeros(5, 5, dtype=torch.bool)], ["fill"], 2, 5) is None


class SharedAttention(nn.Module):
    """One attention module called twice, an additive mask from the input, SDPA with a bool mask."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = PaddedAttention()
        self.proj = nn.Linear(16, 16)

    def forward(self, x, mask):
        y = self.attn(x, mask) + self.attn(self.proj(x), mask)
        q = k = v = y.view(y.shape[0], y.shape[1], 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])


def test_repeated_calls_are_separate_sites_and_selection_works():
    torch.manual_seed(0)
    model = SharedAttention().eval()
    x, mask = _padded(2, 6)
    ctx = PassContext(example_inputs=(x, mask))
    plan = plan_fx_attention(model, LinearizeAttention(window=0), ctx)
    assert plan.names == ["attn.softmax", "attn.softmax@1", "sdpa"]
    assert [[kind for _, kind in s.data["masks"]] for s in plan.sites] == [["fill"], ["fill"], ["sdpa"]]
    only = plan_fx_attention(model, LinearizeAttention(window=0, targets=["attn.softmax@1"]), ctx)
    assert only.names == ["attn.softmax@1"]
    assert plan_fx_attention(model, LinearizeAttention(window=0, layers=[0, 2]), ctx).names == ["attn.softmax", "sdpa"]
    assert plan_fx_attention(model, LinearizeAttention(window=0, exclude=r"attn\..*"), ctx).names == ["sdpa"]
    chosen = plan_fx_attention(model, LinearizeAttention(window=0, filter_fn=lambda m, fqn: isinstance(
        m, PaddedAttention)), ctx)
    assert chosen.names == ["attn.softmax", "attn.softmax@1"]
    gm = rewrite_fx_attention(model, LinearizeAttention(window=0), plan, ctx)
    assert _attention_nodes(gm) == [] and len(_units(gm)) == 3
    x2, mask2 = _padded(3, 9)
    assert gm(x2, mask2).shape == (3, 2, 9, 8)


def _same(model, snapshot, inputs, out):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    assert all(torch.equal(state[k], snapshot[k]) for k in state)
    assert torch.equal(model(*inputs), out)


class NoAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(torch.softmax(self.mlp(x), dim=-1))  # a softmax that is not attention


def test_bad_input_fails_clearly_and_changes_nothing():
    model, example, _ = _build("sdpa_gqa")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(*example)
    with pytest.raises(ConfigError, match=r"layers \[2\] out of range.*2 attention sites, valid indices 0\.\.1"):
        surgeon.apply(model, LinearizeAttention(layers=[0, 2]), example_inputs=example)
    with pytest.raises(ConfigError, match="Liger gate needs the Hugging Face module path.*gate='none'"):
        surgeon.apply(model, LinearizeAttention(gate="liger"), example_inputs=example, inplace=True)
    with pytest.raises(ConfigError, match="needs example_inputs"):
        surgeon.apply(model, LinearizeAttention())
    with pytest.raises(ConfigError, match="causal=False on a causal model"):
        surgeon.apply(model, LinearizeAttention(causal=False), example_inputs=example, inplace=True)
    with pytest.raises(SelectionError, match="blocks.0.attn.sdpa"):
        surgeon.apply(model, LinearizeAttention(targets=["nope"]), example_inputs=example, inplace=True)
    _same(model, snapshot, example, out)

    vit, images, _ = _build("vit")
    with pytest.raises(ConfigError, match="bidirectional.*local=True"):
        plan_fx_attention(vit, LinearizeAttention(window=4), PassContext(example_inputs=images))

    torch.manual_seed(0)
    plain = NoAttention()
    x = torch.randn(2, 5, 16)
    snapshot, out = {k: v.clone() for k, v in plain.state_dict().items()}, plain(x)
    with pytest.raises(PlanError, match=r"no attention in NoAttention.*module types: \['NoAttention', 'Sequential', "
                                        r"'Linear', 'GELU', 'LayerNorm'\]"):
        surgeon.apply(plain, LinearizeAttention(), example_inputs=(x,), inplace=True)
    _same(plain, snapshot, (x,), out)


def test_surgeon_apply_runs_the_fx_path_end_to_end():
    model, example, test_inputs = _build("sdpa_gqa")
    s = surgeon.apply(model, LinearizeAttention(window=16), example_inputs=example)
    assert isinstance(s.model, fx.GraphModule) and _attention_nodes(s.model) == []
    assert [site.name for site in s.recipe.entries[0].sites] == ["blocks.0.attn.sdpa", "blocks.1.attn.sdpa"]
    unit = s.model.get_submodule("blocks.0.attn.linear_attention")
    assert unit.site_name == "blocks.0.attn.sdpa" and unit.window_logit.shape == (4,)
    assert unit.feature_q.n_heads == 4 and unit.feature_k.n_heads == 2
    torch.testing.assert_close(s.model(*test_inputs), model(*test_inputs), rtol=1e-4, atol=1e-4)


def test_surgeon_apply_on_nanogpt():
    model, example, test_inputs = _build("nanogpt")
    s = surgeon.apply(model, LinearizeAttention(window=16), example_inputs=example)
    assert [site.name for site in s.recipe.entries[0].sites] == ["h.0.attn.softmax", "h.1.attn.softmax"]
    torch.testing.assert_close(s.model(*test_inputs), model(*test_inputs), rtol=1e-4, atol=1e-4)


class AdditiveMaskAttention(nn.Module):
    """HF-style: ``q @ k.transpose(2, 3) * s + mask`` with a causal + padding float mask given as an input."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, mask):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
        s = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
        return torch.matmul(s.softmax(-1), v)


def _causal_padding_mask(b, t, pad):
    allowed = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t).clone()
    allowed[-1, ..., :pad] = False  # left padding in the last row
    return torch.zeros(b, 1, t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)


def test_an_input_mask_that_is_causal_makes_the_site_causal_and_keeps_its_padding():
    torch.manual_seed(0)
    model = AdditiveMaskAttention().eval()
    example = (torch.randn(2, 6, 16), _causal_padding_mask(2, 6, 2))
    ctx = PassContext(example_inputs=example)
    plan = plan_fx_attention(model, LinearizeAttention(window=16), ctx)
    (site,) = plan.sites
    assert site.data["causal"] and site.data["spelling"] == "matmul/transpose/additive/softmax/matmul"
    assert site.data["mask_notes"] == ["mask:additive:input:lower"]
    x = torch.randn(3, 9, 16)
    mask = _causal_padding_mask(3, 9, 3)
    before = model(x, mask)
    gm = rewrite_fx_attention(model, LinearizeAttention(window=16), plan, ctx)
    _units(gm)[0].eps = 0.0
    got = gm(x, mask)
    real = torch.ones(3, 1, 9, 1, dtype=torch.bool)
    real[-1, :, :3] = False  # padded queries: 0 after the rewrite, a uniform average before
    assert (got * real - before * real).abs().max().item() <= 1e-6
    assert got[-1, :, :3].abs().max().item() == 0.0


def test_save_restore_and_report_of_a_rewritten_graph(tmp_path):
    from surgeon.passes.attention.fx import report_fx_attention

    model, example, test_inputs = _build("padded")
    config = LinearizeAttention(window=0)
    s = surgeon.apply(model, config, example_inputs=example)
    with torch.no_grad():
        for p in s.model.parameters():
            p.add_(0.01)
    surgeon.save(s, tmp_path)
    fresh = _build("padded")[0]
    restored = surgeon.restore(fresh, tmp_path)  # zero placeholder inputs: the recorded sites decide
    assert torch.equal(restored(*test_inputs), s.model(*test_inputs))
    _, plan = _apply_fx(copy.deepcopy(model), config, example)
    report = report_fx_attention(s.model, config, plan, PassContext(example_inputs=example))
    row = report.rows[0]
    assert row["site"] == "softmax" and row["features"] == 16 and row["params_added"] == 2 * 2 * 8 * 8
    assert "dropped" in " ".join(report.notes)
