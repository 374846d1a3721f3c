"""A standard Hugging Face folder for a surgered causal LM: ``AutoModelForCausalLM`` loads the rewrite.

:func:`to_hf` writes ``config.json`` (the base family's config plus ``model_type: "surgeon"``, the
recipe, ``auto_map`` and, where the family leaves them free, ``layer_types`` / ``sliding_window``
so ``DynamicCache(config=...)`` builds the linear layers' cache from the config alone),
``configuration_surgeon.py`` / ``modeling_surgeon.py`` (the classes that replay the recipe), the
weights (``model.safetensors``) and the tokenizer. The folder is written beside its destination,
loaded back and compared with the model, then renamed into place: nothing is half-written.

Example:
    >>> import torch, transformers, surgeon, surgeon.export
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> s = surgeon.apply(transformers.LlamaForCausalLM(cfg).eval(), LinearizeAttention(window=4))
    >>> path = surgeon.export.to_hf(s, "/tmp/doc_hf", overwrite=True)
    >>> lm = transformers.AutoModelForCausalLM.from_pretrained(path)
    >>> type(lm).__name__, type(lm.model.layers[0].self_attn).__name__, lm.config.layer_types
    ('SurgeonLlamaForCausalLM', 'LinearAttention', ['hybrid_sliding', 'hybrid_sliding'])
    >>> ids = torch.tensor([[1, 2, 3, 4, 5]])
    >>> torch.equal(lm(ids).logits, s.model(ids).logits)
    True
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgeon.core.errors import ExportError
from surgeon.models.hf_classes import MODEL_TYPE, SurgeonSaveWarning, auto_map, classes_for, write_code_files

#: config keys that identify the architecture (a folder holding another model is not overwritten)
_ARCH_KEYS = ("surgeon_base_model_type", "vocab_size", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "intermediate_size")


def _recipe_of(surgery: Any, recipe: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(model, recipe dict) from a ``Surgery`` or a model plus its recipe."""
    from surgeon.core.apply import Surgery

    model = surgery.model if isinstance(surgery, Surgery) else surgery
    recipe = recipe if recipe is not None else getattr(surgery, "recipe", None) if isinstance(surgery, Surgery) else None
    if recipe is None:
        raise ExportError(f"to_hf needs the surgery's recipe: pass the Surgery that surgeon.apply returned, or "
                          f"to_hf({type(model).__name__}, path, recipe=surgeon.load_recipe(saved_dir))")
    from surgeon.core.persist import live_recipe
    from surgeon.core.recipe import Recipe

    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(dict(recipe))
    recipe = live_recipe(model, recipe).to_dict()     # settings changed after apply (set_memory) included
    if not recipe.get("passes"):
        raise ExportError("the recipe has no passes: save an unmodified model with its own save_pretrained")
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not hasattr(model, "generate"):
        raise ExportError(f"to_hf writes Hugging Face causal-LM folders; {type(model).__name__} is not a "
                          "transformers *ForCausalLM model (FX passes turn models into GraphModules): save it "
                          "with surgeon.save or export it with surgeon.export.to_onnx")
    return model, recipe


def cache_layer_types(model: nn.Module) -> tuple[list[str], int] | None:
    """``(layer_types, sliding_window)`` for ``DynamicCache(config=...)``, or None when they cannot be set.

    Linear layers become ``"hybrid_sliding"`` (transformers' linear + sliding-window cache layer, which
    also counts tokens), softmax layers ``"full_attention"``. None when the family uses ``layer_types``
    or ``sliding_window`` itself (Qwen2, Mistral, Gemma: its masks depend on them) or the linear layers'
    windows differ; the surgeon modules then install their cache layers on first use, as before.
    """
    from surgeon.passes.attention.module import LinearAttention

    config = model.config
    units = {m.layer_idx: m for m in model.modules() if isinstance(m, LinearAttention) and m.is_causal}
    if not units or getattr(config, "layer_types", None) is not None or getattr(config, "sliding_window", None):
        return None
    windows = {max(u.window, 2) for u in units.values()}
    if len(windows) != 1:
        return None
    n = config.num_hidden_layers
    return ["hybrid_sliding" if i in units else "full_attention" for i in range(n)], windows.pop()


