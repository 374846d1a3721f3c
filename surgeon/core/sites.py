"""`Site`: one place in a model that a pass can rewrite, and `Plan`: the sites a pass will change.

A site is a *call site* for graph passes (one node of an FX graph: a module called twice gives two
sites) or a module for module-swap passes. Sites serialize to JSON so recipes can replay them.

Example:
    >>> s = Site(name="layer1.0.relu@1", base="layer1.0.relu", kind="fx", op="relu", scope="layer1.0")
    >>> Site.from_dict(s.to_dict()) == s
    True
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from surgeon.core.errors import RecipeError


@dataclass
class Site:
    """A rewritable place. ``name`` is unique in the model; ``base`` groups calls of one module."""

    name: str
    base: str
    kind: Literal["fx", "module"]
    op: str
    scope: str = ""
    node: str | None = None
    shape: list[int] | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Site":
        try:
            return cls(**d)
        except TypeError as e:
            raise RecipeError(f"malformed site entry {d!r}: {e}") from e


@dataclass
class Plan:
    """What a pass will do: its sites plus handler-private state (e.g. the traced graph)."""

    sites: list[Site]
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]
