"""Transactional rewrites: snapshot a model, roll it back bit-identically if a rewrite fails.

A snapshot records, for every module, its attribute dict (children, parameters, buffers, hooks,
flags) and, for every tensor, a reference to its storage and its version counter: cheap, no values
copied. Tensor *values* are copied only under the module paths a pass says it changes in place
(``PassHandler.touched``; ``None`` = the whole model, the safe default for third-party passes). FX
graphs and model configs (Hugging Face ``config``) are deep-copied (small). ``rollback()`` puts all
of it back; a tensor changed in place that was not declared is an error naming it, never a silent
partial rollback.

Example:
    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(2, 2))
    >>> with Transaction(m, touched=[]):
    ...     pass                       # a rewrite that succeeds keeps its changes
    >>> try:
    ...     with Transaction(m, touched=[]):
    ...         m[0] = nn.Identity(); raise RuntimeError("boom")
    ... except RuntimeError:
    ...     pass
    >>> type(m[0]).__name__
    'Linear'
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from surgeon.core.errors import RewriteError
from surgeon.core.modules import get_submodule

_DICT_ATTRS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set",
               "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
               "_load_state_dict_pre_hooks")


class ModelSnapshot:
    """Everything needed to restore ``model`` exactly, copying tensor values only under ``touched``."""

    def __init__(self, model: nn.Module, touched: Iterable[str] | None = None) -> None:
        self.model = model
        self.modules: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
        self.tensors: list[tuple[str, torch.Tensor, torch.Tensor, int, bool]] = []  # name, t, alias, version, grad
        self.values: dict[int, torch.Tensor] = {}
        self.configs: list[tuple[Any, dict[str, Any]]] = []
        self.graphs: list[tuple[fx.GraphModule, fx.Graph]] = []
        seen_tensors: set[int] = set()
        seen_configs: set[int] = set()
        for prefix, module in model.named_modules(remove_duplicate=True):
            attrs = dict(module.__dict__)
            inner = {k: copy.copy(attrs[k]) for k in _DICT_ATTRS if k in attrs}
            self.modules.append((module, attrs, inner))
            if isinstance(module, fx.GraphModule):  # graphs are edited in place: keep a copy
                self.graphs.append((module, copy.deepcopy(module.graph)))
            for key, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is not None and id(t) not in seen_tensors:
                    seen_tensors.add(id(t))
                    alias = t.detach()  # the same storage and version counter, not a copy
                    self.tensors.append((f"{prefix}.{key}".lstrip("."), t, alias, alias._version, t.requires_grad))
            config = attrs.get("config")
            if config is not None and hasattr(config, "__dict__") and id(config) not in seen_configs:
                seen_configs.add(id(config))
                self.configs.append((config, copy.deepcopy(config.__dict__)))
        self.copy_values(touched)

    def copy_values(self, touched: Iterable[str] | None) -> None:
        """Copy the values of the tensors under the module paths ``touched`` (``None``: every tensor)."""
        if touched is None:
            wanted = None
        else:
            wanted = set()
            for path in touched:
                for t in get_submodule(self.model, path).state_dict(keep_vars=True).values():
                    wanted.add(id(t))
        for _, t, alias, _, _ in self.tensors:
            if (wanted is None or id(t) in wanted) and id(t) not in self.values:
                self.values[id(t)] = alias.clone()

    @property
    def copied_bytes(self) -> int:
        """Bytes of tensor values this snapshot holds."""
        return sum(v.numel() * v.element_size() for v in self.values.values())

    def rollback(self) -> None:
        """Restore module attributes, the module tree, tensor values and configs."""
        for module, attrs, inner in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for key, value in inner.items():
                container = module.__dict__[key]
                container.clear()
                container.update(value)
        lost = []
        with torch.no_grad():
            for name, tensor, alias, version, requires_grad in self.tensors:
                saved = self.values.get(id(tensor))
                if tensor.data_ptr() != alias.data_ptr() or tensor.shape != alias.shape or tensor.dtype != alias.dtype:
                    tensor.data = alias  # ``.data =`` swapped the storage: the old one is intact
                if saved is not None:
                    if not torch.equal(tensor, saved):
                        tensor.copy_(saved)
                elif alias._version != version:
                    lost.append(name)
                tensor.requires_grad_(requires_grad)
        for config, state in self.configs:
            config.__dict__.clear()
            config.__dict__.update(state)
        for gm, graph in self.graphs:
            gm.graph = copy.deepcopy(graph)
            gm.recompile()
        if lost:
            raise RewriteError(
                f"rollback could not restore {lost[:8]}{' ...' if len(lost) > 8 else ''}: the pass changed them in "
                "place without declaring their modules in PassHandler.touched(); the model is NOT as it was")


class Transaction:
    """Context manager: on an exception inside the block, roll the model back and re-raise."""

    def __init__(self, model: nn.Module, touched: Iterable[str] | None = None) -> None:
        self.snapshot = ModelSnapshot(model, touched)

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc_type is not None:
            self.snapshot.rollback()
        return False
