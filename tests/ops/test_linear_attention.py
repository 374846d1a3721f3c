"""Linear-attention ops: the parallel, chunked and recurrent forms agree with each other, with a
brute-force reference written from the formulas, and across cache splits (decode equals prefill)."""
from __future__ import annotations

import zlib

import pytest
import torch

from surgeon.core.errors import ConfigError
from surgeon.ops.feature_maps import FEATURE_MAP_KINDS, make_feature_map
from surgeon.ops.linear_attention import (bidirectional_linear_attention, linear_attention,
                                          local_window_mask)

F64 = torch.float64
GATES = (None, "head", "channel")
WINDOWS = (0, 1, 3, 11)          # 11 > chunk size 8 used below


def make_case(seed: int = 0, *, B: int = 2, H: int = 6, Hkv: int = 2, T: int = 23, D: int = 8, Dv: int = 5,
              kind: str = "hedgehog", gate: str | None = "head", pad: int = 3, weights: bool = True,
              dtype: torch.dtype = F64) -> dict:
    """Random inputs: GQA, left padding of `pad` tokens in batch row 1, non-default γ/λ, random gates."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fq, fk = make_feature_map(kind, H, D), make_feature_map(kind, Hkv, D)
    if kind == "hedgehog":        # trained-looking maps: q and k maps differ
        with torch.no_grad():
            fq.weight.add_(0.3 * torch.randn(fq.weight.shape, generator=g))
            fk.weight.add_(0.3 * torch.randn(fk.weight.shape, generator=g))
    fq, fk = fq.to(dtype), fk.to(dtype)
    case = dict(q=torch.randn(B, H, T, D, generator=g, dtype=F64).to(dtype),
                k=torch.randn(B, Hkv, T, D, generator=g, dtype=F64).to(dtype),
                v=torch.randn(B, Hkv, T, Dv, generator=g, dtype=F64).to(dtype),
                feature_q=fq, feature_k=fk, scale=D ** -0.5)
    if weights:
        case["window_weight"] = torch.rand(H, generator=g, dtype=F64)
        case["linear_weight"] = 0.5 + torch.rand(H, generator=g, dtype=F64)
    if gate is not None:
        shape = (B, H, T) if gate == "head" else (B, H, T, fq.out_dim)
        case["log_decay"] = torch.nn.functional.logsigmoid(2 + torch.randn(shape, generator=g, dtype=F64)) / 4
    if pad and B > 1:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, :pad] = False
        case["key_mask"] = mask
    return case


def run(case: dict, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return linear_attention(**{**case, **kw})


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------------------ brute force reference
def brute_force(case: dict, window: int, past_k=None, past_v=None, state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit loops over (b, h, t, j) from the contract (float64)."""
    q, k, v, scale = case["q"].double(), case["k"].double(), case["v"].double(), case["scale"]
    B, H, T, _ = q.shape
    Dv, g, w = v.shape[-1], H // k.shape[1], window
    if past_k is not None:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    P, N = k.shape[2] - T, k.shape[2]
    with torch.no_grad():
        fq = case["feature_q"].double()(q * scale ** 0.5)
        fk = case["feature_k"].double()(k * scale ** 0.5)
    Fd = fq.shape[-1]
    valid = case.get("key_mask", torch.ones(B, N, dtype=torch.bool))
    gamma = case.get("window_weight", torch.ones(H, dtype=F64))
    lam = case.get("linear_weight", torch.ones(H, dtype=F64))
    ld = case.get("log_decay")
    S0 = torch.zeros(B, H, Fd, Dv + 1, dtype=F64) if state is None else state.double()

    def alpha(b: int, h: int, u: int) -> torch.Tensor:          # u: concat position (≥ P)
        if ld is None:
            return torch.ones(Fd, dtype=F64)
        a = ld[b, h, u - P].double().exp()
        return a.expand(Fd) if a.dim() == 0 else a

    def decay(b: int, h: int, start: int, end: int) -> torch.Tensor:   # Π_{u=start}^{end} α_u
        out = torch.ones(Fd, dtype=F64)
        for u in range(start, end + 1):
            out = out * alpha(b, h, u)
        return out

    fold = max(w - 1, 0)
    out = torch.zeros(B, H, T, Dv, dtype=F64)
    new_state = torch.zeros_like(S0)
    for b in range(B):
        for h in range(H):
            kh = h // g
            for i in range(T):
                t = P + i
                if not valid[b, t]:
                    continue
                num, den = torch.zeros(Dv, dtype=F64), torch.zeros((), dtype=F64)
                win = [j for j in range(max(t - w + 1, 0), t + 1) if valid[b, j]] if w > 0 else []
                if win:
                    s = torch.stack([scale * q[b, h, i] @ k[b, kh, j] for j in win])
                    a = gamma[h] * (s - s.max()).exp()
                    num += a @ v[b, kh, win]
                    den += a.sum()
                lin_keys = [j for j in range(N) if (j + fold < t if w > 0 else j <= t) and valid[b, j]]
                for j in lin_keys:
                    bj = lam[h] * (fq[b, h, i] * fk[b, kh, j] * decay(b, h, j + fold + 1, t)).sum()
                    num += bj * v[b, kh, j]
                    den += bj
                st = decay(b, h, P, t)[:, None] * S0[b, h]
                num += lam[h] * fq[b, h, i] @ st[:, :Dv]
                den += lam[h] * fq[b, h, i] @ st[:, Dv]
                out[b, h, i] = num / den.clamp_min(1e-6)
            S = decay(b, h, P, N - 1)[:, None] * S0[b, h]
            for j in range(N):
                if j + fold <= N - 1 and valid[b, j]:
                    vv = torch.cat([v[b, kh, j], torch.ones(1, dtype=F64)])
                    S = S + (decay(b, h, j + fold + 1, N - 1) * fk[b, kh, j])[:, None] * vv[None, :]
            new_state[b, h] = S
    return out, new_state


