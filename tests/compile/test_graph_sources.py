"""One ReLU pattern description, three graph sources: symbolic_trace, dynamo capture, torch.export."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import surgeon
from surgeon.fx import patterns as graph_patterns
from surgeon.passes import FinalizeReLU, LinearizeReLU, masked_units
from surgeon.passes.relu.handler import relu_sites

from compile_models import SOURCES, Spellings, TinyResNet, capture, seeded

torch.set_num_threads(1)

MODELS = {"resnet": (TinyResNet, (2, 3, 6, 6)), "spellings": (Spellings, (2, 3, 5, 5))}
EXPECTED = {
    "resnet": ["stem.2", "layer1.0.relu", "layer1.0.relu@1", "layer1.1.relu", "layer1.1.relu@1", "relu"],
    "spellings": ["act", "relu", "relu@1", "relu@2", "relu@3", "relu@4", "relu@5", "relu@6",
                  "relu6", "relu6@1", "relu6@2", "act6", "ht"],
}


def _setup(name: str):
    cls, shape = MODELS[name]
    torch.manual_seed(1)
    return seeded(cls()), torch.randn(*shape)


def _random_masks(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Per site name, a mask with zeros, ones and fractions (the same values for every graph)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, unit in sorted(masked_units(model).items()):
        m = torch.rand(unit.mask.shape, generator=g)
        m[m < 0.3] = 0.0
        m[m > 0.7] = 1.0
        out[name] = m
    return out


def _set_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    units = masked_units(model)
    assert sorted(units) == sorted(masks)
    with torch.no_grad():
        for name, m in masks.items():
            units[name].mask.copy_(m)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("source", SOURCES)
def test_same_site_names_on_every_graph(model_name: str, source: str) -> None:
    model, x = _setup(model_name)
    gm, _ = capture(model, x, source)
    expected_source = {"symbolic_trace": "symbolic_trace", "dynamo": "dynamo"}.get(source, "export")
    assert graph_patterns.graph_source(gm) == expected_source
    sites = relu_sites(gm)
    assert [s.name for s in sites] == EXPECTED[model_name]
    kinds = {s.name: s.op for s in sites}
    assert kinds["stem.2" if model_name == "resnet" else "act6"] == "relu6"
    if model_name == "spellings":
        assert [kinds[n] for n in ("relu6", "relu6@1", "relu6@2", "ht")] == ["relu6"] * 4
        assert kinds["relu@5"] == kinds["relu@6"] == "relu"  # clamp(min=0), clamp_min(0)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("source", SOURCES)
def test_rewrite_matches_eager_surgery(model_name: str, source: str) -> None:
    """Random 0/1/fractional masks per site name: every graph's surgery computes the eager one."""
    model, x = _setup(model_name)
    eager = surgeon.apply(model, LinearizeReLU(granularity="channel"), example_inputs=(x,))
    masks = _random_masks(eager.model, seed=3)
    _set_masks(eager.model, masks)
    with torch.no_grad():
        ref = eager.model(x)
        plain = model(x)

    gm, args = capture(model, x, source)
    # captured graphs carry their shapes in node metadata: no example inputs needed
    s = surgeon.apply(gm, LinearizeReLU(granularity="channel"),
                      example_inputs=args if source == "symbolic_trace" else None)
    assert [r["site"] for r in s.report["LinearizeReLU"].rows] == EXPECTED[model_name]
    _set_masks(s.model, masks)
    with torch.no_grad():
        out = s.model(*args)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert (ref - plain).abs().max() > 1e-2  # the masks change the output: the test can fail
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", SOURCES)
def test_finalize_on_each_graph(source: str) -> None:
    model, x = _setup("resnet")
    gm, args = capture(model, x, source)
    s = surgeon.apply(gm, LinearizeReLU(granularity="channel"), example_inputs=args)
    units = masked_units(s.model)
    with torch.no_grad():
        units["stem.2"].mask.zero_()                  # -> identity
        units["layer1.0.relu@1"].mask[1:] = 0.0       # -> frozen binary mask
    before = s.model(*args)
    f = surgeon.apply(s, FinalizeReLU())
    actions = {r["site"]: r["action"] for r in f.report["FinalizeReLU"].rows}
    assert actions == {"stem.2": "identity", "layer1.0.relu": "relu", "layer1.0.relu@1": "masked",
                       "layer1.1.relu": "relu", "layer1.1.relu@1": "relu", "relu": "relu"}
    after = f.model(*args)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_module_path_and_is_op_across_sources() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 8)
            self.sm = nn.Softmax(dim=-1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x)
            a = self.sm(q @ x.transpose(-2, -1)) @ x
            return a + F.scaled_dot_product_attention(q, x, x)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Attn()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks[0](x)

    x = torch.randn(2, 5, 8)
    for source in ("symbolic_trace", "dynamo", "export"):
        gm, _ = capture(Outer().eval(), x, source)
        softmax = [n for n in gm.graph.nodes if graph_patterns.is_op(n, "softmax", gm)]
        sdpa = [n for n in gm.graph.nodes if graph_patterns.is_op(n, "sdpa", gm)]
        mm = [n for n in gm.graph.nodes if graph_patterns.is_op(n, "matmul", gm)]
        assert len(softmax) == 1 and len(sdpa) == 1 and len(mm) >= 2, source
        assert graph_patterns.module_path(softmax[0], gm) == "blocks.0.sm", source
        assert graph_patterns.module_path(sdpa[0], gm) == "blocks.0", source
    with pytest.raises(KeyError, match="known ops"):
        graph_patterns.is_op(softmax[0], "no-such-op")


def test_normalize_dynamo_paths() -> None:
    assert graph_patterns.normalize_path("L['self'].layers[0]._modules['fc']") == "layers.0.fc"
    assert graph_patterns.normalize_path("L['self']") == ""
    assert graph_patterns.normalize_path("layer1.0.relu") == "layer1.0.relu"
