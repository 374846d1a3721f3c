"""surgeon: rewrite a trained PyTorch model into a cheaper one that behaves the same, then prove it.

Example:
    >>> import torch, torch.nn as nn, surgeon
    >>> from surgeon.passes import LinearizeReLU
    >>> s = surgeon.apply(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), LinearizeReLU(granularity="layer"))
    >>> type(s.model).__name__
    'Sequential'
"""
__version__ = "0.1.0"

from surgeon.core.apply import Surgery, apply
import surgeon.compile  # noqa: E402  (the package is callable: surgeon.compile(model, *passes))
from surgeon.compile.backend import CompileReport, RecompilationWarning, SurgeonBackend, backend
from surgeon.core.config import PassConfig
from surgeon.ops.linearizer import Linearizer
from surgeon.core.errors import (
    ConfigError,
    ExportError,
    PlanError,
    RecipeError,
    RestoreError,
    RewriteError,
    SelectionError,
    SurgeonError,
    TraceError,
    VerificationError,
)
from surgeon.core.handler import ModuleSwapHandler, PassContext, PassHandler, register_pass
from surgeon.core.persist import load_recipe, restore, save
from surgeon.core.recipe import Recipe
from surgeon.core.report import Report, ReportGroup
from surgeon.core.sites import Plan, Site

import surgeon.passes  # noqa: E402,F401  (registers the built-in passes)
from surgeon.models.hf_classes import register as _register_hf  # noqa: E402

_register_hf()   # AutoConfig / AutoModelForCausalLM know model_type "surgeon" (folders of surgeon.export.to_hf)

__all__ = [
    "apply", "Surgery", "save", "restore", "load_recipe", "Recipe", "PassConfig", "PassHandler",
    "ModuleSwapHandler", "PassContext", "register_pass", "Site", "Plan", "Report", "ReportGroup",
    "SurgeonError", "ConfigError", "SelectionError", "TraceError", "PlanError", "RewriteError",
    "RecipeError", "RestoreError", "ExportError", "VerificationError", "Linearizer",
    "backend", "compile", "SurgeonBackend", "CompileReport", "RecompilationWarning",
]


def __getattr__(name: str):
    """``surgeon.export`` is imported on first use (it pulls in onnx and onnxruntime)."""
    if name == "export":
        import importlib

        return importlib.import_module("surgeon.export")
    if name in ("distill", "DistillConfig", "DistillResult", "evaluate", "EvalResult"):
        # imported on first use (accelerate + peft); the package is callable: surgeon.distill(model, ...)
        import importlib

        package = importlib.import_module("surgeon.distill")
        return package if name == "distill" else getattr(package, name)
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
