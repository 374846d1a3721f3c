"""Write what each route loads: the Hugging Face folder, the onnxruntime-genai folder, the ONNX export.

Example:
    >>> [r.kind for r in routes_for(["original", "surgered"], original=object(), surgered=object(), work_dir="/tmp")]
    ['memory', 'memory']
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from surgeon.core.errors import ConfigError
from surgeon.eval.routes import Route

ROUTE_NAMES = ("original", "surgered", "hf", "onnx", "onnxruntime")
DEFAULT_ROUTES = ("original", "surgered", "hf", "onnx")


def routes_for(names: Sequence[str], *, surgered: Any, work_dir: str | Path, original: Any = None,
               tokenizer: Any = None, recipe: Any = None, overwrite: bool = True) -> list[Route]:
    """Routes by name, exporting into ``work_dir`` what the file routes load.

    ``surgered``: what ``surgeon.apply`` returned (or the model, with ``recipe=``); ``original``: the
    model before surgery. ``hf``: ``surgeon.export.to_hf`` into
    ``work_dir/hf``. ``onnx``: ``surgeon.export.to_genai(last_logits_only=False)`` into
    ``work_dir/genai`` (lm-eval scores every position of the prompt graph's logits), run by lm-eval's
    ``onnxruntime-genai`` model. ``onnxruntime``: ``surgeon.export.to_onnx`` into ``work_dir/onnx``
    (prefill.onnx takes any prompt length), run by lm-eval's plain ``onnxruntime`` model.
    """
    unknown = [n for n in names if n not in ROUTE_NAMES]
    if unknown:
        raise ConfigError(f"unknown route(s) {unknown}; use any of {', '.join(ROUTE_NAMES)}")
    work = Path(work_dir)
    from surgeon.core.apply import Surgery

    is_surgery = isinstance(surgered, Surgery)               # surgeon.apply's result, or the model itself
    model = surgered.model if is_surgery else surgered
    recipe = recipe if recipe is not None or not is_surgery else surgered.recipe
    routes = []
    for name in names:
        if name == "original":
            if original is None:
                raise ConfigError("route 'original' needs the original model (original=...)")
            routes.append(Route(name, "memory", original))
        elif name == "surgered":
            routes.append(Route(name, "memory", model))
        elif name == "hf":
            import surgeon.export

            path = surgeon.export.to_hf(model, work / "hf", tokenizer, recipe=recipe, overwrite=overwrite)
            routes.append(Route(name, "hf", path))
        elif name == "onnx":
            import surgeon.export

            res = surgeon.export.to_genai(model, work / "genai", tokenizer, last_logits_only=False,
                                          overwrite=overwrite, recipe=_recipe_dict(recipe))
            routes.append(Route(name, "onnxruntime-genai", res.onnx_path.parent))
        else:
            import surgeon.export

            res = surgeon.export.to_onnx(model, work / "onnx", overwrite=overwrite, recipe=_recipe_dict(recipe))
            if tokenizer is not None:
                tokenizer.save_pretrained(res.onnx_path.parent)    # lm-eval loads it from the graph's folder
            routes.append(Route(name, "onnxruntime", res.onnx_path))
    return routes


def _recipe_dict(recipe: Any) -> dict | None:
    if recipe is None or isinstance(recipe, dict):
        return recipe
    return recipe.to_dict() if hasattr(recipe, "to_dict") else None
