"""Distillation of linearized models: attention transfer (stage 1), then LoRA + knowledge distillation (stage 2).

``surgeon.distill(model, data=..., config=surgeon.DistillConfig(...))`` and ``surgeon.evaluate(...)``;
the training loop runs on ``accelerate`` and LoRA comes from ``peft`` (both imported on first use of
this package). See ``surgeon.distill.api`` and ``surgeon.distill.config``.
"""
from surgeon.distill.api import DistillResult, distill
from surgeon.distill.config import DistillConfig
from surgeon.distill.data import pack, pydoc_texts, teacher_texts, topic_split
from surgeon.distill.engine import DistillError
from surgeon.distill.evaluate import EvalResult, evaluate
from surgeon.distill.transfer import original_attention, restore_softmax

__all__ = ["distill", "DistillConfig", "DistillResult", "DistillError", "evaluate", "EvalResult", "pack",
           "pydoc_texts", "teacher_texts", "topic_split", "original_attention", "restore_softmax"]


class _CallablePackage(__import__("types").ModuleType):
    """``surgeon.distill`` is this package *and* the function: calling the package runs ``distill``."""

    def __call__(self, *args, **kwargs):
        return distill(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallablePackage
