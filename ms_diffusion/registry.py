"""Registries of buildable things, and the checking of their arguments against the constructor's signature.

Each family lives beside what it builds and registers it once: networks (``models.MODELS``),
diffusion objectives (``diffusion.DIFFUSIONS``), autoencoder losses (``losses.LOSSES``), datasets
(``data.DATASETS``). A config section ``{type: name, **arguments}`` is checked against the
registered constructor's signature: an unknown or misspelt key is an error naming it and the
closest valid key; values are coerced to the annotated types (YAML lists -> tuples, "1e-4" ->
float) or rejected. Only registered names can be built (no dotted-path imports).
"""
from __future__ import annotations

import collections.abc
import difflib
import inspect
import typing
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["ConfigError", "Registry", "coerce", "signature_params", "validate_kwargs", "unknown_key", "unknown_choice"]


class ConfigError(ValueError):
    """A config file, override or build argument is invalid; the message names the key and the fix."""


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def coerce(value, annotation, where: str):
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``where``."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(annotation)}")
    if origin in (tuple, list, collections.abc.Sequence) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],)
        if args and origin is tuple and len(args) > 1:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def unknown_key(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f" — did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown key {where + key!r}{hint}")


def signature_params(fn: Callable, skip: Sequence[str]) -> Dict[str, inspect.Parameter]:
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # an annotation that cannot be resolved: check names only for those
        hints = {}
    sig = inspect.signature(fn)
    out = {}
    for name, p in sig.parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = hints.get(name, p.annotation)
        if isinstance(annotation, str):
            annotation = inspect.Parameter.empty
        out[name] = p.replace(annotation=annotation)
    return out


def validate_kwargs(section: str, values: Mapping[str, Any], fn: Callable, skip: Sequence[str]) -> Dict[str, Any]:
    params = signature_params(fn, skip)
    out = {}
    for key, value in values.items():
        if key not in params:
            raise unknown_key(key, params, f"{section}.")
        out[key] = coerce(value, params[key].annotation, f"{section}.{key}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in out]
    if missing:
        raise ConfigError(f"{section}: missing required key(s) {missing}")
    return out


def unknown_choice(where: str, what: str, value, choices: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    hint = f" — did you mean {close[0]!r}?" if close else f"; choose one of {sorted(choices)}"
    return ConfigError(f"{where}: unknown {what} {value!r}{hint}")


class Registry:
    """Named constructors of one family, e.g. ``MODELS = Registry("model")``; ``MODELS.register("unet", Unet)``.

    ``section`` names the config section in messages; ``key`` is the section's selector (``type``, or
    ``name`` for datasets); ``build_only`` are constructor arguments that code passes in and a config
    cannot name (e.g. the network handed to a diffusion).
    """

    def __init__(self, section: str, *, key: str = "type", build_only: Sequence[str] = ()):
        self.section, self.key = section, key
        self.build_only = ("self",) + tuple(build_only)
        self._entries: Dict[str, Callable] = {}
        self._aliases: Dict[str, str] = {}

    def register(self, name: str, builder: Optional[Callable] = None, *, aliases: Sequence[str] = ()):
        """Register ``builder`` under ``name`` (and ``aliases``); without ``builder``, a decorator."""
        def add(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.section} {name!r} is registered twice")
            self._entries[name] = fn
            for alias in (name, *aliases):
                self._aliases[alias] = name
            return fn
        return add if builder is None else add(builder)

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self._entries)

    @property
    def aliases(self) -> Tuple[str, ...]:
        """Every accepted name: the registered ones and their aliases."""
        return tuple(self._aliases)

    def __contains__(self, name: object) -> bool:
        return name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __getitem__(self, name: str) -> Callable:
        return self._entries[self.canonical(name)]

    def canonical(self, name: Any) -> str:
        """The registered name of ``name`` or an alias of it; ConfigError suggesting the closest otherwise."""
        if isinstance(name, str) and name in self._aliases:
            return self._aliases[name]
        raise unknown_choice(f"{self.section}.{self.key}", self.key, name, self._entries)

    def parameters(self, name: str) -> Dict[str, inspect.Parameter]:
        """The config-settable parameters of ``name``'s constructor, with resolved annotations."""
        return signature_params(self[name], self.build_only)

    def validate(self, values: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """``{key: canonical name, **arguments checked and coerced}`` of a config section; ConfigError if invalid."""
        values = dict(values or {})
        kind = values.pop(self.key, None)
        if kind is None:
            raise ConfigError(f"{self.section}: missing {self.key!r}; choose one of {sorted(self._entries)}")
        kind = self.canonical(kind)
        return {self.key: kind, **validate_kwargs(self.section, values, self._entries[kind], self.build_only)}

    def build(self, values: Mapping[str, Any], **build_args: Any):
        """Build from a config section (validated here) and the code-only ``build_args``."""
        kwargs = self.validate(values)
        return self._entries[kwargs.pop(self.key)](**kwargs, **build_args)
