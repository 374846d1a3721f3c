"""Dotted-path access to a module tree: read, replace, and find a free attribute name.

Example:
    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> set_submodule(m, "1", nn.Identity()); type(get_submodule(m, "1")).__name__
    'Identity'
    >>> free_attr_name(m, "0")
    '0_1'
"""
from __future__ import annotations

import torch.nn as nn


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` (``""`` is ``root`` itself)."""
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` (replacing what is there)."""
    parent_path, _, leaf = path.rpartition(".")
    setattr(get_submodule(root, parent_path), leaf, module)


def free_attr_name(owner: nn.Module, wanted: str) -> str:
    """``wanted`` if ``owner`` has no attribute of that name, else ``wanted_1``, ``wanted_2``, ..."""
    name, k = wanted, 0
    while hasattr(owner, name):
        k += 1
        name = f"{wanted}_{k}"
    return name
