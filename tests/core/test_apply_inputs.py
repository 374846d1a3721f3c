"""``surgeon.apply`` with example_inputs the model cannot take: a ConfigError naming the module that refused them
and the shape it takes, the model untouched (not shape propagation's RuntimeError)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.core.errors import ConfigError
from surgeon.passes import LinearizeReLU


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).train()


@pytest.mark.parametrize("inputs, message", [
    (torch.randn(2, 5, 8, 8), r"input 0: \(2, 5, 8, 8\) float32\): module '0' \(Conv2d\) expects 3 input channels: "
                              r"\(N, 3, \*, \*\)"),
    (torch.randn(2, 3, 10, 10), r"module '4' \(Linear\) expects a last dimension of 288: \(\.\.\., 288\)"),
    ((torch.randn(2, 3, 8, 8), torch.randn(2)), r"module 'Sequential' \(Sequential\) expects inputs of another shape"),
])
def test_wrongly_shaped_example_inputs_name_the_module_and_leave_the_model_alone(inputs, message):
    net = _net()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ConfigError, match=message) as info:
        surgeon.apply(net, LinearizeReLU(granularity="channel"), example_inputs=inputs)
    assert "the model was not changed" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())     # BatchNorm statistics too
    assert net.training and all(m.training for m in net.modules())
    x = torch.randn(2, 3, 8, 8)                          # the right shape still works
    assert surgeon.apply(net.eval(), LinearizeReLU(granularity="channel"), example_inputs=x).model(x).shape == (2, 4)
