"""Typed configs: dataclasses filled from YAML files plus ``key=value`` overrides.

Every stage has a dataclass config (see ``safejax/train/*``).  ``load_config(Cls, path, overrides)``
reads the YAML, applies dotted overrides (``optim.lr=1e-5 mesh.fsdp=4``), checks that every key
exists (unknown keys are named, with the closest valid key), converts values to the declared
types, and runs each dataclass's ``validate()`` so that out-of-range values fail before any work.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from safejax.errors import SafejaxError

T = TypeVar("T")


class ConfigError(SafejaxError, ValueError):
    """A config file or override is invalid; the message names the key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding the same key twice (PyYAML keeps the last)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let PyYAML report it
            continue
        if first is not None:
            raise ConfigError(f"line {line}: duplicate key {key!r} (first set on line {first}); "
                              "each key may appear once per section")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml_text(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load`` but raise :class:`ConfigError` naming the line of a duplicate key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:  # try the next member
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{k}'{hint}; valid keys here: {', '.join(prefix + n for n in names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            default = _field_default(f)
            if isinstance(value, dict) and dataclasses.is_dataclass(default):
                # a partial section keeps the parent's defaults for the keys it does not set
                value = _deep_merge(dataclasses.asdict(default), value)
            kwargs[f.name] = _coerce(value, hints[f.name], prefix + f.name)
    obj = cls(**kwargs)
    return obj


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_scalar(text: str) -> Any:
    if text.strip() == "":
        return ""  # `key=` means an empty value, not YAML null
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return data


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def validate_tree(obj: Any, prefix: str = "") -> None:
    """Run ``validate()`` on every dataclass in the tree (children first)."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        validate_tree(getattr(obj, f.name), prefix + f.name + ".")
    check = getattr(obj, "validate", None)
    if callable(check):
        check()


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), *,
                validate: bool = True) -> T:
    """Read ``path`` (YAML, optional), apply overrides, build and (unless ``validate=False``: key names and
    types only, e.g. to print a partial config) validate a ``cls`` instance."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = load_yaml_text(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"config file {p}, {e}") from None
        except (UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"config file {p} cannot be read: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    data = apply_overrides(data, overrides)
    try:
        cfg = _from_dict(cls, data)
        if validate:
            validate_tree(cfg)
    except ConfigError as e:
        raise ConfigError(f"{e}{_origin(str(e), path, overrides)}") from None
    return cfg


def _origin(message: str, path: str | Path | None, overrides: Sequence[str]) -> str:
    """Where the key named in ``message`` was set: the command line (an override wins) or the YAML file."""
    named = re.search(r"config key '([^']+)'", message)
    if named:
        key = re.sub(r"\[\d+\]$", "", named.group(1))
        for item in reversed(list(overrides)):
            given = item.split("=", 1)[0].strip()
            if given == key or given.startswith(key + ".") or key.startswith(given + "."):
                return f" (on the command line: {item})"
    return f" (in {path})" if path else ""


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check_range(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, choices: Sequence[Any] | None = None) -> None:
    """Raise ConfigError naming ``key`` if ``value`` is outside the range or not in ``choices``."""
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' = {value!r} must be one of {list(choices)}")
    if value is None:
        return
    if (low is not None or high is not None) and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' = {value!r} must be a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"config key '{key}' = {value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise ConfigError(f"config key '{key}' = {value!r} must be <= {high}")
