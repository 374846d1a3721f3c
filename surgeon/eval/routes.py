"""The ways one model reaches lm-evaluation-harness, each through lm-eval's own model classes.

=====================  ===========================================================================
kind                   lm-eval model class
=====================  ===========================================================================
``memory``             ``lm_eval.models.huggingface.HFLM(pretrained=<nn.Module instance>)``
``hf``                 lm-eval's ``hf`` model, ``pretrained=<folder written by surgeon.export.to_hf>``
``onnxruntime-genai``  lm-eval's ``onnxruntime-genai`` model on a ``surgeon.export.to_genai`` folder
``onnxruntime``        lm-eval's ``onnxruntime`` model on ``prefill.onnx`` of ``surgeon.export.to_onnx``
                       (log-likelihood tasks only: lm-eval's class has no generation loop)
=====================  ===========================================================================

The two ONNX kinds use subclasses of lm-eval's classes that only align their context truncation
with ``HFLM``'s (:mod:`surgeon.eval.onnx_models`).

Example:
    >>> Route("surgered", "memory", None).kind
    'memory'
    >>> Route("x", "vllm", None)
    Traceback (most recent call last):
    ...
    surgeon.core.errors.ConfigError: route 'x': unknown kind 'vllm'; use one of memory, hf, onnxruntime-genai, onnxruntime
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgeon.core.errors import ConfigError

KINDS = ("memory", "hf", "onnxruntime-genai", "onnxruntime")
INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'surgeon[clients]' (lm-eval==0.4.13, onnxruntime-genai)"


@dataclass(frozen=True)
class Route:
    """One column of an evaluation: a label, how the model is loaded, and what is loaded."""

    name: str
    kind: str
    target: Any          # an nn.Module (memory) or a path (folder / prefill.onnx)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"route {self.name!r}: unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")

    @property
    def generates(self) -> bool:
        """Whether lm-eval's class for this route runs ``generate_until`` tasks."""
        return self.kind != "onnxruntime"


def require_lm_eval() -> Any:
    """``lm_eval``, offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set unless the caller set them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    return lm_eval


def make_lm(route: Route, tokenizer: Any, max_length: int, batch_size: int = 1) -> Any:
    """The lm-eval model object of ``route`` (CPU, float32)."""
    require_lm_eval()
    from lm_eval.api.registry import get_model

    if route.kind == "memory":
        from lm_eval.models.huggingface import HFLM

        if tokenizer is None:
            raise ConfigError(f"route {route.name!r}: an in-memory model needs a tokenizer")
        return HFLM(pretrained=route.target, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    path = Path(route.target)
    if not path.exists():
        raise ConfigError(f"route {route.name!r}: {path} does not exist; write it first (surgeon.export)")
    if route.kind == "hf":
        return get_model("hf")(pretrained=str(path), dtype="float32", device="cpu", trust_remote_code=True,
                               batch_size=batch_size, max_length=max_length)
    import surgeon.eval.onnx_models  # noqa: F401  (registers the surgeon-onnxruntime* names)

    if route.kind == "onnxruntime":
        path = path / "prefill.onnx" if path.is_dir() else path
        return get_model("surgeon-onnxruntime")(pretrained=str(path), execution_provider="cpu", max_length=max_length)
    return get_model("surgeon-onnxruntime-genai")(pretrained=str(path), execution_provider="cpu",
                                                  max_length=max_length)
