"""ReplaceLinearBlocks on a tiny Llama: linearity report, fold exactness, outputs, replay, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.core.errors import ConfigError, PlanError
from surgeon.passes import ReplaceLinearBlocks, block_linearity
from surgeon.passes.linear_blocks.handler import SkippedBlock, affine_r2, fit_spans, find_blocks, _Moments

from lin_helpers import _one_thread, tiny_llama, token_batches  # noqa: F401 (fixtures)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(m, state):
    sd = m.state_dict()
    return sd.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in sd.items())


def _hidden(model, ids):
    """Inputs of every block (index i) and the last block's output (index L), by hooks."""
    layers = model.model.layers
    out = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: out.__setitem__(i, a[0])) for i, b in enumerate(layers)]
    hooks.append(layers[-1].register_forward_hook(lambda m, a, o: out.__setitem__(len(layers), o)))
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return out


def test_affine_r2_matches_direct_least_squares():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 5, generator=g, dtype=torch.float64) + 0.3 * torch.randn(300, 5, generator=g, dtype=torch.float64) + 2
    mo = _Moments(5)
    mo.add(x[:100], y[:100]); mo.add(x[100:], y[100:])
    X1 = torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], 1)
    for residual, target in ((True, y), (False, y - x)):
        sol = torch.linalg.lstsq(X1, target).solution
        r2 = 1 - ((X1 @ sol - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
        assert affine_r2(mo, 0.0, residual) == pytest.approx(float(r2), abs=1e-9)


def test_linearity_report_and_plot(tiny_llama, token_batches, tmp_path):
    rep = block_linearity(tiny_llama, token_batches)
    assert [r["block"] for r in rep.rows] == list(range(5))
    for r in rep.rows:
        assert 0.0 < r["r2_no_residual"] < r["r2"] <= 1.0 and r["tokens"] == 4 * 4 * 16
    s = surgeon.apply(tiny_llama, ReplaceLinearBlocks(k=2, calibration=token_batches, plot=str(tmp_path / "lin.png")))
    assert (tmp_path / "lin.png").stat().st_size > 1000
    rows = s.report["ReplaceLinearBlocks"].rows
    chosen = sorted(r["block"] for r in rows if r["replaced"])
    best = sorted(r["block"] for r in sorted((r for r in rep.rows if r["block"] >= 1), key=lambda r: -r["r2"])[:2])
    assert chosen == best
    assert [r["r2"] for r in rows] == pytest.approx([r["r2"] for r in rep.rows])


@pytest.mark.parametrize("blocks", [[2], [2, 3]])
def test_fold_is_exactly_the_fitted_linear_map(tiny_llama, token_batches, blocks):
    s = surgeon.apply(tiny_llama, ReplaceLinearBlocks(blocks=blocks, calibration=token_batches))
    start, end = blocks[0], blocks[-1] + 1
    for i in blocks:
        assert isinstance(s.model.model.layers[i], SkippedBlock)
    path, layers = find_blocks(tiny_llama)
    (fit,) = fit_spans(tiny_llama, path, layers, [(start, end)], token_batches, ReplaceLinearBlocks(blocks=blocks))
    ids = token_batches[0]
    cap = {}
    h = tiny_llama.model.layers[start - 1].mlp.down_proj.register_forward_hook(lambda m, a, o: cap.__setitem__("u", o))
    with torch.no_grad():
        hs = _hidden(tiny_llama, ids)
    h.remove()
    u = cap["u"].double()
    expected = hs[start].double() - u + u @ fit.T          # (h_s − u) + u T
    with torch.no_grad():
        got = _hidden(s.model, ids)[end].double()          # what enters block `end` after the surgery
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
    # on calibration data the fitted map beats dropping (T = I is one of the maps least squares considered)
    err_replaced = float(((got - hs[end].double()) ** 2).sum())
    err_dropped = float(((hs[start].double() - hs[end].double()) ** 2).sum())
    assert err_replaced < err_dropped
    # outputs change, parameters drop, nothing is added
    with torch.no_grad():
        assert not torch.allclose(s.model(ids).logits, tiny_llama(ids).logits)
    n_block = sum(p.numel() for p in tiny_llama.model.layers[start].parameters())
    n0 = sum(p.numel() for p in tiny_llama.parameters())
    assert sum(p.numel() for p in s.model.parameters()) == n0 - len(blocks) * n_block


def test_replacement_beats_dropping_in_loss(tiny_llama, token_batches):
    s = surgeon.apply(tiny_llama, ReplaceLinearBlocks(blocks=[3], calibration=token_batches))
    dropped = copy.deepcopy(tiny_llama)
    dropped.model.layers[3] = SkippedBlock(3)
    ref = torch.cat([tiny_llama(ids).logits.softmax(-1) for ids in token_batches]).detach()

    def kl(m):
        logp = torch.cat([m(ids).logits.log_softmax(-1) for ids in token_batches]).detach()
        return float((ref * (ref.clamp_min(1e-12).log() - logp)).sum(-1).mean())

    assert kl(s.model) < kl(dropped)


def test_generate_and_restore(tiny_llama, token_batches, tmp_path):
    s = surgeon.apply(tiny_llama, ReplaceLinearBlocks(k=2, calibration=token_batches))
    out = s.model.generate(token_batches[0][:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    surgeon.save(s, tmp_path)
    again = surgeon.restore(tiny_llama, tmp_path)
    ids = token_batches[1]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, s.model(ids).logits)


def test_bad_input_leaves_model_untouched(tiny_llama, token_batches):
    state = _state(tiny_llama)
    with pytest.raises(ConfigError, match="block 0 has no previous block"):
        surgeon.apply(tiny_llama, ReplaceLinearBlocks(blocks=[0], calibration=token_batches), inplace=True)
    with pytest.raises(ConfigError, match="k=5 but only 4"):
        surgeon.apply(tiny_llama, ReplaceLinearBlocks(k=5, calibration=token_batches), inplace=True)
    with pytest.raises(ConfigError, match="do not exist"):
        surgeon.apply(tiny_llama, ReplaceLinearBlocks(blocks=[7], calibration=token_batches), inplace=True)
    with pytest.raises(ConfigError, match="needs calibration"):
        surgeon.apply(tiny_llama, ReplaceLinearBlocks(k=1), inplace=True)
    with pytest.raises(PlanError, match="no output projection"):
        surgeon.apply(tiny_llama, ReplaceLinearBlocks(blocks=[2], out_proj="mlp.nope", calibration=token_batches),
                      inplace=True)
    assert _same(tiny_llama, state)
    assert all(not isinstance(b, SkippedBlock) for b in tiny_llama.model.layers)


class _Widen(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.mlp.down_proj(x)


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Widen(8, 8), _Widen(8, 8), _Widen(8, 12), _Widen(12, 12)])

    def forward(self, x):
        for b in self.layers:
            y = b(x)
            x = x + y if y.shape == x.shape and not isinstance(b, SkippedBlock) else y
        return x


def test_block_with_different_in_and_out_shapes_is_rejected():
    torch.manual_seed(0)
    model = _Stack().eval()
    state = _state(model)
    cal = [torch.randn(4, 8) for _ in range(3)]
    with pytest.raises(PlanError, match=r"block layers\.2 maps \[4, 8\] to \[4, 12\]: a folded linear replacement "
                                        r"needs equal input and output shapes"):
        surgeon.apply(model, ReplaceLinearBlocks(blocks=[2], calibration=cal), inplace=True)
    assert _same(model, state)
    s = surgeon.apply(model, ReplaceLinearBlocks(blocks=[1], calibration=cal))   # an equal-shape block is fine
    assert isinstance(s.model.layers[1], SkippedBlock)


def test_cli_report_linearity(tmp_path, capsys):
    from surgeon.cli.commands import main

    rc = main(["report", "--linearity", "lin_helpers:tiny_llama_factory", "--chunks", "8", "--seq-len", "16",
               "--plot", str(tmp_path / "l.png"), "--json", str(tmp_path / "l.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "block linearity" in out and "r2_no_residual" in out
    assert (tmp_path / "l.png").is_file() and (tmp_path / "l.json").is_file()
    assert main(["report"]) == 2


def test_gpt2_conv1d_projection_takes_the_fold():
    """GPT-2's MLP output is transformers' Conv1D (``x @ W + b``, W stored (in, out)): the fold is W T."""
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=4, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(4)]
    s = surgeon.apply(gpt2, ReplaceLinearBlocks(blocks=[2], calibration=batches))
    assert isinstance(s.model.transformer.h[2], SkippedBlock)
    assert [r["fold_into"] for r in s.report["ReplaceLinearBlocks"].rows if r["replaced"]] == [
        "transformer.h.1.mlp.c_proj"]
    path, layers = find_blocks(gpt2)
    (fit,) = fit_spans(gpt2, path, layers, [(2, 3)], batches, ReplaceLinearBlocks(blocks=[2]))
    ids = batches[1]
    cap = {}
    hooks = [gpt2.transformer.h[1].mlp.c_proj.register_forward_hook(lambda m, a, o: cap.__setitem__("u", o)),
             gpt2.transformer.h[2].register_forward_pre_hook(lambda m, a: cap.__setitem__("h2", a[0])),
             gpt2.transformer.h[3].register_forward_pre_hook(lambda m, a: cap.__setitem__("h3", a[0]))]
    with torch.no_grad():
        gpt2(ids)
    for h in hooks:
        h.remove()
    u = cap["u"].double()
    expected = cap["h2"].double() - u + u @ fit.T
    seen = {}
    h = s.model.transformer.h[3].register_forward_pre_hook(lambda m, a: seen.__setitem__("h3", a[0]))
    with torch.no_grad():
        s.model(ids)
    h.remove()
    got = seen["h3"].double()
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
    assert float(((got - cap["h3"].double()) ** 2).sum()) < float(((cap["h2"].double() - cap["h3"].double()) ** 2).sum())
