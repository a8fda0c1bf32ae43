"""Strict construction of nested dataclasses from plain dicts (parsed YAML).

Every problem is reported as one `ConfigError` line that names the source file
and the dotted key: an unknown key (with the closest known spelling), a value
of the wrong type, a value outside a `Literal`, or a failed cross-field check
raised by a dataclass's `__post_init__`. Nothing is coerced silently except
int -> float, which YAML users expect (`lr: 1` means 1.0).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A config problem, already phrased for the user (file and key named)."""


def field(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:  # noqa: A002
    """A dataclass field with help text; mutable defaults become factories."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        factory = (lambda: type(value)(value)) if isinstance(value, (list, dict)) else (lambda: dataclasses.replace(value))
        return dataclasses.field(default_factory=factory, metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _fail(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {key or '<top level>'}: {message}")


def _resolve_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type, data: Any, *, source: str, key: str = "") -> Any:
    """Instantiate dataclass `cls` from `data`, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(source, key, f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = _resolve_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(fields))})"
        raise _fail(source, _join(key, k), f"unknown key{hint}")
    values = {name: convert(hints[name], data[name], source=source, key=_join(key, name)) for name in data}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise _fail(source, key, str(err)) from None


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def convert(tp: Any, value: Any, *, source: str, key: str) -> Any:
    """Check `value` against type annotation `tp` and return it (nested dataclasses built)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, source=source, key=key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise _fail(source, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, source=source, key=key)
    if origin in (list, tuple):
        return _convert_sequence(tp, origin, value, source=source, key=key)
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, key, f"expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = get_args(tp) or (str, Any)
        return {convert(key_tp, k, source=source, key=key): convert(val_tp, v, source=source, key=_join(key, k)) for k, v in value.items()}
    return _convert_scalar(tp, value, source=source, key=key)


def _convert_union(tp: Any, value: Any, *, source: str, key: str) -> Any:
    options = get_args(tp)
    if value is None:
        if type(None) in options:
            return None
        raise _fail(source, key, "must not be null")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return convert(option, value, source=source, key=key)
        except ConfigError as err:
            errors.append(str(err).split(": ", 2)[-1])
    raise _fail(source, key, " / ".join(errors))


def _convert_sequence(tp: Any, origin: type, value: Any, *, source: str, key: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _fail(source, key, f"expected a list, got {type(value).__name__} {value!r}")
    args = get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise _fail(source, key, f"expected {len(args)} items, got {len(value)}")
        return tuple(convert(a, v, source=source, key=f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item_tp = args[0] if args else Any
    items = [convert(item_tp, v, source=source, key=f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_scalar(tp: Any, value: Any, *, source: str, key: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-5" as a string; accept numeric strings for floats only.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise _fail(source, key, f"expected {_type_name(tp)}, got bool {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _fail(source, key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (for saving the resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def help_text(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every field, recursively: for --help-config."""
    rows = []
    hints = _resolve_hints(cls)
    for f in dataclasses.fields(cls):
        name = _join(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(help_text(tp, name))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>")
        rows.append((name, f.metadata.get("help", ""), default))
    return rows
