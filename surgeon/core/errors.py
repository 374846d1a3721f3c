"""Exceptions raised by surgeon. Every message names the module/node at fault and what to do."""
from __future__ import annotations


class SurgeonError(Exception):
    """Base class of every error surgeon raises on purpose."""


class ConfigError(SurgeonError, ValueError):
    """A pass configuration has an invalid value or type."""


class SelectionError(SurgeonError, LookupError):
    """A site selector matched nothing (the message lists the names that exist)."""


class TraceError(SurgeonError):
    """torch.fx could not trace the model (the message names the module and line)."""


class PlanError(SurgeonError):
    """A pass could not plan its rewrite; the model was not touched."""


class RewriteError(SurgeonError):
    """A rewrite failed part-way; the model was rolled back to its original state."""


class RecipeError(SurgeonError):
    """A recipe is corrupted, hand-edited inconsistently, or refers to unknown passes."""


class RestoreError(SurgeonError):
    """A saved surgery does not fit the base model it is restored onto."""


class ExportError(SurgeonError):
    """ONNX export failed or its destination is unusable."""


class VerificationError(SurgeonError, AssertionError):
    """An exported graph disagrees with PyTorch beyond tolerance (or lost a dynamic dim)."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report
