"""Typed YAML configs with dotted command-line overrides.

A config is a tree of dataclasses (one per concern, see :mod:`megatron_vp2o.config.schema`).
:func:`build` turns a nested dict into that tree strictly: an unknown key, a wrong type or a
missing section raises :class:`ConfigError` naming the dotted field and the fix, before anything
runs. Values are checked against the field's annotation (int, float, bool, str, Optional, list,
tuple, Literal, nested dataclass); each dataclass may validate ranges in ``__post_init__``.

Overrides use dotted paths: ``train.steps=40 parallel.ep=2 model.router.score_function=sigmoid``;
the value is parsed as YAML (so ``1e-3`` is a float and ``null`` is None).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem: the message names the field (dotted path) and the fix."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path} must be one of {list(get_args(tp))} (got {value!r})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list (got {type(value).__name__} {value!r})")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping (got {value!r})")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer (got {value!r})")
        return value
    if tp is float:
        value = _yaml11_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number (got {value!r})")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{path} must be a finite number (got {value!r}); write a finite value such as 1e-3")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string (got {value!r})")
        return value
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def _yaml11_float(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``1e-3`` (no dot) as a string; accept it where a number is expected."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def build(cls: type, data: dict | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data`` strictly (unknown keys and wrong types raise)."""
    data = {} if data is None else data
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping of fields (got {data!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        guess = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        where = f"{path}.{key}" if path else str(key)
        raise ConfigError(f"unknown config key '{where}'{hint}; valid keys here: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required fields
        raise ConfigError(f"{path or 'config'}: {exc}") from None
    except ConfigError:
        raise
    except ValueError as exc:  # range checks in __post_init__ name their own field
        raise ConfigError(_qualify(str(exc), path)) from None


def _qualify(msg: str, path: str) -> str:
    """Prefix a section-relative message ("stein.x must ...") with the rest of its dotted path."""
    parts = path.split(".") if path else []
    for i in range(len(parts) + 1):
        if msg.startswith(".".join(parts[i:]) + ".") and i < len(parts):
            return ".".join(parts[:i] + [msg]) if i else msg
    return f"{path}.{msg}" if path else msg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (value parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.field=value (e.g. train.steps=40)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': '{key}' is not a dotted field name (e.g. train.steps=40)")
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or an empty section in the YAML (`rl:`)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is a value, not a section; "
                                  "override it as a whole (e.g. train.lr=1e-3)")
        node[parts[-1]] = _parse_value(item, raw)
    return data


def _parse_value(item: str, raw: str) -> Any:
    """An override's value parsed as YAML; a malformed value is a one-line :class:`ConfigError`."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_reason(exc)}); "
                          "quote strings and close brackets, e.g. key='[1' or key=[1, 2]") from None


def _yaml_reason(exc: Exception) -> str:
    """One line from a (multi-line) PyYAML error: the problem and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_text(path: str | Path, what: str) -> str:
    """The text of file ``path``; a missing, unreadable or non-UTF-8 file is a one-line
    :class:`ConfigError` that starts with ``what`` (the field or option naming the file)."""
    path = Path(path)
    if not path.is_file():
        kind = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{what}: '{path}' {kind}; point {what.split()[0]} at an existing file")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what}: '{path}' cannot be read ({exc.strerror or exc}); check its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: '{path}' is not UTF-8 text") from None


def load_yaml(path: str | Path) -> dict:
    where = "--config"
    text = read_text(path, f"{where} (a YAML file, see examples/configs/)")
    if not text.strip():
        raise ConfigError(f"{where}: config file '{path}' is empty; start from examples/configs/tiny_cpu.yaml")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: config file '{path}' is not valid YAML ({_yaml_reason(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: config file '{path}' must hold a mapping of sections (model:, train:, ...)")
    return data


def to_dict(cfg: Any) -> dict:
    """A plain nested dict (for saving next to checkpoints and logging to wandb)."""
    return dataclasses.asdict(cfg)


def check(cond: bool, field: str, rule: str, value: Any) -> None:
    """Raise ``ValueError("<field> must <rule> (got <value>)")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"{field} must {rule} (got {value!r})")
