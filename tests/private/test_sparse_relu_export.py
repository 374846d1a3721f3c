"""Sparse-ReLU ONNX: Relu elements counted from the file equal the budget; ORT parity at new shapes."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.export.sparse_relu import count_relu_elements, to_sparse_onnx
from surgeon.passes import FinalizeReLU, LinearizeReLU, fit_polynomials, select_top_k
from surgeon.passes.relu.budget import relu_units


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.ReLU6()
        self.c3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = self.act(self.c2(x)) + x
        return torch.relu(self.c3(x)).mean(dim=(2, 3))


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("granularity, units", [("pixel", "identity"), ("channel", "identity"), ("pixel", "poly")])
def test_sparse_export_counts_budget_and_matches(tmp_path, granularity, units):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    s = surgeon.apply(Net().eval(), LinearizeReLU(granularity=granularity, units=units), example_inputs=x)
    if units == "poly":
        fit_polynomials(s.model, [torch.randn(8, 3, 6, 6)])
    budget = 150 if granularity == "pixel" else 2 * 36 + 36 + 36 * 3  # three whole channels + partial sites
    g = torch.Generator().manual_seed(3)
    select_top_k(s.model, budget, {n: torch.rand(u.mask.shape, generator=g) for n, u in relu_units(s.model).items()})
    f = surgeon.apply(s, FinalizeReLU())
    dyn = {"x": {0: "batch"}} if granularity == "pixel" else {"x": {0: "batch", 2: "h", 3: "w"}}
    res = to_sparse_onnx(f.model, tmp_path / "m", x, dynamic_axes=dyn)
    assert res.relu_elements == budget == count_relu_elements(tmp_path / "m")
    shapes = [(5, 3, 6, 6), (1, 3, 6, 6)] + ([(3, 3, 9, 7)] if granularity == "channel" else [])
    for shape in shapes:
        xi = torch.randn(*shape)
        with torch.no_grad():
            want = f.model(xi).numpy()
        np.testing.assert_allclose(_ort(res.onnx_path, xi), want, atol=1e-5, rtol=1e-5)
    if granularity == "channel":  # the count is per example whatever the spatial size
        assert count_relu_elements(tmp_path / "m", {"x": [2, 3, 6, 6]}) == budget


def test_dense_masked_export_counts_everything(tmp_path):
    """Contrast: the plain (non-sparse) export of a masked site evaluates Relu on every element."""
    x = torch.randn(2, 3, 6, 6)
    s = surgeon.apply(Net().eval(), LinearizeReLU(granularity="pixel"), example_inputs=x)
    select_top_k(s.model, 100)
    f = surgeon.apply(s, FinalizeReLU())
    res = surgeon.export.to_onnx(f.model, tmp_path / "dense", x)
    assert count_relu_elements(res.onnx_path) > 100
