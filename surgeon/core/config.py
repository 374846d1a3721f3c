"""Pass configurations: dataclasses that validate their fields and round-trip to JSON.

A pass *is* its config (torchao style). Subclasses are ``@dataclass(kw_only=True)`` with defaults
for every field; fields whose type is a ``Callable`` are runtime-only and never serialized (the
recipe records the sites they selected, so replay does not need them).

Example:
    >>> from dataclasses import dataclass
    >>> from typing import Literal
    >>> @dataclass(kw_only=True)
    ... class Demo(PassConfig):
    ...     mode: Literal["a", "b"] = "a"
    ...     width: int = 3
    >>> Demo.from_dict(Demo(mode="b").to_dict())
    Demo(mode='b', width=3)
"""
from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from typing import Any, Callable, ClassVar, Literal, Union, get_args, get_origin

from surgeon.core.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, where: str) -> None:
    """Raise ConfigError unless ``value`` fits the annotation ``tp``."""
    if tp is Any:
        return
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                _check(value, option, where)
                return
            except ConfigError as e:
                errors.append(str(e))
        # Literal mismatches give the most useful message
        for msg in errors:
            if "is not one of" in msg:
                raise ConfigError(msg)
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected None, got {value!r}")
        return
    if origin is collections.abc.Callable or tp is collections.abc.Callable:
        if not callable(value):
            raise ConfigError(f"{where}: expected a callable, got {type(value).__name__}")
        return
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a {origin.__name__}, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        for i, item in enumerate(value):
            _check(item, item_tp, f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a dict, got {type(value).__name__}")
        return
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _is_callable_type(tp: Any) -> bool:
    if tp is collections.abc.Callable or get_origin(tp) is collections.abc.Callable:
        return True
    if get_origin(tp) in (Union, types.UnionType):
        return any(_is_callable_type(a) for a in get_args(tp) if a is not type(None))
    return False


@dataclasses.dataclass(kw_only=True)
class TypedConfig:
    """A dataclass config whose fields are type-checked and round-trip to JSON (passes, distillation, ...)."""

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field's type, then the pass-specific rules in ``check``."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check(getattr(self, f.name), hints[f.name], f"{type(self).__name__}.{f.name}")
        self.check()

    def check(self) -> None:
        """Pass-specific value checks (override); raise ConfigError with a clear message."""

    # -- JSON -------------------------------------------------------------------------------
    @classmethod
    def runtime_only_fields(cls) -> set[str]:
        hints = typing.get_type_hints(cls)
        return {f.name for f in dataclasses.fields(cls) if _is_callable_type(hints[f.name])}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the serializable fields (tuples become lists)."""
        skip = self.runtime_only_fields()
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in skip:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TypedConfig":
        """Build and validate a config from ``to_dict()`` output; unknown keys are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if get_origin(hints[key]) is tuple and isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        config = cls(**kwargs)
        config.validate()
        return config


@dataclasses.dataclass(kw_only=True)
class PassConfig(TypedConfig):
    """Base class of every pass config; subclasses add fields and may override ``check``."""

    pass_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("pass_name"):
            cls.pass_name = cls.__name__


@dataclasses.dataclass(kw_only=True)
class SiteSelection(PassConfig):
    """The fields of a pass that chooses among its sites (see :mod:`surgeon.core.selectors`).

    Args:
        targets: names (exact or dotted suffix) or one regular expression; ``None`` = every site.
        exclude: the same rules, to drop sites.
        filter_fn: ``filter_fn(module, fqn) -> bool`` has the last word (runtime only, not saved).
    """

    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    filter_fn: Callable | None = None


@dataclasses.dataclass(kw_only=True)
class TracedSelection(SiteSelection):
    """:class:`SiteSelection` for passes that trace the model with ``torch.fx``.

    Args:
        leaf_modules: module names (or types' names) traced as opaque calls; their insides are not rewritten.
        leaf_fn: ``leaf_fn(module, fqn) -> bool`` for more leaves (runtime only, not saved).
    """

    leaf_modules: list[str] | tuple[str, ...] = ()
    leaf_fn: Callable | None = None
