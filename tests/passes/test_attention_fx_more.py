"""FX attention: masks from the scores' own shape, torch.export capture, what is left listed, clean re-traceable graphs."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.core.errors import PlanError
from surgeon.passes import LinearizeAttention


class _Heads(nn.Module):
    def __init__(self, d: int = 32, h: int = 4) -> None:
        super().__init__()
        self.h, self.qkv, self.o = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def split(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, -1)   # unpacked: symbolic_trace cannot iterate a proxy in a loop
        return (q.view(B, T, self.h, C // self.h).transpose(1, 2), k.view(B, T, self.h, C // self.h).transpose(1, 2),
                v.view(B, T, self.h, C // self.h).transpose(1, 2))

    def merge(self, y, x):
        return self.o(y.transpose(1, 2).reshape(x.shape))


class OnesLikeMask(_Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones_like(scores).triu(1).bool(), float("-inf"))
        return self.merge(torch.softmax(scores, -1) @ v, x)


class ArangeMask(_Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        i = torch.arange(x.shape[1], device=x.device)
        scores = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).masked_fill(i[None, :] > i[:, None], float("-inf"))
        return self.merge(scores.softmax(-1) @ v, x)


class TracedSizeMask(_Heads):  # torch.ones(t, t) with a traced size: symbolic_trace cannot follow it
    def forward(self, x):
        q, k, v = self.split(x)
        t = x.size(1)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(torch.ones(t, t).tril() == 0, float("-inf"))
        return self.merge(torch.softmax(scores, -1) @ v, x)


class AdditiveBuffer(_Heads):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.triu(torch.full((64, 64), float("-inf")), 1))

    def forward(self, x):
        q, k, v = self.split(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(8) + self.bias[:x.shape[1], :x.shape[1]]
        return self.merge(torch.softmax(scores, -1) @ v, x)


def _matmuls(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op != "call_module" and "matmul" in str(n.target)
               or "bmm" in str(n.target))


@pytest.mark.parametrize("cls", [OnesLikeMask, ArangeMask, TracedSizeMask, AdditiveBuffer], ids=lambda c: c.__name__)
def test_causal_masks_are_read_and_the_graph_is_clean_and_traceable(cls):
    torch.manual_seed(0)
    model = cls().eval()
    s = surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=64), example_inputs=(torch.randn(2, 12, 32),))
    rows = s.report["LinearizeAttention"].rows
    assert [r["causal"] for r in rows] == [True]
    x = torch.randn(3, 20, 32)                         # another batch and length than the example
    with torch.no_grad():
        ref, got = model(x), s.model(x)
        again = torch.fx.symbolic_trace(s.model)       # the rewritten graph traces again …
        assert (again(x) - got).abs().max() == 0       # … to the same function
    assert (got - ref).abs().max() <= 2e-5
    assert _matmuls(s.model) == 0                      # no q @ kᵀ left behind
    captured = any("torch.export" in n for n in s.report["LinearizeAttention"].notes)
    assert captured == (cls is TracedSizeMask)


class Mixed(_Heads):
    def forward(self, x):
        q, k, v = self.split(x)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1) @ v
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1)   # weights returned: not rewritable
        return self.merge(a + w @ v, x), w, torch.softmax(x, dim=1)     # a softmax that is no attention


def test_every_softmax_left_in_the_graph_is_listed_with_its_reason():
    torch.manual_seed(0)
    s = surgeon.apply(Mixed().eval(), LinearizeAttention(feature_map="elu1", window=0),
                      example_inputs=(torch.randn(2, 12, 32),))
    note = next(n for n in s.report["LinearizeAttention"].notes if "left as they are" in n)
    assert "softmax_1: the attention weights" in note and "softmax_2: not of the form" in note
    assert len(s.report["LinearizeAttention"].rows) == 1


def test_strict_makes_a_left_softmax_an_error():
    if "strict" not in {f.name for f in dataclasses.fields(LinearizeAttention)}:
        pytest.skip("LinearizeAttention has no strict field yet")
    with pytest.raises(PlanError, match="softmax_2"):
        surgeon.apply(Mixed().eval(), LinearizeAttention(feature_map="elu1", window=0, strict=True),
                      example_inputs=(torch.randn(2, 12, 32),))
