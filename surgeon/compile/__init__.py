"""``surgeon.compile``: a ``torch.compile`` backend that applies surgeon passes to dynamo graphs.

The package is also the function: ``surgeon.compile(model, *passes, ...)`` calls
:func:`surgeon.compile.backend.compile` (the same trick as ``surgeon.distill``).

Example:
    >>> import torch.nn as nn, surgeon
    >>> callable(surgeon.compile) and surgeon.compile.backend.__name__
    'surgeon.compile.backend'
"""
import sys
import types

from surgeon.compile.backend import CompileReport, RecompilationWarning, SurgeonBackend, compile  # noqa: A004

__all__ = ["compile", "SurgeonBackend", "CompileReport", "RecompilationWarning"]


class _CallablePackage(types.ModuleType):
    """``surgeon.compile`` is this package *and* the function: calling it runs ``compile``."""

    def __call__(self, *args, **kwargs):
        return compile(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
