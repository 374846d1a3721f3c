"""Unit placement: where each new module of a graph rewrite lives in the GraphModule's tree.

A pass says which path it prefers for a site (the path a recipe recorded, or the replaced module's
own path); every other site gets a free name under its owner module (``scope.relu_1``), never one
another site of the same rewrite took. The chosen path is written to ``site.data["unit"]``, so
recipes record it and replays put weights back at the same state-dict keys.

Example:
    >>> import torch.nn as nn
    >>> from surgeon.core.sites import Site
    >>> root = nn.Module(); root.block = nn.Module(); root.block.act = nn.ReLU()
    >>> sites = [Site("block.relu", "block.relu", "fx", "relu", scope="block"),
    ...          Site("block.relu@1", "block.relu", "fx", "relu", scope="block")]
    >>> place_units(root, sites, owner_and_leaf=lambda s: (s.scope, s.name.rpartition(".")[2].replace("@", "_")))
    >>> [s.data["unit"] for s in sites]
    ['block.relu', 'block.relu_1']
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from surgeon.core.modules import find_submodule, free_attr_name
from surgeon.core.sites import Site

__all__ = ["place_units", "path_is_free"]


def path_is_free(root: nn.Module, path: str) -> bool:
    """No module or attribute at ``path`` in ``root`` yet (a unit can be placed there)."""
    owner: Any = root
    for part in path.split("."):
        if not hasattr(owner, part):
            return True
        owner = getattr(owner, part)
    return False


def place_units(root: nn.Module, sites: list[Site], *,
                owner_and_leaf: Callable[[Site], tuple[str, str]],
                preferred: Callable[[Site, set[str]], str | None] | None = None) -> None:
    """Set ``site.data["unit"]`` for every site: ``preferred(site, taken)`` when it names a path, else
    a free attribute name near ``owner_and_leaf(site)`` = (owner module path, wanted leaf name)."""
    taken: set[str] = set()
    for site in sites:
        path = preferred(site, taken) if preferred is not None else None
        if path is None:
            owner_path, leaf = owner_and_leaf(site)
            owner = find_submodule(root, owner_path)
            candidate = free_attr_name(owner, leaf) if owner is not None else leaf
            while (f"{owner_path}.{candidate}" if owner_path else candidate) in taken:
                candidate = free_attr_name(owner, candidate + "_") if owner is not None else candidate + "_"
            path = f"{owner_path}.{candidate}" if owner_path else candidate
        taken.add(path)
        site.data["unit"] = path
