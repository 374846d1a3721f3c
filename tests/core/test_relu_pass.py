"""LinearizeReLU / FinalizeReLU on a residual CNN with every ReLU spelling: sites, exactness, finalize."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import surgeon
from surgeon.ops.activation import BinaryMaskedReLU, MaskedReLU
from surgeon.passes import FinalizeReLU, LinearizeReLU, masked_units

EXPECTED_SITES = [
    "stem.2", "layer1.0.relu", "layer1.0.relu@1", "layer1.1.relu", "layer1.1.relu@1", "relu",
    "head.mix.1", "head.relu6", "head.relu", "head.relu@1", "head.relu@2",
]


def test_every_call_site_is_its_own_site(resnet, images):
    s = surgeon.apply(resnet, LinearizeReLU(granularity="layer"))
    names = [site.name for site in s.recipe.entries[0].sites]
    assert names == EXPECTED_SITES
    kinds = {site.name: site.op for site in s.recipe.entries[0].sites}
    assert kinds["head.mix.1"] == kinds["head.relu6"] == "relu6"
    # the shared self.relu became two independent units
    assert s.model.get_submodule("layer1.0.relu_0") is not s.model.get_submodule("layer1.0.relu_1")
    assert sum(isinstance(m, MaskedReLU) for m in s.model.modules()) == 11


@pytest.mark.parametrize("granularity", ["layer", "channel", "pixel"])
def test_mask_init_is_exact_at_other_batch_sizes(resnet, images, granularity):
    s = surgeon.apply(resnet, LinearizeReLU(granularity=granularity), example_inputs=(images,))
    for batch in (1, 3, 5):
        x = torch.randn(batch, 3, 12, 12)
        assert torch.equal(s.model(x), resnet(x))
    if granularity != "pixel":  # per-element masks fix the spatial size; the others do not
        x = torch.randn(2, 3, 20, 16)
        assert torch.equal(s.model(x), resnet(x))


class NoReLU(nn.Module):
    """Reference: TinyResNet's computation with every activation replaced by the identity."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        n = self.net
        x = n.stem[1](n.stem[0](x))
        for b in n.layer1:
            out = b.bn2(b.conv2(b.bn1(b.conv1(x))))
            x = out + x
        h = n.head
        x = h.mix[0](x) - 1.0
        x = x + (x - 0.5)
        x = x.mean(dim=(2, 3))
        return h.fc2(h.fc1(x))


def test_init_zero_linearizes_every_site(resnet, images):
    s = surgeon.apply(resnet, LinearizeReLU(granularity="channel", init=0.0), example_inputs=(images,))
    x = torch.randn(3, 3, 12, 12)
    torch.testing.assert_close(s.model(x), NoReLU(resnet)(x), rtol=1e-5, atol=1e-5)
    assert s.report["model (per example)"].rows[2]["after"] == 0  # relu_count


