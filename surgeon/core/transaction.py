"""Transactional rewrites: snapshot a model, roll it back bit-identically if a rewrite fails.

The snapshot records, for every module, its attribute dict (children, parameters, buffers, hooks,
flags) and a copy of every tensor's value; FX graphs and model configs (Hugging Face ``config``) are
deep-copied.
``rollback()`` puts all of it back, so parameters, buffers, the module tree and outputs are as before.

Example:
    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(2, 2))
    >>> with Transaction(m):
    ...     pass                       # a rewrite that succeeds keeps its changes
    >>> try:
    ...     with Transaction(m):
    ...         m[0] = nn.Identity(); raise RuntimeError("boom")
    ... except RuntimeError:
    ...     pass
    >>> type(m[0]).__name__
    'Linear'
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

_DICT_ATTRS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set",
               "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
               "_load_state_dict_pre_hooks")


class ModelSnapshot:
    """Everything needed to restore ``model`` exactly."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
        self.values: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        self.configs: list[tuple[Any, dict[str, Any]]] = []
        self.graphs: list[tuple[fx.GraphModule, fx.Graph]] = []
        seen_tensors: set[int] = set()
        seen_configs: set[int] = set()
        for module in model.modules():
            attrs = dict(module.__dict__)
            inner = {k: copy.copy(attrs[k]) for k in _DICT_ATTRS if k in attrs}
            self.modules.append((module, attrs, inner))
            if isinstance(module, fx.GraphModule):  # graphs are edited in place: keep a copy
                self.graphs.append((module, copy.deepcopy(module.graph)))
            for t in list(module._parameters.values()) + list(module._buffers.values()):
                if t is not None and id(t) not in seen_tensors:
                    seen_tensors.add(id(t))
                    self.values.append((t, t.detach().clone(), t.requires_grad))
            config = attrs.get("config")
            if config is not None and hasattr(config, "__dict__") and id(config) not in seen_configs:
                seen_configs.add(id(config))
                self.configs.append((config, copy.deepcopy(config.__dict__)))

    def rollback(self) -> None:
        """Restore module attributes, the module tree, tensor values and configs."""
        for module, attrs, inner in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for key, value in inner.items():
                container = module.__dict__[key]
                container.clear()
                container.update(value)
        with torch.no_grad():
            for tensor, value, requires_grad in self.values:
                if tensor.shape != value.shape or tensor.dtype != value.dtype:
                    tensor.data = value
                elif not torch.equal(tensor, value):
                    tensor.copy_(value)
                tensor.requires_grad_(requires_grad)
        for config, state in self.configs:
            config.__dict__.clear()
            config.__dict__.update(state)
        for gm, graph in self.graphs:
            gm.graph = copy.deepcopy(graph)
            gm.recompile()


class Transaction:
    """Context manager: on an exception inside the block, roll the model back and re-raise."""

    def __init__(self, model: nn.Module) -> None:
        self.snapshot = ModelSnapshot(model)

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc_type is not None:
            self.snapshot.rollback()
        return False
