"""Small models and graph capture helpers for the compile-integration tests (no conftest here)."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgeon.fx.tracing import trace
from surgeon_test_models import Block as BasicBlock  # ResNet block: one self.relu called twice

SOURCES = ("symbolic_trace", "dynamo", "export", "export_decomposed")


class TinyResNet(nn.Module):
    """Stem (conv, bn, ReLU6 module), two blocks, a functional ReLU, pooled linear head."""

    def __init__(self, c: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU6())
        self.layer1 = nn.Sequential(BasicBlock(c), BasicBlock(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        x = F.relu(x - 0.1)
        return self.head(x.mean(dim=(2, 3)))


class Spellings(nn.Module):
    """Every ReLU spelling surgeon knows: functions, methods, in-place forms, clamps, hardtanh."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, c, 1)
        self.act = nn.ReLU(inplace=True)
        self.act6 = nn.ReLU6()
        self.ht = nn.Hardtanh(0.0, 6.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.proj(x))                       # module, in place
        y = F.relu(y - 0.5) + torch.relu(y - 1.0) + (y - 1.5).relu()
        z = y * 1.0
        z.relu_()                                        # method, in place: later reads see it
        z = z + F.relu(y - 2.0, inplace=True)            # functional in place on a temporary
        a = torch.clamp(z - 3.0, min=0) + (z - 2.5).clamp_min(0.0)
        b = F.relu6(z * 2.0) + F.hardtanh(z * 3.0, 0.0, 6.0) + torch.clamp(z * 4.0, 0, 6)
        return self.act6(a + b - 4.0) + self.ht(z * 5.0 - 1.0) + z


class NoReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class BreakBlock(nn.Module):
    """A graph break inside a submodule, between two calls of one ReLU module."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, c)
        self.fc2 = nn.Linear(c, c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.relu(self.fc2(x)) + F.relu(x)


class BreakNet(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(c, c)
        self.block = BreakBlock(c)
        self.out = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(F.relu(self.inp(x))))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic weights and non-trivial BatchNorm statistics; eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * 0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def capture(model: nn.Module, x: torch.Tensor, source: str) -> tuple[fx.GraphModule, tuple]:
    """A graph of ``model`` from ``source`` and the arguments that graph takes."""
    if source == "symbolic_trace":
        return trace(model), (x,)
    if source == "dynamo":
        got: list = []

        def record(gm: fx.GraphModule, example_inputs: list):
            got.append((gm, tuple(example_inputs)))
            return gm.forward

        torch._dynamo.reset()
        torch.compile(model, backend=record, fullgraph=True, dynamic=False)(x)
        torch._dynamo.reset()
        gm, args = got[0]
        # the recorded x is the tensor we passed; everything else is a lifted parameter / buffer
        return gm, args
    ep = torch.export.export(model, (x,))
    if source == "export_decomposed":
        ep = ep.run_decompositions()
    return ep.module(), (x,)
