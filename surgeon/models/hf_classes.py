"""Hugging Face classes of a surgered causal LM: the base family's config and model, recipe replayed.

A folder written by :func:`surgeon.export.to_hf` has ``model_type: "surgeon"`` in its
``config.json``, the base family in ``surgeon_base_model_type`` and the surgery in
``surgeon_recipe``. ``Surgeon<Base>ForCausalLM`` subclasses the family's ``*ForCausalLM`` and replays
the recipe in ``__init__`` (the rewrite is deterministic from the recipe; the weights then load over
it). The same classes are written as source files into the folder for ``trust_remote_code=True``;
with ``surgeon`` imported they are registered with ``AutoConfig`` / ``AutoModelForCausalLM`` so no
remote code is needed.

Plain ``save_pretrained`` on a model ``surgeon.apply`` rewrote writes the *original* family's
config: :func:`register` makes it warn that the folder will load as the original model.

Example:
    >>> import torch, transformers, surgeon
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> s = surgeon.apply(transformers.LlamaForCausalLM(cfg).eval(), LinearizeAttention(window=4))
    >>> config_cls, model_cls = classes_for("llama")
    >>> config = config_cls.from_dict({**cfg.to_dict(), "model_type": "surgeon", "surgeon_recipe": s.recipe.to_dict()})
    >>> type(model_cls(config).model.layers[0].self_attn).__name__, config.model_type
    ('LinearAttention', 'surgeon')
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import torch.nn as nn

from surgeon.core.errors import ExportError

MODEL_TYPE = "surgeon"
CONFIG_FILE = "configuration_surgeon.py"
MODELING_FILE = "modeling_surgeon.py"


class SurgeonSaveWarning(UserWarning):
    """``save_pretrained`` on a surgered model writes a folder that loads as the original model."""


# ----------------------------------------------------------------------------- the recipe replay

def replay_recipe(model: nn.Module, recipe: dict[str, Any] | None) -> None:
    """Apply the passes of ``recipe`` to ``model`` in place (the sites the recipe recorded).

    Raises :class:`ExportError` when a pass cannot rewrite a Hugging Face model in place (an FX pass
    turns it into a ``GraphModule``, which a ``*ForCausalLM`` class cannot be).
    """
    import surgeon
    from surgeon.core.recipe import Recipe

    if not recipe:
        raise ExportError(f"{type(model).__name__}: config.surgeon_recipe is empty; write the folder with "
                          "surgeon.export.to_hf(surgery, path)")
    parsed = Recipe.from_dict(recipe)
    configs = [entry.build_config() for entry in parsed.entries]
    # config.layer_types describes the rewritten model's cache; the passes check the original's
    config = getattr(model, "config", None)
    cache_types = config.__dict__.pop("layer_types", None) if config is not None else None
    try:
        surgery = surgeon.apply(model, *configs, inplace=True, recorded=[entry.sites for entry in parsed.entries])
    finally:
        if cache_types is not None:
            config.layer_types = cache_types
    if surgery.model is not model:
        names = [e.pass_name for e in parsed.entries]
        raise ExportError(f"the recipe's passes {names} turn {type(model).__name__} into "
                          f"{type(surgery.model).__name__}: a Hugging Face folder can only replay passes that "
                          "swap modules in place (LinearizeAttention, ...); export this model with "
                          "surgeon.save / surgeon.export.to_onnx instead")


def _family(base_model_type: str) -> tuple[type, type]:
    """The base family's config class and ``*ForCausalLM`` class, from transformers' auto mappings."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config_cls = type(AutoConfig.for_model(base_model_type))
    except ValueError as e:
        raise ExportError(f"transformers has no model type {base_model_type!r} (from "
                          "config.surgeon_base_model_type); upgrade transformers or re-export the folder") from e
    try:
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[config_cls]
    except KeyError as e:
        raise ExportError(f"{config_cls.__name__} has no *ForCausalLM class in transformers; surgeon's Hugging Face "
                          "folders are for causal LMs") from e
    return config_cls, model_cls


def class_prefix(base_model_cls: type) -> str:
    """``LlamaForCausalLM`` -> ``SurgeonLlama`` (prefix of the generated class names)."""
    return "Surgeon" + base_model_cls.__name__.removesuffix("ForCausalLM")


class _SurgeonModelMixin:
    """Behaviour shared by the generated model classes (here and in the folder's modeling file)."""

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        out = super().save_pretrained(save_directory, *args, **kwargs)   # type: ignore[misc]
        write_code_files(Path(save_directory), self._surgeon_base, self.config)
        return out


@functools.cache
def classes_for(base_model_type: str) -> tuple[type, type]:
    """``(Surgeon<Base>Config, Surgeon<Base>ForCausalLM)`` for a family, created once and registered."""
    from transformers import AutoModelForCausalLM

    base_config, base_model = _family(base_model_type)
    prefix = class_prefix(base_model)
    config_cls = type(f"{prefix}Config", (base_config,), {"model_type": MODEL_TYPE, "__module__": __name__})

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        base_model.__init__(self, config, *args, **kwargs)
        replay_recipe(self, getattr(config, "surgeon_recipe", None))

    model_cls = type(f"{prefix}ForCausalLM", (_SurgeonModelMixin, base_model),
                     {"config_class": config_cls, "__init__": __init__, "__module__": __name__,
                      "_surgeon_base": base_model})
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    return config_cls, model_cls