def cache_step(case: dict, lo: int, hi: int, window: int, cache: dict) -> dict:
    """Inputs for tokens [lo, hi) continuing from `cache` (past raw keys/values, their mask, state)."""
    seg = {**case, "q": case["q"][:, :, lo:hi], "k": case["k"][:, :, lo:hi], "v": case["v"][:, :, lo:hi]}
    if "log_decay" in case:
        seg["log_decay"] = case["log_decay"][:, :, lo:hi]
    P = cache["k"].shape[2] if cache.get("k") is not None else 0
    if "key_mask" in case:
        seg["key_mask"] = case["key_mask"][:, lo - P:hi]
    return {**seg, "past_k": cache.get("k"), "past_v": cache.get("v"), "state": cache.get("state")}


def run_in_segments(case: dict, window: int, segments: list[tuple[int, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed the sequence in segments as a decoder's cache would: keep the last window−1 raw tokens."""
    keep, cache, outs, lo = max(window - 1, 0), {}, [], 0
    for length, form in segments:
        hi = lo + length
        seg = cache_step(case, lo, hi, window, cache)
        out, state = run(seg, window=window, form=form, chunk_size=8)
        outs.append(out)
        k = torch.cat([c for c in (seg["past_k"], seg["k"]) if c is not None], 2)
        v = torch.cat([c for c in (seg["past_v"], seg["v"]) if c is not None], 2)
        start = max(k.shape[2] - keep, 0)
        cache = {"k": k[:, :, start:] if keep else None, "v": v[:, :, start:] if keep else None, "state": state}
        lo = hi
    return torch.cat(outs, 2), state


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", FEATURE_MAP_KINDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("window", WINDOWS)
def test_three_forms_agree_float64(kind: str, gate: str | None, window: int) -> None:
    case = make_case(zlib.crc32(f"{kind}/{gate}/{window}".encode()) % 1000, kind=kind, gate=gate,
                     Hkv=2 if window % 2 else 3)   # a seed fixed across processes (hash() of str is not)
    ref_out, ref_state = run(case, window=window, form="parallel")
    for form, chunk in (("chunked", 8), ("chunked", 40), ("recurrent", 0)):
        out, state = run(case, window=window, form=form, chunk_size=chunk or 64)
        assert max_err(out, ref_out) <= 1e-10, (form, chunk)
        assert max_err(state, ref_state) <= 1e-10 * ref_state.abs().max().item(), (form, chunk)
    assert out.dtype == F64 and state.shape == (2, 6, case["feature_q"].out_dim, 6)
    assert torch.all(out[1, :, :3] == 0)          # left-padded queries give zeros


@pytest.mark.parametrize("kind", FEATURE_MAP_KINDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("window", WINDOWS)
def test_segments_equal_one_call(kind: str, gate: str | None, window: int) -> None:
    """Decode equals prefill at op level: prefill 37, then 1- and multi-token steps through the cache."""
    case = make_case(7, T=37 + 1 + 1 + 5 + 1 + 4 + 1, kind=kind, gate=gate, pad=4)
    full_out, full_state = run(case, window=window, form="parallel")
    segments = [(37, "chunked"), (1, "recurrent"), (1, "chunked"), (5, "chunked"), (1, "recurrent"),
                (4, "parallel"), (1, "recurrent")]
    out, state = run_in_segments(case, window, segments)
    assert max_err(out, full_out) <= 1e-10
    assert max_err(state, full_state) <= 1e-10 * full_state.abs().max().item()


def test_short_prefill_shorter_than_window() -> None:
    """A cache that has seen fewer than window−1 tokens (P < window−1, empty state) continues exactly."""
    case = make_case(8, T=9, kind="elu1", gate="channel")
    full = run(case, window=6, form="parallel")
    out, state = run_in_segments(case, 6, [(2, "chunked"), (1, "recurrent"), (6, "chunked")])
    assert max_err(out, full[0]) <= 1e-10 and max_err(state, full[1]) <= 1e-9


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("window", WINDOWS)
def test_matches_brute_force(gate: str | None, window: int) -> None:
    case = make_case(11, B=2, H=4, Hkv=2, T=7, D=4, Dv=3, kind="hedgehog", gate=gate, pad=2)
    ref = brute_force(case, window)
    for form in ("parallel", "chunked", "recurrent"):
        out, state = run(case, window=window, form=form, chunk_size=3)
        assert max_err(out, ref[0]) <= 1e-12 and max_err(state, ref[1]) <= 1e-12, form


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("window", (0, 1, 4))
def test_brute_force_with_cache(gate: str | None, window: int) -> None:
    """Past keys/values and a non-zero incoming state, against the explicit loops."""
    g = torch.Generator().manual_seed(5)
    case = make_case(12, B=2, H=4, Hkv=2, T=5, D=4, Dv=3, kind="taylor2", gate=gate, pad=0)
    P = max(window - 1, 0)
    past_k, past_v = torch.randn(2, 2, P, 4, generator=g, dtype=F64), torch.randn(2, 2, P, 3, generator=g, dtype=F64)
    state = torch.rand(2, 4, case["feature_q"].out_dim, 4, generator=g, dtype=F64)
    mask = torch.ones(2, P + 5, dtype=torch.bool)
    mask[0, 0] = False
    case["key_mask"] = mask
    ref = brute_force(case, window, past_k, past_v, state)
    for form in ("parallel", "chunked", "recurrent"):
        out, new_state = run(case, window=window, form=form, chunk_size=2, past_k=past_k if P else None,
                             past_v=past_v if P else None, state=state)
        assert max_err(out, ref[0]) <= 1e-12 and max_err(new_state, ref[1]) <= 1e-12, form


def low_precision(case: dict, dtype: torch.dtype) -> dict:
    import copy
    out = {**case, **{n: case[n].to(dtype) for n in ("q", "k", "v")}}
    out["feature_q"] = copy.deepcopy(case["feature_q"]).to(dtype)
    out["feature_k"] = copy.deepcopy(case["feature_k"]).to(dtype)
    return out


# Measured (seed 3, T=300, D=Dv=32, per-head gate, windows 0/64), max |err| / max |ref|:
#   float32:  out ≤ 6e-7, state ≤ 5e-7   -> tolerance 1e-5
#   bfloat16: out ≤ 5e-3, state ≤ 1.1e-2 (hedgehog: bf16 inputs rounded before exp(z), |z| ≈ 10)
#             -> tolerances 2e-2 (out) and 3e-2 (state); the state itself is float32.
@pytest.mark.parametrize("dtype, tol_out, tol_state", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 3e-2)])
@pytest.mark.parametrize("kind", FEATURE_MAP_KINDS)
@pytest.mark.parametrize("window", (0, 64))
def test_low_precision_against_float64(dtype, tol_out, tol_state, kind: str, window: int) -> None:
    case = make_case(3, T=300, D=32, Dv=32, kind=kind, gate="head")
    ref_out, ref_state = run(case, window=window)
    out, state = run(low_precision(case, dtype), window=window)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert max_err(out, ref_out) <= tol_out * ref_out.abs().max().item()
    assert max_err(state, ref_state) <= tol_state * ref_state.abs().max().item()


def long_inputs(T: int, dtype: torch.dtype, gate: str | None, H: int = 9, Hkv: int = 3) -> dict:
    """SmolLM2 head shapes (9 q / 3 kv heads, D = 64) with large activations (score std ≈ 9) and
    Liger-style gates."""
    g = torch.Generator().manual_seed(0)
    D = 64
    fq, fk = make_feature_map("hedgehog", H, D).to(dtype), make_feature_map("hedgehog", Hkv, D).to(dtype)
    case = dict(q=(3 * torch.randn(1, H, T, D, generator=g)).to(dtype), k=(3 * torch.randn(1, Hkv, T, D, generator=g)).to(dtype),
                v=torch.randn(1, Hkv, T, D, generator=g).to(dtype), feature_q=fq, feature_k=fk, scale=D ** -0.5)
    if gate is not None:
        shape = (1, H, T) if gate == "head" else (1, H, T, fq.out_dim)
        case["log_decay"] = (torch.nn.functional.logsigmoid(torch.randn(shape, generator=g)) / 16).to(dtype)
    return case


@pytest.mark.parametrize("T, dtype, gate, window", [
    (4096, torch.bfloat16, "channel", 64), (4096, torch.bfloat16, None, 0),
    pytest.param(32768, torch.float32, "head", 64, marks=pytest.mark.slow),
    pytest.param(32768, torch.float32, "channel", 64, marks=pytest.mark.slow),
    pytest.param(32768, torch.float32, None, 0, marks=pytest.mark.slow),
])
def test_long_sequences_stay_finite(T: int, dtype: torch.dtype, gate: str | None, window: int) -> None:
    heads = (9, 3) if T > 4096 else (3, 1)        # one GQA group keeps the default run short
    out, state = run(long_inputs(T, dtype, gate, *heads), window=window, chunk_size=64)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    assert out.abs().max() < 10


def test_32k_float32_ungated_is_finite() -> None:
    """The default-run 32 K check (about 1.5 s): no decay, pure linear, fp32 chunked."""
    case = long_inputs(32768, torch.float32, None, 3, 1)
    out, state = run(case, window=0, chunk_size=128)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()


def test_strong_decay_chunk_is_stable() -> None:
    """A chunk whose cumulative log decay is −6400 (exp(+6400) would overflow) stays exact."""
    case = make_case(2, T=64, kind="elu1", gate="channel")
    case["log_decay"] = torch.full_like(case["log_decay"], -100.0)
    ref = run(case, window=0, form="recurrent")
    out = run({**{n: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
                  for n, x in case.items()}, "feature_q": case["feature_q"].float(),
               "feature_k": case["feature_k"].float()}, window=0, chunk_size=64)
    assert torch.isfinite(out[0]).all() and max_err(out[0], ref[0]) < 1e-5


# -------------------------------------------------------------------------------- bidirectional
def bidir_case(seed: int, T: int, kind: str = "hedgehog") -> dict:
    case = make_case(seed, T=T, kind=kind, gate=None, pad=2)
    return case


def run_bidir(case: dict, **kw) -> torch.Tensor:
    with torch.no_grad():
        return bidirectional_linear_attention(**{**case, **kw})


@pytest.mark.parametrize("kind", FEATURE_MAP_KINDS)
@pytest.mark.parametrize("mask", ["none", "band", "grid", "batched"])
def test_bidirectional_parallel_equals_chunked(kind: str, mask: str) -> None:
    case = bidir_case(21, 17, kind)
    local = {"none": None, "band": local_window_mask(17, 3),
             "grid": local_window_mask(17, 2, grid=(4, 4), n_prefix=1),
             "batched": torch.stack([local_window_mask(17, 2), local_window_mask(17, 4)])}[mask]
    ref = run_bidir(case, local_mask=local, form="parallel")
    for chunk in (4, 5, 64):
        assert max_err(run_bidir(case, local_mask=local, chunk_size=chunk), ref) <= 1e-10
    assert torch.all(ref[1, :, :2] == 0) and torch.isfinite(ref).all()


def test_bidirectional_no_mask_is_pure_linear() -> None:
    case = bidir_case(22, 9, "elu1")
    case.pop("key_mask")
    q, v = case["q"], case["v"].repeat_interleave(3, 1)
    with torch.no_grad():
        fq = case["feature_q"](q * case["scale"] ** 0.5)
        fk = case["feature_k"](case["k"] * case["scale"] ** 0.5).repeat_interleave(3, 1)
    kern = case["linear_weight"][None, :, None, None] * fq @ fk.transpose(-1, -2)
    expected = (kern @ v) / kern.sum(-1, keepdim=True).clamp_min(1e-6)
    assert max_err(run_bidir(case), expected) <= 1e-12


def test_grid_window_mask_neighbours() -> None:
    m = local_window_mask(16, 2, grid=(4, 4))
    assert m.shape == (16, 16) and torch.equal(m, m.T)
    assert m[5].nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]   # patch (1, 1): 3×3 block
    assert m[0].nonzero().flatten().tolist() == [0, 1, 4, 5]                      # corner: 2×2 block
    assert m[3].nonzero().flatten().tolist() == [2, 3, 6, 7]                      # no wrap across rows
    band = local_window_mask(6, 2)
    assert band.sum(1).tolist() == [2, 3, 3, 3, 3, 2]


def test_prefix_token_attends_everything_exactly() -> None:
    """A CLS token sees every key through exact softmax (no linear part), and every patch sees it."""
    case = bidir_case(23, 17, "hedgehog")
    case.pop("key_mask")
    case["window_weight"] = torch.ones(6, dtype=F64)
    mask = local_window_mask(17, 2, grid=(4, 4), n_prefix=1)
    assert mask[0].all() and mask[:, 0].all()
    out = run_bidir(case, local_mask=mask)
    k, v = case["k"].repeat_interleave(3, 1), case["v"].repeat_interleave(3, 1)
    soft = torch.softmax(case["scale"] * case["q"] @ k.transpose(-1, -2), -1) @ v
    assert max_err(out[:, :, 0], soft[:, :, 0]) <= 1e-5        # eps = 1e-6 in the denominator
    assert max_err(out[:, :, 1:], soft[:, :, 1:]) > 1e-3      # patches mix in the linear kernel


# ------------------------------------------------------------------------------- optional: fla
def _fla_simple_gla():
    pytest.importorskip("einops")
    import importlib.util
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla (fla-core) is not installed")
    import pathlib
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "ops" / "simple_gla" / "naive.py"
    if not path.exists():
        pytest.skip(f"{path} not found in this fla version")
    mod_spec = importlib.util.spec_from_file_location("fla_simple_gla_naive", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)       # by path: fla's package __init__ needs Triton
    return module


@pytest.mark.parametrize("gate", [None, "head"])
def test_matches_fla_naive_simple_gla(gate: str | None) -> None:
    """fla's naive recurrent/chunk simple GLA on φ(q), φ(k), [v, 1] gives our numerator and normaliser."""
    fla = _fla_simple_gla()
    case = make_case(31, B=2, H=4, Hkv=4, T=70, D=8, Dv=5, kind="elu1", gate=gate or "head", pad=0, weights=False)
    if gate is None:
        case["log_decay"] = torch.zeros_like(case["log_decay"])
    ours, state = run(case, window=0)
    with torch.no_grad():
        fq = case["feature_q"](case["q"] * case["scale"] ** 0.5).float()
        fk = case["feature_k"](case["k"] * case["scale"] ** 0.5).float()
    vv = torch.cat([case["v"], torch.ones_like(case["v"][..., :1])], -1).float()
    bthd = [x.transpose(1, 2).contiguous() for x in (fq, fk, vv)]
    g = case["log_decay"].float().transpose(1, 2).contiguous()
    for fn in (fla.naive_recurrent_simple_gla, fla.naive_chunk_simple_gla):
        o, S = fn(*bthd, g, scale=1.0, output_final_state=True) if fn is fla.naive_chunk_simple_gla \
            else fn(*bthd, g, scale=1.0)
        o = o.transpose(1, 2).double()
        expected = o[..., :-1] / o[..., -1:].clamp_min(1e-6)
        assert max_err(ours, expected) <= 1e-4
        assert max_err(state, S.double()) <= 1e-4 * state.abs().max().item()


# ------------------------------------------------------------------------------------- bad input
BAD = {
    "heads": (dict(k="k5"), "multiple of the key/value heads"),
    "decay shape": (dict(log_decay=torch.zeros(2, 6, 5)), "log_decay has shape"),
    "decay positive": (dict(log_decay=torch.full((2, 6, 23), 0.1, dtype=F64)), "must be ≤ 0"),
    "past too long": (dict(past_k=torch.zeros(2, 2, 3, 8, dtype=F64), past_v=torch.zeros(2, 2, 3, 5, dtype=F64),
                           window=3), "keeps at most 2 raw"),
    "past alone": (dict(past_k=torch.zeros(2, 2, 1, 8, dtype=F64), window=3), "together"),
    "form": (dict(form="fast"), "unknown form='fast'"),
    "window": (dict(window=-1), "window must be an int"),
    "chunk": (dict(chunk_size=0), "chunk_size must be a positive int"),
    "key mask": (dict(key_mask=torch.ones(2, 5, dtype=torch.bool)), "key_mask has shape"),
    "state": (dict(state=torch.zeros(2, 6, 3, 6)), "state has shape"),
    "weights": (dict(window_weight=torch.ones(4)), "one weight per query head"),
    "q rank": (dict(q="q3"), "q must be a 4-D tensor"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises_config_error(name: str) -> None:
    case = make_case(0, gate=None, pad=0)
    kw, message = BAD[name]
    kw = dict(kw)
    if kw.get("k") == "k5":
        kw["k"] = kw["v"] = torch.zeros(2, 4, 23, 8, dtype=F64)
    if kw.get("q") == "q3":
        kw["q"] = torch.zeros(6, 23, 8, dtype=F64)
    with pytest.raises(ConfigError, match=message):
        run(case, **kw)


def test_bad_bidirectional_and_mask_input() -> None:
    case = bidir_case(0, 8)
    with pytest.raises(ConfigError, match="local_mask must be a bool tensor"):
        run_bidir(case, local_mask=torch.ones(7, 7, dtype=torch.bool))
    with pytest.raises(ConfigError, match="unknown form='recurrent'"):
        run_bidir(case, form="recurrent")
    with pytest.raises(ConfigError, match="grid=\\(3, 3\\) has 9 patches"):
        local_window_mask(11, 2, grid=(3, 3), n_prefix=1)
    with pytest.raises(ConfigError, match="window must be an int"):
        local_window_mask(8, -1)
