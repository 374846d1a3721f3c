"""The pass registry: one handler per config class, one config class per pass name.

Example:
    >>> from dataclasses import dataclass
    >>> from surgeon.core.handler import PassHandler
    >>> @dataclass(kw_only=True)
    ... class Noop(PassConfig):
    ...     pass
    >>> @register_pass(Noop)
    ... class NoopHandler(PassHandler):
    ...     pass
    >>> type(handler_for(Noop())).__name__, config_class("Noop") is Noop
    ('NoopHandler', True)
    >>> @dataclass(kw_only=True)
    ... class Other(PassConfig):
    ...     pass_name = "Noop"
    >>> register_pass(Other)(NoopHandler)
    Traceback (most recent call last):
    ...
    surgeon.core.errors.ConfigError: a pass named 'Noop' is already registered (...Noop); give Other another pass_name
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable

from surgeon.core.config import PassConfig
from surgeon.core.errors import ConfigError, RecipeError

if TYPE_CHECKING:
    from surgeon.core.handler import PassHandler

_HANDLERS: dict[type, "PassHandler"] = {}
_BY_NAME: dict[str, type[PassConfig]] = {}


def _source(cls: type) -> tuple[str | None, str]:
    module = sys.modules.get(cls.__module__)
    return getattr(module, "__file__", None), cls.__qualname__


def register_pass(config_cls: type[PassConfig]) -> Callable[[type["PassHandler"]], type["PassHandler"]]:
    """Class decorator: register a handler class for ``config_cls``.

    A second, different config class under the same ``pass_name`` is refused (recipes name passes by
    it). The same class defined by the same file again (a module imported under two names, as the
    doctest session does) replaces the first registration.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, PassConfig)):
        raise ConfigError(f"register_pass needs a PassConfig dataclass, got {config_cls!r}")

    def wrap(handler_cls: type["PassHandler"]) -> type["PassHandler"]:
        previous = _BY_NAME.get(config_cls.pass_name)
        if previous is not None and previous is not config_cls and _source(previous) != _source(config_cls):
            raise ConfigError(
                f"a pass named {config_cls.pass_name!r} is already registered ({previous.__module__}."
                f"{previous.__qualname__}); give {config_cls.__qualname__} another pass_name")
        _HANDLERS[config_cls] = handler_cls()
        _BY_NAME[config_cls.pass_name] = config_cls
        return handler_cls

    return wrap


def handler_for(config: PassConfig) -> "PassHandler":
    """The handler registered for this config's type."""
    if not isinstance(config, PassConfig):
        raise ConfigError(
            f"{config!r} is not a pass; passes are PassConfig dataclasses such as LinearizeReLU(...)"
        )
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise ConfigError(
            f"no handler is registered for {type(config).__name__}; decorate one with @register_pass"
        ) from None


def config_class(pass_name: str) -> type[PassConfig]:
    """The config class registered under ``pass_name`` (as written in recipes)."""
    if pass_name not in _BY_NAME:
        import surgeon.passes  # noqa: F401  - the built-in passes register on import (passes sit above core)
    try:
        return _BY_NAME[pass_name]
    except KeyError:
        raise RecipeError(f"unknown pass {pass_name!r}; registered passes are {sorted(_BY_NAME)}") from None
