"""Choose sites by exact name, suffix, regex or ``filter_fn(module, fqn)`` (peft / torchao style).

* ``targets=None`` selects every candidate site.
* A **list** of strings selects a site when an entry equals its name or its base (the module whose
  calls it groups), or is a dotted suffix of either (``"relu"`` matches ``"layer1.0.relu"``).
* A single **string** is a regular expression that must fully match the name or the base.
* ``exclude`` uses the same rules to drop sites; ``filter_fn(module, fqn)`` has the last word.

Example:
    >>> from surgeon.core.sites import Site
    >>> sites = [Site("a.relu", "a.relu", "fx", "relu"), Site("b.relu6", "b.relu6", "fx", "relu6")]
    >>> [s.name for s in select_sites(sites, targets=["b.relu6"])]
    ['b.relu6']
    >>> [s.name for s in select_sites(sites, targets=r"a\\..*")]
    ['a.relu']
"""
from __future__ import annotations

import difflib
import re
from typing import Callable, Sequence

import torch.nn as nn

from surgeon.core.errors import SelectionError
from surgeon.core.sites import Site

Targets = str | Sequence[str] | None
FilterFn = Callable[[nn.Module | None, str], bool]


def _matches_entry(site: Site, entry: str) -> bool:
    for name in (site.name, site.base):
        if name == entry or name.endswith("." + entry):
            return True
    return False


def _matches(site: Site, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return bool(pattern.fullmatch(site.name) or pattern.fullmatch(site.base))
    return any(_matches_entry(site, t) for t in targets)


def _describe(sites: Sequence[Site], limit: int = 40) -> str:
    names = [s.name for s in sites]
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"[{shown}{more}]"


def select_sites(
    sites: Sequence[Site],
    targets: Targets = None,
    exclude: Targets = None,
    filter_fn: FilterFn | None = None,
    resolve_module: Callable[[Site], nn.Module | None] | None = None,
    what: str = "site",
) -> list[Site]:
    """Return the candidate ``sites`` chosen by the selectors; raise if a selector matches nothing."""
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise SelectionError(f"targets={targets!r} is not a valid regular expression: {e}") from e
    chosen = list(sites)
    if targets is not None:
        if not isinstance(targets, str):
            missing = [t for t in targets if not any(_matches_entry(s, t) for s in sites)]
            if missing:
                close = sorted({m for t in missing for m in difflib.get_close_matches(t, [s.name for s in sites], 3)})
                hint = f" Did you mean {close}?" if close else ""
                raise SelectionError(
                    f"target(s) {missing} matched no {what}.{hint} The {len(sites)} {what}s that exist are "
                    f"{_describe(sites)}."
                )
        chosen = [s for s in chosen if _matches(s, targets)]
        if not chosen:
            raise SelectionError(
                f"targets={targets!r} matched no {what}. The {len(sites)} {what}s that exist are {_describe(sites)}."
            )
    if exclude is not None:
        chosen = [s for s in chosen if not _matches(s, exclude)]
    if filter_fn is not None:
        chosen = [s for s in chosen if filter_fn(resolve_module(s) if resolve_module else None, s.name)]
    if not chosen:
        raise SelectionError(
            f"the selectors (targets={targets!r}, exclude={exclude!r}, filter_fn={filter_fn}) left no {what}. "
            f"The {len(sites)} {what}s that exist are {_describe(sites)}."
        )
    return chosen
