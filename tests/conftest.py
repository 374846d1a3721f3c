"""Shared fixtures; the models live in ``surgeon_test_models`` (importable by name from every test)."""
from __future__ import annotations

import pytest
import torch

from surgeon_test_models import Block, Head, TinyResNet, other_resnet, randomize_bn, seeded_resnet  # noqa: F401


@pytest.fixture
def resnet() -> TinyResNet:
    return seeded_resnet()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