class InplaceAlias(nn.Module):
    """``F.relu(x, inplace=True)`` changes ``x``: later readers of ``x`` see the activation."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        x = self.lin(x)
        y = F.relu(x, inplace=True)
        return x * 2 + y  # both are the activated tensor


def test_inplace_semantics_are_kept():
    torch.manual_seed(0)
    net = InplaceAlias()
    x = torch.randn(4, 6)
    s = surgeon.apply(net, LinearizeReLU(granularity="layer"))
    torch.testing.assert_close(s.model(x), net(x), rtol=0, atol=0)
    zero = surgeon.apply(net, LinearizeReLU(granularity="layer", init=0.0))
    torch.testing.assert_close(zero.model(x), 3 * net.lin(x), rtol=1e-6, atol=1e-6)


def test_relu_count_and_macs_follow_the_documented_convention(resnet, images):
    s = surgeon.apply(resnet, LinearizeReLU(granularity="pixel"), example_inputs=(images,))
    report = s.report["LinearizeReLU"]
    per_site = {r["site"]: r["relus"] for r in report.rows}
    assert per_site["stem.2"] == 8 * 12 * 12  # C*H*W per example
    assert per_site["head.relu@2"] == 16  # Linear(8, 16) output
    assert report.totals["relus"] == 10 * 8 * 12 * 12 + 16
    summary = {r["metric"]: r for r in s.report["model (per example)"].rows}
    conv3x3 = 12 * 12 * 8 * 8 * 9
    expected_macs = 12 * 12 * 8 * 3 * 9 + 4 * conv3x3 + 12 * 12 * 8 * 8 + 8 * 16 + 16 * 5
    assert summary["macs"]["before"] == expected_macs
    assert summary["params"]["after"] - summary["params"]["before"] == report.totals["params"]
    text = str(s.report)
    assert "layer1.0.relu@1" in text and "total" in text
    import json

    json.dumps(s.report.to_dict())


def _set_masks(model: nn.Module, fill: dict[str, str]) -> None:
    """fill maps site name -> 'zero' | 'one' | 'half' (every other channel kept)."""
    units = masked_units(model)
    with torch.no_grad():
        for site, how in fill.items():
            m = units[site].mask
            if how == "zero":
                m.zero_()
            elif how == "half":
                m.zero_()
                m.view(-1)[::2] = 1.0


def _relu_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.relu, F.relu6))


def test_finalize_removes_identity_sites_and_restores_plain_relus(resnet, images):
    s = surgeon.apply(resnet, LinearizeReLU(granularity="channel"), example_inputs=(images,))
    _set_masks(s.model, {"stem.2": "zero", "layer1.0.relu@1": "zero", "head.relu6": "half", "head.relu@2": "half"})
    x = torch.randn(3, 3, 12, 12)
    masked_out = s.model(x)
    nodes_before = len(s.model.graph.nodes)

    f = surgeon.apply(s, FinalizeReLU())
    actions = {r["site"]: r["action"] for r in f.report["FinalizeReLU"].rows}
    assert actions["stem.2"] == actions["layer1.0.relu@1"] == "identity"
    assert actions["head.relu6"] == actions["head.relu@2"] == "masked"
    assert list(actions.values()).count("relu") == 7
    gm = f.model
    assert len(gm.graph.nodes) == nodes_before - 2  # identity sites are gone from the graph
    assert _relu_nodes(gm) == 7
    assert sum(isinstance(m, MaskedReLU) for m in gm.modules()) == 0
    assert sum(isinstance(m, BinaryMaskedReLU) for m in gm.modules()) == 2
    assert list(masked_units(gm)) == ["head.relu6", "head.relu@2"]
    torch.testing.assert_close(gm(x), masked_out, rtol=1e-6, atol=1e-6)
    # finalized ReLU count: 2 identity sites drop out, 2 sites keep half their channels
    summary = {r["metric"]: r for r in f.report["model (per example)"].rows}
    full = 10 * 8 * 12 * 12 + 16
    assert summary["relu_count"]["before"] == full
    assert summary["relu_count"]["after"] == full - 2 * 1152 - 576 - 8
    assert [e.pass_name for e in f.recipe.entries] == ["LinearizeReLU", "FinalizeReLU"]


def test_selection_by_name_suffix_regex_and_filter_fn(resnet, images):
    def chosen(**kw):
        s = surgeon.apply(resnet, LinearizeReLU(granularity="layer", **kw))
        return [site.name for site in s.recipe.entries[0].sites]

    assert chosen(targets=["layer1.0.relu"]) == ["layer1.0.relu", "layer1.0.relu@1"]  # both calls
    assert chosen(targets=["layer1.0.relu@1"]) == ["layer1.0.relu@1"]
    assert chosen(targets=["mix.1"]) == ["head.mix.1"]  # dotted suffix
    assert chosen(targets=r"head\..*") == ["head.mix.1", "head.relu6", "head.relu", "head.relu@1", "head.relu@2"]
    assert chosen(exclude=r"layer1\..*") == ["stem.2", "relu", "head.mix.1", "head.relu6", "head.relu",
                                             "head.relu@1", "head.relu@2"]
    got = chosen(filter_fn=lambda module, fqn: isinstance(module, nn.ReLU6))
    assert got == ["head.mix.1"]


def test_partial_selection_keeps_other_calls_of_a_shared_module(resnet, images):
    s = surgeon.apply(resnet, LinearizeReLU(granularity="layer", init=0.0, targets=["layer1.0.relu@1"]))
    block = resnet.layer1[0]
    x = torch.randn(2, 3, 12, 12)
    # reference: second call of block 0's relu is the identity, everything else untouched
    with torch.no_grad():
        h = resnet.stem(x)
        out = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(h)))))
        h = out + h
        h = F.relu(resnet.layer1[1](h))
        ref = resnet.head(h)
    torch.testing.assert_close(s.model(x), ref, rtol=1e-6, atol=1e-6)


def test_efficientnet_style_sequential_and_relu6_count():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
                        nn.Hardtanh(0.0, 6.0))
    x = torch.randn(2, 3, 8, 8)
    s = surgeon.apply(net, LinearizeReLU(granularity="pixel"), example_inputs=(x,))
    assert [site.op for site in s.recipe.entries[0].sites] == ["relu6", "relu6"]
    assert s.report["LinearizeReLU"].totals["relus"] == 4 * 6 * 6 + 3
    assert math.isclose((s.model(x) - net(x)).abs().max().item(), 0.0)
