"""Bad input: each case gives a clear error that names what is wrong, and the model is untouched."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.passes import FinalizeReLU, LinearizeReLU


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return torch.relu(self.lin(x))
        return self.lin(x)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.pre(x))


def test_not_a_module():
    with pytest.raises(surgeon.ConfigError, match="needs a torch.nn.Module, got function"):
        surgeon.apply(lambda x: x, LinearizeReLU())
    with pytest.raises(surgeon.ConfigError, match="is not a pass"):
        surgeon.apply(nn.ReLU(), "LinearizeReLU")


def test_untraceable_names_module_and_line_and_leaf_hint_fixes_it():
    net = Wrapper()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(surgeon.TraceError) as err:
        surgeon.apply(net, LinearizeReLU(granularity="layer"))
    msg = str(err.value)
    assert "module 'gate' (DataDependent)" in msg
    assert "test_bad_input.py" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules=['gate']" in msg
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    # following the hint works: the leaf is opaque, the ReLU outside it is found
    s = surgeon.apply(net, LinearizeReLU(granularity="layer", leaf_modules=["gate"]))
    assert [site.name for site in s.recipe.entries[0].sites] == ["pre.1"]
    x = torch.randn(3, 4)
    assert torch.equal(s.model(x), net(x))
    by_class = surgeon.apply(net, LinearizeReLU(granularity="layer", leaf_modules=["DataDependent"]))
    assert len(by_class.recipe.entries[0].sites) == 1


def test_selector_matching_nothing_lists_existing_names(resnet):
    with pytest.raises(surgeon.SelectionError) as err:
        surgeon.apply(resnet, LinearizeReLU(granularity="layer", targets=["layer9.relu"]))
    msg = str(err.value)
    assert "['layer9.relu'] matched no ReLU call site" in msg
    assert "layer1.0.relu@1" in msg and "head.relu6" in msg
    with pytest.raises(surgeon.SelectionError, match="matched no ReLU call site"):
        surgeon.apply(resnet, LinearizeReLU(granularity="layer", targets=r"nothing\..*"))
    with pytest.raises(surgeon.SelectionError, match="not a valid regular expression"):
        surgeon.apply(resnet, LinearizeReLU(granularity="layer", targets="(unclosed"))
    with pytest.raises(surgeon.SelectionError, match="left no ReLU call site"):
        surgeon.apply(resnet, LinearizeReLU(granularity="layer", filter_fn=lambda m, n: False))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"granularity": "row"}, r"granularity: 'row' is not one of \['layer', 'channel', 'pixel'\]"),
        ({"granularity": 3}, "granularity: 3 is not one of"),
        ({"init": "one"}, "LinearizeReLU.init: expected float, got str"),
        ({"init": 2.0}, r"init must be in \[0, 1\]"),
        ({"targets": 5}, "LinearizeReLU.targets: expected"),
        ({"leaf_modules": [1]}, r"leaf_modules"),
    ],
)
def test_invalid_config_values(resnet, kwargs, match):
    with pytest.raises(surgeon.ConfigError, match=match):
        surgeon.apply(resnet, LinearizeReLU(**kwargs))
    with pytest.raises(surgeon.ConfigError, match="threshold"):
        surgeon.apply(resnet, FinalizeReLU(threshold=0.0))


def test_pixel_masks_need_a_fixed_input_shape(resnet):
    with pytest.raises(surgeon.ConfigError, match="needs a fixed input shape.*example_inputs"):
        surgeon.apply(resnet, LinearizeReLU(granularity="pixel"))


def test_finalize_before_linearize(resnet):
    with pytest.raises(surgeon.PlanError, match="Apply LinearizeReLU first"):
        surgeon.apply(resnet, FinalizeReLU())


def test_model_without_relu():
    with pytest.raises(surgeon.PlanError, match="found no ReLU call site in Sequential"):
        surgeon.apply(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), LinearizeReLU(granularity="layer"))
