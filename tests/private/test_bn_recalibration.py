"""BatchNorm after linearization: relative recalibration and frozen-BN search / fine-tuning."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.core.errors import ConfigError
from surgeon.passes import BudgetSearchConfig, LinearizeReLU, search_relu_budget
from surgeon.passes.relu.batchnorm import batchnorms, freeze_batchnorm, recalibrate_batchnorm
from surgeon.passes.relu.budget import relu_units


def _deep_net(seed: int = 0, depth: int = 6) -> nn.Module:
    """conv-BN-ReLU6 stack with running statistics estimated on data, as a pretrained net has them."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    cin = 3
    for _ in range(depth):
        layers += [nn.Conv2d(cin, 12, 3, padding=1), nn.BatchNorm2d(12, momentum=None), nn.ReLU6()]
        cin = 12
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)]
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(1.0, 3.0)  # wide outputs: both clips of ReLU6 are active
        net.train()
        net(torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(1)))
    return net.eval()


def _data(seed: int, n: int = 32, hw: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, hw, hw, generator=torch.Generator().manual_seed(seed))


def _scale(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.detach().std() / b.detach().std())


def test_recalibration_is_exactly_a_noop_on_the_original():
    net = _deep_net()
    s = surgeon.apply(net, LinearizeReLU(granularity="channel"), example_inputs=_data(0)[:2])
    before = copy.deepcopy(s.model.state_dict())
    ratios = recalibrate_batchnorm(s.model, [_data(2)])
    assert set(ratios.values()) == {1.0} and len(ratios) == 6
    after = s.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    x = _data(3, n=5, hw=9)  # another batch and spatial size
    assert torch.equal(s.model(x), net(x))


def test_recalibration_restores_the_scale_on_unseen_inputs():
    net = _deep_net()
    s = surgeon.apply(net, LinearizeReLU(granularity="channel"), example_inputs=_data(0)[:2])
    for u in relu_units(s.model).values():  # remove every ReLU6 but the last site's
        u.mask.data.zero_()
    list(relu_units(s.model).values())[-1].mask.data.fill_(1.0)
    held_out = _data(7, n=24, hw=16)  # never used for calibration; other batch and size
    blown = _scale(s.model(held_out), net(held_out))
    ratios = recalibrate_batchnorm(s.model, [_data(2)], max_samples=32)
    fixed = _scale(s.model(held_out), net(held_out))
    calib = _scale(s.model(_data(2)), net(_data(2)))
    assert blown > 2.0, blown                    # identity units: the output scale runs away (2.5x)
    assert 0.8 < fixed < 1.25, fixed            # recalibrated: the original's scale on new data
    assert 0.9 < calib < 1.1, calib
    assert max(ratios.values()) > 1.5 and ratios["1"] == 1.0  # first BN sees the input: untouched


def test_frozen_bn_mode_keeps_running_statistics_and_recalibrate_runs_in_search():
    net = _deep_net(depth=3)
    data = [(_data(10 + i), None) for i in range(2)]
    stats = {n: m.running_var.clone() for n, m in batchnorms(net).items()}
    moved = {}
    for mode in ("train", "frozen"):
        s = surgeon.apply(net, LinearizeReLU(granularity="channel", budget=0.3), example_inputs=data[0][0][:2])
        cfg = BudgetSearchConfig(epochs=1, finetune_epochs=1, bn_mode=mode, kd_alpha=1.0)
        search_relu_budget(s, data, method="autorep", config=cfg)
        moved[mode] = any(not torch.equal(m.running_var, stats[n]) for n, m in batchnorms(s.model).items())
    assert moved == {"train": True, "frozen": False}
    s = surgeon.apply(net, LinearizeReLU(granularity="channel", budget=0.3), example_inputs=data[0][0][:2])
    r = search_relu_budget(s, data, method="calibration",
                           config=BudgetSearchConfig(finetune_epochs=1, bn_mode="frozen", recalibrate_bn=True))
    rows = [h for h in r.history if h["phase"] == "recalibrate_bn"]
    assert len(rows) == 1 and rows[0]["max_std_ratio"] > 1.0
    assert r.kept == r.budget


def test_freeze_batchnorm_counts_and_sets_eval():
    net = _deep_net(depth=2).train()
    assert freeze_batchnorm(net) == 2
    assert all(not m.training for m in batchnorms(net).values()) and net[0].training


def test_bad_bn_options_leave_the_model_untouched():
    net = _deep_net(depth=2)
    data = [(_data(4), None)]
    s = surgeon.apply(net, LinearizeReLU(granularity="channel", budget=0.5), example_inputs=data[0][0][:2])
    before = copy.deepcopy(s.model.state_dict())
    with pytest.raises(ConfigError, match="bn_mode"):
        search_relu_budget(s, data, config=BudgetSearchConfig(bn_mode="eval"))
    with pytest.raises(ConfigError, match="teacher lacks"):
        search_relu_budget(s, data, teacher=nn.Sequential(nn.Flatten(), nn.LazyLinear(5)),
                           config=BudgetSearchConfig(recalibrate_bn=True))
    assert all(torch.equal(before[k], v) for k, v in s.model.state_dict().items())
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    p = surgeon.apply(plain, LinearizeReLU(granularity="channel", budget=0.5), example_inputs=torch.randn(2, 4))
    with pytest.raises(ConfigError, match="none in the model"):
        search_relu_budget(p, [torch.randn(8, 4)], config=BudgetSearchConfig(recalibrate_bn=True))
    with pytest.raises(ConfigError, match="no BatchNorm"):
        recalibrate_batchnorm(p.model, [torch.randn(8, 4)])
    with pytest.raises(ConfigError, match="no MaskedReLU"):
        recalibrate_batchnorm(net, [data[0][0]])


def test_polynomial_units_are_refit_at_the_original_scale():
    """With recalibrate_bn, polynomial units are refit after the BN statistics are corrected: a quadratic fitted
    to run-away activations would compound them (inf / NaN in deep nets)."""
    net = _deep_net(depth=12)
    data = [(_data(20 + i), None) for i in range(2)]
    held_out = _data(30, n=16)  # unseen inputs (a partially kept channel fixes the spatial size)
    scales = {}
    for recal in (False, True):
        s = surgeon.apply(net, LinearizeReLU(granularity="channel", budget=0.05, units="poly"),
                          example_inputs=data[0][0][:2])
        search_relu_budget(s, data, method="calibration",
                           config=BudgetSearchConfig(finetune_epochs=0, bn_mode="frozen", recalibrate_bn=recal))
        with torch.no_grad():
            out = s.model(held_out)
        scales[recal] = _scale(out, net(held_out)) if torch.isfinite(out).all() else float("inf")
    assert scales[False] > 5.0, scales
    assert 0.5 < scales[True] < 2.0, scales
