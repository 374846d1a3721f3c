"""Recipes: the JSON record of applied passes (config + sites), replayable on a fresh base model.

Example:
    >>> import torch.nn as nn
    >>> r = Recipe(base=fingerprint(nn.Linear(2, 3)))
    >>> Recipe.from_json(r.to_json()).base["class"]
    'Linear'
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from surgeon.core.config import PassConfig
from surgeon.core.errors import RecipeError
from surgeon.core.registry import config_class
from surgeon.core.sites import Site

FORMAT = "surgeon.core.recipe/1"


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Structure of a model: class name and the name, shape and dtype of every state-dict entry."""
    return {
        "class": type(model).__name__,
        "state": [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()],
    }


def first_mismatch(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """Describe the first difference between two fingerprints, or None when they agree."""
    if expected.get("class") != actual.get("class"):
        return f"model class is {actual.get('class')!r}, the recipe was made on {expected.get('class')!r}"
    want = {k: (s, d) for k, s, d in expected.get("state", [])}
    have = {k: (s, d) for k, s, d in actual.get("state", [])}
    for key, (shape, dtype) in want.items():
        if key not in have:
            return f"state entry {key!r} (shape {shape}) is missing from the base model"
        if have[key][0] != shape:
            return f"state entry {key!r} has shape {have[key][0]}, the recipe expects {shape}"
        if have[key][1] != dtype:
            return f"state entry {key!r} has dtype {have[key][1]}, the recipe expects {dtype}"
    extra = [k for k in have if k not in want]
    if extra:
        return f"the base model has state entry {extra[0]!r} that the recipe's base model did not have"
    return None


def describe_inputs(example_inputs: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """Shapes and dtypes of example inputs (so a restore can rebuild placeholders)."""
    if example_inputs is None:
        return None
    out = []
    for x in example_inputs:
        if not isinstance(x, torch.Tensor):
            raise RecipeError(f"example inputs must be tensors to be recorded, got {type(x).__name__}")
        out.append({"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")})
    return out


def placeholder_inputs(spec: list[dict[str, Any]] | None) -> tuple[torch.Tensor, ...] | None:
    """Zero tensors matching ``describe_inputs`` output."""
    if spec is None:
        return None
    try:
        return tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in spec)
    except (KeyError, TypeError, AttributeError) as e:
        raise RecipeError(f"malformed example_inputs entry in recipe: {spec!r} ({e})") from e


@dataclass
class RecipeEntry:
    """One applied pass: its registered name, its JSON config, and the sites it rewrote."""

    pass_name: str
    config: dict[str, Any]
    sites: list[Site]

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "config": self.config, "sites": [s.to_dict() for s in self.sites]}

    @classmethod
    def from_dict(cls, d: Any, index: int) -> "RecipeEntry":
        if not isinstance(d, dict) or not {"pass", "config", "sites"} <= set(d):
            raise RecipeError(f"recipe entry {index} must have keys 'pass', 'config', 'sites'; got {d!r:.200}")
        if not isinstance(d["sites"], list):
            raise RecipeError(f"recipe entry {index} ({d['pass']}): 'sites' must be a list")
        return cls(d["pass"], d["config"], [Site.from_dict(s) for s in d["sites"]])

    def build_config(self) -> PassConfig:
        try:
            return config_class(self.pass_name).from_dict(self.config)
        except RecipeError:
            raise
        except Exception as e:  # ConfigError and friends: say which entry is bad
            raise RecipeError(f"recipe entry {self.pass_name!r} has an invalid config: {e}") from e


@dataclass
class Recipe:
    """Applied passes in order, the base model's fingerprint and the example input shapes."""

    base: dict[str, Any]
    entries: list[RecipeEntry] = field(default_factory=list)
    example_inputs: list[dict[str, Any]] | None = None
    source: dict[str, Any] | None = None  # how to rebuild the base model, e.g. {"model": "efficientnet_lite0"}

    def to_dict(self) -> dict[str, Any]:
        from surgeon import __version__

        return {"format": FORMAT, "surgeon_version": __version__, "base": self.base,
                "example_inputs": self.example_inputs, "source": self.source, "passes": [e.to_dict() for e in self.entries]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Any) -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError(f"a recipe is a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise RecipeError(f"unsupported recipe format {d.get('format')!r}; this surgeon reads {FORMAT!r}")
        for key in ("base", "passes"):
            if key not in d:
                raise RecipeError(f"recipe is missing {key!r}")
        if not isinstance(d["passes"], list):
            raise RecipeError("recipe 'passes' must be a list")
        entries = [RecipeEntry.from_dict(e, i) for i, e in enumerate(d["passes"])]
        return cls(base=d["base"], entries=entries, example_inputs=d.get("example_inputs"), source=d.get("source"))

    @classmethod
    def from_json(cls, text: str, source: str = "recipe") -> "Recipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{source} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
        return cls.from_dict(data)
