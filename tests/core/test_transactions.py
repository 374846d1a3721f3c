"""Invariant 1: a pass that fails anywhere leaves the model bit-identical (params, buffers, tree, outputs)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import surgeon
import surgeon.passes.relu.handler as relu_pass
from surgeon.passes import FinalizeReLU, LinearizeReLU, masked_units


def state_of(model: nn.Module) -> dict:
    return {
        "tree": [(name, type(m).__name__) for name, m in model.named_modules()],
        "repr": repr(model),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "param_ids": [id(p) for p in model.parameters()],
        "training": [m.training for m in model.modules()],
    }


def assert_same(before: dict, model: nn.Module, x: torch.Tensor, out_before: torch.Tensor) -> None:
    after = state_of(model)
    assert after["tree"] == before["tree"]
    assert after["repr"] == before["repr"]
    assert after["param_ids"] == before["param_ids"]
    assert after["training"] == before["training"]
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    assert torch.equal(model(x), out_before)


class Fault(RuntimeError):
    pass


def _fail_at(monkeypatch, name: str, index: int) -> None:
    real = getattr(relu_pass, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        if calls["n"] == index:
            raise Fault(f"injected at site {index}")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(relu_pass, name, flaky)


@pytest.mark.parametrize("inplace", [True, False])
def test_fault_at_every_site_index_rolls_back(resnet, images, monkeypatch, inplace):
    x = torch.randn(3, 3, 12, 12)
    out = resnet(x)
    before = state_of(resnet)
    for index in range(11):
        with monkeypatch.context() as mp:
            _fail_at(mp, "rewrite_site", index)
            with pytest.raises(surgeon.RewriteError, match=f"injected at site {index}"):
                surgeon.apply(resnet, LinearizeReLU(granularity="channel"), example_inputs=(images,),
                              inplace=inplace)
        assert_same(before, resnet, x, out)
    # and the same model still rewrites fine afterwards
    s = surgeon.apply(resnet, LinearizeReLU(granularity="channel"), example_inputs=(images,), inplace=inplace)
    assert torch.equal(s.model(x), out)


def test_fault_during_finalize_rolls_back_the_masked_model(resnet, images, monkeypatch):
    s = surgeon.apply(resnet, LinearizeReLU(granularity="channel"), example_inputs=(images,))
    with torch.no_grad():
        units = masked_units(s.model)
        units["stem.2"].mask.zero_()
        units["head.relu6"].mask[::2] = 0.0
    x = torch.randn(3, 3, 12, 12)
    out = s.model(x)
    before = state_of(s.model)
    code = s.model.code
    for index in range(11):
        with monkeypatch.context() as mp:
            _fail_at(mp, "finalize_site", index)
            with pytest.raises(surgeon.RewriteError):
                surgeon.apply(s, FinalizeReLU(), inplace=True)
        assert s.model.code == code
        assert_same(before, s.model, x, out)


def test_second_pass_failure_undoes_the_first(resnet, images, monkeypatch):
    """Several passes in one call form one transaction."""
    x = torch.randn(2, 3, 12, 12)
    out = resnet(x)
    before = state_of(resnet)
    with monkeypatch.context() as mp:
        _fail_at(mp, "finalize_site", 3)
        with pytest.raises(surgeon.RewriteError):
            surgeon.apply(resnet, LinearizeReLU(granularity="layer"), FinalizeReLU(), inplace=True)
    assert_same(before, resnet, x, out)


def test_copy_mode_never_touches_the_users_model(resnet, images):
    reference = copy.deepcopy(resnet)
    s = surgeon.apply(resnet, LinearizeReLU(granularity="pixel"), example_inputs=(images,))
    with torch.no_grad():
        for p in s.model.parameters():
            p.add_(1.0)
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(resnet(x), reference(x))
    assert repr(resnet) == repr(reference)