def _dispatch_config() -> type:
    """The config class registered as ``model_type="surgeon"``: builds the family's class from the JSON."""
    from transformers import PreTrainedConfig

    class SurgeonConfig(PreTrainedConfig):
        model_type = MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
            base = config_dict.get("surgeon_base_model_type")
            if not base:
                raise ExportError("config.json has model_type 'surgeon' but no surgeon_base_model_type; "
                                  "re-export the folder with surgeon.export.to_hf")
            return classes_for(base)[0].from_dict(config_dict, **kwargs)

    SurgeonConfig.__module__ = __name__
    return SurgeonConfig


# ----------------------------------------------------------------------------- the folder's code files

_CONFIG_SOURCE = '''"""Configuration of a {base_model} rewritten by surgeon (written by surgeon.export.to_hf).

``surgeon_recipe`` records the passes; modeling_surgeon.py replays them. Needs ``pip install surgeon``.
"""
from transformers import {base_config}


class {prefix}Config({base_config}):
    model_type = "{model_type}"
'''

_MODELING_SOURCE = '''"""{base_model} with the surgery in ``config.surgeon_recipe`` replayed (written by surgeon.export.to_hf).

The rewrite is deterministic from the recipe; the weights in this folder then load over it.
Needs surgeon installed (``pip install surgeon``): it holds the rewritten modules.
"""
from transformers import {base_model}

from surgeon.models.hf_classes import code_files_saver, replay_recipe

from .configuration_surgeon import {prefix}Config


class {prefix}ForCausalLM({base_model}):
    config_class = {prefix}Config

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        replay_recipe(self, config.surgeon_recipe)

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        code_files_saver(self, save_directory, {base_model})
        return out
'''


def code_files_saver(model: nn.Module, directory: Any, base_model: type) -> None:
    """``save_pretrained`` of the folder's own class: keep the code files and ``auto_map`` beside the weights."""
    write_code_files(Path(directory), base_model, model.config)


def write_code_files(directory: Path, base_model: type, config: Any) -> None:
    """Write configuration_surgeon.py / modeling_surgeon.py and point ``auto_map`` in config.json at them."""
    prefix = class_prefix(base_model)
    base_config = base_model.config_class.__name__
    fields = {"base_model": base_model.__name__, "base_config": base_config, "prefix": prefix,
              "model_type": MODEL_TYPE}
    (directory / CONFIG_FILE).write_text(_CONFIG_SOURCE.format(**fields))
    (directory / MODELING_FILE).write_text(_MODELING_SOURCE.format(**fields))
    config_json = directory / "config.json"
    if config_json.is_file():
        data = json.loads(config_json.read_text())
        data["auto_map"] = auto_map(base_model)
        config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def auto_map(base_model: type) -> dict[str, str]:
    """``config.auto_map`` of a surgeon folder for a family's ``*ForCausalLM`` class."""
    prefix = class_prefix(base_model)
    return {"AutoConfig": f"{CONFIG_FILE[:-3]}.{prefix}Config",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{prefix}ForCausalLM"}


# ----------------------------------------------------------------------------- registration

def _surgered(model: nn.Module) -> list[str]:
    """Class names of the surgeon modules inside ``model`` (empty when surgeon never touched it)."""
    return sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("surgeon.")})


def _warning_save_pretrained(original: Any) -> Any:
    @functools.wraps(original)
    def save_pretrained(self: Any, *args: Any, **kwargs: Any) -> Any:
        found = _surgered(self) if not type(self).__name__.startswith("Surgeon") else []
        if found:
            warnings.warn(
                f"{type(self).__name__}.save_pretrained: this model holds surgeon modules ({', '.join(found)}) "
                f"that {type(self).__name__}.from_pretrained will not rebuild: the folder loads as the original "
                "model (transformers lists the extra weights as unexpected). Write a folder that loads the "
                "rewritten model with surgeon.export.to_hf(surgery, path)", SurgeonSaveWarning, stacklevel=2)
        return original(self, *args, **kwargs)

    save_pretrained._surgeon_warns = True   # type: ignore[attr-defined]
    return save_pretrained


@functools.cache
def register() -> None:
    """Register ``model_type="surgeon"`` with transformers' auto classes; warn on a lossy ``save_pretrained``.

    Called by ``import surgeon``; idempotent.
    """
    from transformers import AutoConfig, PreTrainedModel

    AutoConfig.register(MODEL_TYPE, _dispatch_config(), exist_ok=True)
    if not getattr(PreTrainedModel.save_pretrained, "_surgeon_warns", False):
        PreTrainedModel.save_pretrained = _warning_save_pretrained(PreTrainedModel.save_pretrained)


__all__ = ["MODEL_TYPE", "SurgeonSaveWarning", "classes_for", "register", "replay_recipe", "write_code_files",
           "auto_map", "class_prefix"]
