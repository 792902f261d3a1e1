"""One config mechanism for every DiTharos job: dataclasses + YAML + `--set a.b=value`.

A job declares its config as nested dataclasses (each field declared once, with a
laptop-friendly default). `load_config(Cls, path, overrides)` reads an optional YAML
file, applies `--set` overrides (values parsed with `yaml.safe_load`), and builds the
dataclass tree, checking types. Unknown keys fail with the list of valid keys.
`to_dict` / `save_config` write the merged config beside every output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the job's config dataclasses."""


# ---------------------------------------------------------------------------
# Building dataclasses from plain data
# ---------------------------------------------------------------------------


def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce) `value` against the annotation `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping with keys {_valid_keys(tp)}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {args}: {errors}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; a number is clearly meant.
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
            if not math.isfinite(number):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys by name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    valid = _valid_keys(cls)
    unknown = [k for k in data if k not in valid]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"valid keys{' under ' + where if where else ''}: {valid}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree → plain JSON/YAML-friendly data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------
# Files and overrides
# ---------------------------------------------------------------------------


def apply_override(data: dict[str, Any], cls: type, override: str) -> None:
    """Apply one `a.b.c=value` override to `data` in place (value via yaml.safe_load)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node_cls):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])} is not a section")
        valid = _valid_keys(node_cls)
        if part not in valid:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"unknown config key {key!r}; valid keys at {where}: {valid}")
        if i == len(parts) - 1:
            node[part] = yaml.safe_load(raw) if raw.strip() else ""
        else:
            node_cls = get_type_hints(node_cls)[part]
            child = node.get(part)
            if child is None:
                child = {}
            elif dataclasses.is_dataclass(child):
                child = to_dict(child)
            node[part] = child
            node = child


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) + overrides → validated config dataclass."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at top level")
    for ov in overrides or []:
        apply_override(data, cls, ov)
    return from_dict(cls, data)


def config_json(obj: Any) -> str:
    """Canonical JSON of a config (sorted keys): what gets hashed and saved."""
    return json.dumps(to_dict(obj), sort_keys=True, indent=2)


def config_hash(obj: Any) -> str:
    return hashlib.sha256(config_json(obj).encode()).hexdigest()


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


__all__ = [
    "ConfigError",
    "apply_override",
    "config_hash",
    "config_json",
    "dump_yaml",
    "from_dict",
    "load_config",
    "to_dict",
]
