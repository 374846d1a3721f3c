"""TFHE (Concrete ML style) PBS estimate: one lookup per requantization point, none for the final layer."""
from __future__ import annotations

import torch
import torch.nn as nn

from surgeon.costs.fhe import fhe_pbs_estimate


class Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        h = self.act1(self.conv1(x))
        h = self.act2(self.conv2(h) + h)
        return self.fc(h.mean(dim=(2, 3)))


def test_pbs_closed_form_on_other_shapes():
    for size in (6, 7):
        r = fhe_pbs_estimate(Res(), torch.randn(1, 1, size, size), seconds_per_pbs=0.02)
        e = 3 * size * size
        assert r["per_node"] == {"conv1": e, "conv2": e, "add": 3 * e, "mean": 3}   # fc (the output) costs no lookup
        assert r["pbs"] == 5 * e + 3
        assert abs(r["estimated_s"] - 0.02 * r["pbs"]) < 1e-12


def test_relu_masks_do_not_change_the_count():
    import surgeon
    from surgeon.passes import FinalizeReLU, LinearizeReLU

    net, x = Res(), torch.randn(2, 1, 6, 6)
    s = surgeon.apply(net, LinearizeReLU(granularity="pixel"), example_inputs=x)
    for unit in s.model.modules():
        if hasattr(unit, "mask"):
            unit.mask.data.zero_()                  # every ReLU linearized
    f = surgeon.apply(s, FinalizeReLU())
    assert fhe_pbs_estimate(f.model, x[:1])["pbs"] == fhe_pbs_estimate(net, x[:1])["pbs"] == 5 * 108 + 3
