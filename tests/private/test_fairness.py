"""group_accuracy and the differentiable group-gap penalty on an imbalanced split."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.core.errors import ConfigError
from surgeon.passes import BudgetSearchConfig, LinearizeReLU, search_relu_budget, select_top_k
from surgeon.passes.relu.budget import finetune, relu_units, _teacher_of
from surgeon.core.report import group_accuracy


def _blobs(seed, n_major=300, n_minor=12):
    """Two-feature 3-class problem; class 2 is rare in training, balanced in test."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.8], [-1.0, -1.8]])

    def draw(counts):
        xs, ys = [], []
        for c, n in enumerate(counts):
            r = torch.rand(n, generator=g) * 2.2
            a = torch.rand(n, generator=g) * 6.283
            xs.append(centers[c] + torch.stack([r * a.cos(), r * a.sin()], 1))
            ys.append(torch.full((n,), c))
        return torch.cat(xs), torch.cat(ys)

    return draw([n_major, n_major, n_minor]), draw([200, 200, 200])


def test_group_accuracy_and_bad_groups():
    x = torch.eye(3)
    y = torch.tensor([0, 1, 1])
    r = group_accuracy(nn.Identity(), (x, y))
    assert [row["accuracy"] for row in r.rows] == [1.0, 0.5] and r.summary["gap"] == 0.5
    with pytest.raises(ConfigError, match="one group id per sample"):
        group_accuracy(nn.Identity(), (x, y), groups=torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="returned"):
        group_accuracy(nn.Identity(), (x, y), groups=lambda a, b: torch.zeros(5))


def test_group_penalty_shrinks_worst_group_gap():
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = _blobs(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(300):
        loss = nn.functional.cross_entropy(net(xtr), ytr)
        opt.zero_grad(); loss.backward(); opt.step()
    s = surgeon.apply(net, LinearizeReLU(granularity="channel"), example_inputs=xtr[:2])
    select_top_k(s.model, 6)  # keep 6 of 64 ReLUs: a heavily linearized student
    for u in relu_units(s.model).values():
        u.mask.requires_grad_(False)
    teacher = _teacher_of(s.model)
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(1))
    data = [(xtr[perm[i:i + 64]], ytr[perm[i:i + 64]]) for i in range(0, len(ytr), 64)]
    gaps = {}
    for penalty in (False, True):
        student = copy.deepcopy(s.model)
        cfg = BudgetSearchConfig(finetune_epochs=30, finetune_lr=1e-2, group_penalty=penalty, group_mu=0.2, kd_alpha=0.5)
        finetune(student, teacher, data, cfg, groups="labels")
        rep = group_accuracy(student, (xte, yte))
        gaps[penalty] = (rep.summary["gap"], rep.summary["worst_accuracy"])
        print("penalty" if penalty else "plain", gaps[penalty], rep.summary["accuracy"])
    assert gaps[True][0] < gaps[False][0], gaps
    assert gaps[True][1] > gaps[False][1], gaps