def hf_config_dict(model: nn.Module, recipe: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` content of a surgeon folder for ``model``."""
    config = model.config
    data = config.to_dict()
    base_type = data.get("surgeon_base_model_type") or config.model_type
    classes_for(base_type)   # fails early for a family without a *ForCausalLM class
    data.update(model_type=MODEL_TYPE, surgeon_base_model_type=base_type, surgeon_recipe=recipe,
                auto_map=auto_map(_base_class(model)))
    data["architectures"] = [f"{auto_map(_base_class(model))['AutoModelForCausalLM'].split('.')[1]}"]
    types = cache_layer_types(model)
    if types is not None:
        data["layer_types"], data["sliding_window"] = types
    return data


def _base_class(model: nn.Module) -> type:
    return getattr(type(model), "_surgeon_base", None) or next(
        c for c in type(model).__mro__ if c.__name__.endswith("ForCausalLM") and not c.__name__.startswith("Surgeon"))


def _check_destination(path: Path, data: dict[str, Any], overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise ExportError(f"{path} exists and is a file; to_hf writes a folder: choose another path")
    if not path.is_dir() or not any(path.iterdir()) or overwrite:
        return
    old_config = path / "config.json"
    old = json.loads(old_config.read_text()) if old_config.is_file() else None
    if old is None or old.get("model_type") != MODEL_TYPE:
        raise ExportError(f"{path} already holds other files ({'a ' + str(old.get('model_type')) + ' model' if old else 'no config.json'}); "
                          "choose an empty folder or pass overwrite=True to replace it")
    if any(old.get(k) != data.get(k) for k in _ARCH_KEYS):
        diff = {k: (old.get(k), data.get(k)) for k in _ARCH_KEYS if old.get(k) != data.get(k)}
        raise ExportError(f"{path} already holds a surgeon folder of another model (old, new: {diff}); "
                          "pass overwrite=True to replace it or choose another folder")


@contextlib.contextmanager
def _quiet_transformers() -> Any:
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SurgeonSaveWarning)
            yield
    finally:
        logger.setLevel(level)


def _check_loads(staging: Path, model: nn.Module) -> None:
    """Load the staged folder with the registered classes and compare logits with ``model``."""
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        loaded, info = AutoModelForCausalLM.from_pretrained(staging, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ExportError(f"the folder does not load back into the rewritten model: {problems}; the recipe's "
                          "passes do not replay to the same modules (was the model changed after surgeon.apply?)")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, check_length(model)), generator=torch.Generator().manual_seed(0))
    param = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(ids.to(param.device)).logits.float().cpu()
            got = loaded.to(param.device).eval()(ids.to(param.device)).logits.float().cpu()
    finally:
        model.train(was)
    err = (want - got).abs().max().item()
    if err > 1e-5 * max(want.abs().max().item(), 1.0):
        raise ExportError(f"the folder loads a model whose logits differ from the rewritten model's by {err:.3g}; "
                          "the recipe does not replay this model (state outside the recipe?)")


def check_length(model: nn.Module) -> int:
    """Prompt length that reaches every part of the rewritten attention: the linear branch, the sinks and the
    memory slots (the longest window + sinks + slots of any layer, + 64 tokens), within the model's positions."""
    from surgeon.passes.attention.module import LinearAttention

    reach = max((u.window + u.sinks + u.memory for u in model.modules() if isinstance(u, LinearAttention)), default=0)
    limit = getattr(model.config, "max_position_embeddings", None) or 2**31
    return max(11, min(reach + 64, limit))


def to_hf(surgery: Any, path: str | Path, tokenizer: Any = None, *, recipe: Any = None, overwrite: bool = False,
          verify: bool = True, max_shard_size: str = "5GB") -> Path:
    """Write a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads as the rewritten model.

    ``surgery``: what ``surgeon.apply`` returned (or a model, with ``recipe=``). ``tokenizer`` is saved
    beside it when given. ``verify`` loads the folder back and compares logits (at :func:`check_length` tokens:
    the linear branch, sinks and memory slots all in use) before it is moved into place. A folder that holds another model is refused unless ``overwrite=True``.
    """
    model, recipe_dict = _recipe_of(surgery, recipe)
    path = Path(path)
    data = hf_config_dict(model, recipe_dict)
    _check_destination(path, data, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with _quiet_transformers():
            model.save_pretrained(staging, max_shard_size=max_shard_size)
        (staging / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        write_code_files(staging, _base_class(model), model.config)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if verify:
            _check_loads(staging, model)
        _move_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _move_into_place(staging: Path, path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    if not path.exists():
        os.replace(staging, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["to_hf", "hf_config_dict", "cache_layer_types"]
