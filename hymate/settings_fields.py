"""Settings declared once, as dataclass fields; run-config keys and CLI flags are derived from them.

A settings dataclass (``TrainConfig``, ``ModelOptions``, ``ServerSettings``, ...) is the only
place a setting's name, type and default are written. Its run-config key is the field name
with ``-`` for ``_`` unless the field's metadata names another (``setting(3, key="num-server-rounds")``);
its flag is ``--`` + that key unless the metadata names one (``flag="--rounds"``). Flower needs
``[tool.flwr.app.config]`` in pyproject.toml, so that table stays, and a test holds it to
``run_config_defaults(ServerSettings)``.

Field kinds: int, float, str, bool, Path, ``tuple[str, ...]`` (space-separated text in a run
config) and a nested settings dataclass marked ``group=True`` (its keys are flattened in).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class RunConfigError(ValueError):
    """A run-config key has a wrong type or value; names the key."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    key: str | None = None,
    flag: str | None = None,
    help: str | None = None,  # noqa: A002  (argparse's name)
    choices: tuple[str, ...] | None = None,
    group: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with the metadata its run-config key and CLI flag are derived from."""
    metadata = {"key": key, "flag": flag, "help": help, "choices": choices, "group": group}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def default_of(cls: type, name: str) -> Any:
    """A field's declared default (None for a required field), so another dataclass can take it
    over instead of repeating it."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return None if f.default_factory is dataclasses.MISSING else f.default_factory()


def config_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name.replace("_", "-")


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f"--{config_key(f)}"


def dest_of(f: dataclasses.Field) -> str:
    return flag_of(f).removeprefix("--").replace("-", "_")


@functools.cache
def _kinds(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _scalar_kind(annotation: Any) -> tuple[type, bool]:
    """(the value's type, whether None is allowed)."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (kind,) = [a for a in args if a is not type(None)]
        return kind, True
    if typing.get_origin(annotation) is tuple:
        return tuple, False
    return annotation, False


def field_kind(cls: type, name: str) -> type:
    """The type a field's value has (``float`` for ``float | None``)."""
    return _scalar_kind(_kinds(cls)[name])[0]


def _fields(cls: type, names: Iterable[str] | None = None) -> list[dataclasses.Field]:
    chosen = None if names is None else set(names)
    return [f for f in dataclasses.fields(cls) if f.init and (chosen is None or f.name in chosen)]


def check_choices(settings: Any, names: Iterable[str] | None = None) -> None:
    """RunConfigError, naming the key and its choices, for a named field (every field declared with
    ``choices`` by default) whose value is not one of them: the check written once for all settings."""
    for f in _fields(type(settings), names):
        choices, value = f.metadata.get("choices"), getattr(settings, f.name)
        if choices and value not in choices:
            raise RunConfigError(f"{config_key(f)} must be one of {', '.join(choices)}, got {value!r}")


def run_config_defaults(cls: type) -> dict[str, Any]:
    """Every run-config key of ``cls`` (nested groups flattened) with its default, as TOML holds it."""
    out: dict[str, Any] = {}
    for f in _fields(cls):
        if f.metadata.get("group"):
            out |= run_config_defaults(_kinds(cls)[f.name])
            continue
        value = default_of(cls, f.name)
        out[config_key(f)] = _to_config(value)
    return out


def run_config_of(settings: Any) -> dict[str, Any]:
    """A settings object's values by run-config key (no nested groups), as a run config holds them."""
    return {config_key(f): _to_config(getattr(settings, f.name)) for f in _fields(type(settings))}


def _to_config(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return " ".join(value)
    return value


def from_run_config(cls: type, config: Mapping[str, Any]) -> Any:
    """``cls`` built from a run config; an absent key takes the field's default, a mistyped one is an
    error naming the key."""
    values: dict[str, Any] = {}
    for f in _fields(cls):
        kind = _kinds(cls)[f.name]
        if f.metadata.get("group"):
            values[f.name] = from_run_config(kind, config)
            continue
        key = config_key(f)
        if key in config:
            values[f.name] = _typed(key, config[key], kind)
    return cls(**values)


def _typed(key: str, value: Any, annotation: Any) -> Any:
    kind, optional = _scalar_kind(annotation)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is Path and isinstance(value, str):
        return Path(value)
    if kind is tuple and isinstance(value, str):
        return tuple(value.split())
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RunConfigError(f"run config {key!r}={value!r} must be {getattr(kind, '__name__', kind)}")
    return value


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    names: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> list[dataclasses.Field]:
    """One flag per named field of ``cls`` (all fields by default), typed and defaulted by the field.

    ``defaults`` (field name -> value) replaces a field's default for this command. Returns the
    fields added, for ``flag_values``.
    """
    added = []
    for f in _fields(cls, names):
        kind, _ = _scalar_kind(_kinds(cls)[f.name])
        default = (defaults or {}).get(f.name, default_of(cls, f.name))
        text = f.metadata.get("help")
        options: dict[str, Any] = {"dest": dest_of(f), "default": default}
        if kind is bool:
            options["action"] = "store_true"
        else:
            options |= {"type": kind, "choices": f.metadata.get("choices")}
            shown = f"default {default}" if default is not None else None
            text = "; ".join(x for x in (text, shown) if x) or None
        parser.add_argument(flag_of(f), help=text, **options)
        added.append(f)
    return added


def flag_values(cls: type, args: argparse.Namespace, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The named fields' values from parsed flags, by field name (for ``cls(**...)``)."""
    return {f.name: getattr(args, dest_of(f)) for f in _fields(cls, names) if not f.metadata.get("group")}


def flag_config(cls: type, args: argparse.Namespace, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The named fields' values from parsed flags, by run-config key (for a run config)."""
    return {config_key(f): _to_config(getattr(args, dest_of(f))) for f in _fields(cls, names)}
