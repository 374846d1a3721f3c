"""Save a surgery as recipe + safetensors; restore it onto a fresh base model (ModelOpt style).

Example:
    >>> import tempfile, torch, torch.nn as nn, surgeon
    >>> from surgeon.passes import LinearizeReLU
    >>> base = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    >>> s = surgeon.apply(base, LinearizeReLU(granularity="layer"))
    >>> d = tempfile.mkdtemp(); _ = surgeon.save(s, d)
    >>> m = surgeon.restore(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), d)
    >>> x = torch.randn(2, 4); torch.equal(m(x), s.model(x))
    True
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from surgeon.core.apply import Surgery, apply
from surgeon.core.errors import RecipeError, RestoreError
from surgeon.core.handler import handler_for
from surgeon.core.recipe import Recipe, RecipeEntry, first_mismatch, fingerprint, placeholder_inputs

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
REPORT_FILE = "report.json"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def live_recipe(model: nn.Module, recipe: Recipe) -> Recipe:
    """``recipe`` with each pass's config as ``model`` now stands (settings changed after apply, such as
    memory slots from ``set_memory``; see ``PassHandler.live_config``)."""
    entries = []
    for entry in recipe.entries:
        config = entry.build_config()
        live = handler_for(config).live_config(model, config, entry.sites)
        entries.append(entry if live is config else RecipeEntry(entry.pass_name, live.to_dict(), entry.sites))
    return dataclasses.replace(recipe, entries=entries)


def save(surgery: Surgery, directory: str | Path) -> Path:
    """Write ``recipe.json`` (as the live model stands: :func:`live_recipe`), ``model.safetensors`` (with the
    recipe's digest) and ``report.json``."""
    directory = Path(directory)
    text = live_recipe(surgery.model, surgery.recipe).to_json()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RECIPE_FILE).write_text(text)
    save_model(surgery.model, str(directory / WEIGHTS_FILE), metadata={"recipe_sha256": _digest(text)})
    surgery.report.save(directory / REPORT_FILE)
    return directory


def load_recipe(directory: str | Path) -> Recipe:
    """Read and validate a saved recipe; a hand-edit after saving is reported as such."""
    directory = Path(directory)
    path = directory / RECIPE_FILE
    if not path.is_file():
        raise RestoreError(f"{path} does not exist: is {directory} a directory written by surgeon.save?")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            saved = (f.metadata() or {}).get("recipe_sha256")
        if saved is not None and saved != _digest(text):
            raise RecipeError(
                f"{path} was changed after it was saved (its sha256 no longer matches the one in {weights.name}); "
                f"the weights belong to the original recipe. Re-save the surgery instead of editing the recipe."
            )
    return Recipe.from_dict(data)


def restore(base_model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild the saved surgered model on a copy of ``base_model`` (left untouched); outputs are identical."""
    recipe = load_recipe(directory)
    mismatch = first_mismatch(recipe.base, fingerprint(base_model))
    if mismatch:
        raise RestoreError(f"cannot restore {directory} onto this base model: {mismatch}")
    configs = [entry.build_config() for entry in recipe.entries]
    surgery = apply(base_model, *configs, example_inputs=placeholder_inputs(recipe.example_inputs),
                    recorded=[entry.sites for entry in recipe.entries])
    try:
        load_model(surgery.model, str(Path(directory) / WEIGHTS_FILE), strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else str(e)
        raise RestoreError(f"saved weights do not fit the replayed model: {first.strip()}") from e
    return surgery.model


def recipe_summary(directory: str | Path) -> str:
    """One line per pass of a saved surgery (used by ``surgeon report``)."""
    recipe = load_recipe(directory)
    return "\n".join(f"{e.pass_name}: {len(e.sites)} sites, config {json.dumps(e.config)}" for e in recipe.entries)
