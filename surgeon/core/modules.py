"""Dotted-path access to a module tree: read, replace, and find a free attribute name.

Example:
    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> set_submodule(m, "1", nn.Identity()); type(get_submodule(m, "1")).__name__
    'Identity'
    >>> free_attr_name(m, "0")
    '0_1'
    >>> with eval_mode(m): m.training
    False
    >>> m.training
    True
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` (``""`` is ``root`` itself)."""
    return root.get_submodule(path) if path else root


def find_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted ``path``, or None when there is none."""
    try:
        return get_submodule(root, path)
    except AttributeError:
        return None


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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` (every submodule) in eval mode; restore each module's own flag on exit.

    A ``torch.export`` module refuses ``eval()`` (its graph is fixed to one mode already): left as is.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        with contextlib.suppress(NotImplementedError):
            model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
