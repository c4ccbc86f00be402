"""One config loader for every stage: frozen dataclasses from YAML/JSON files or dicts.

Every stage declares its settings as a frozen dataclass (nested dataclasses for
sub-sections) and reads them with :func:`load_config`. The loader

* reads a mapping, a YAML/JSON file (local or ``s3://``), or nothing (the defaults);
* fills ``${name}`` placeholders in a file's values (``${data_root}``) from a
  ``--set name=VALUE`` override or the environment variable ``NAME`` (:func:`substitute`),
  and fails with one clear message when a placeholder has no value;
* applies overrides: a dict (``None`` values ignored, so an unset CLI option keeps the
  file's value), dotted keys (``{"loss.margin": 0.4}``) or ``KEY=VALUE`` strings
  (``["train.epochs=3"]``, values parsed as YAML scalars);
* converts and checks every value against the field's annotation (``int``, ``float``,
  ``bool``, ``str``, ``X | None``, fixed-length tuples, nested dataclasses);
* rejects unknown keys with the list of valid ones, at every level;
* calls the dataclass's ``validate()`` (or relies on ``__post_init__``) so a bad value
  fails with one clear :class:`~reid_ray.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from reid_ray.errors import ConfigError

T = TypeVar("T")

Overrides = Mapping[str, Any] | Iterable[str] | None


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON file (local or ``s3://``) as a dict; ``{}`` for an empty file."""
    import yaml

    from reid_ray import io as rio

    try:
        text = rio.read_bytes(path).decode()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML/JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a mapping of settings")
    return data


def parse_overrides(overrides: Overrides) -> dict[str, Any]:
    """Overrides as a nested dict. ``KEY=VALUE`` strings have their value parsed as YAML."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        flat = {str(k): v for k, v in overrides.items() if v is not None}
    else:
        import yaml

        flat = {}
        for item in overrides:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"an override is KEY=VALUE (e.g. train.epochs=3), got {item!r}")
            try:
                flat[key.strip()] = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError:
                flat[key.strip()] = value
    return nest(flat)


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"loss.margin": 0.4}`` -> ``{"loss": {"margin": 0.4}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *heads, last = key.split(".")
        for head in heads:
            node = node.setdefault(head, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with a value set for {head!r}")
        node[last] = value
    return out


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` deep-merged into a copy of ``base`` (mappings merge, other values replace)."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    cls: type[T],
    source: Mapping[str, Any] | str | T | None = None,
    overrides: Overrides = None,
    *,
    section: str | None = None,
) -> T:
    """Build the frozen dataclass ``cls`` from ``source`` plus ``overrides``.

    ``source`` is a dict, a YAML/JSON file path, an instance of ``cls`` or None (defaults).
    ``section``: when the file holds ``{section: {...}}`` alone, that sub-mapping is read.
    """
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, cls):
        data = to_dict(source)
    elif isinstance(source, str):
        data = read_config_file(source)
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        raise ConfigError(
            f"a {cls.__name__} comes from a dict or a file path, not {type(source).__name__}"
        )
    if section and set(data) == {section} and isinstance(data[section], Mapping):
        data = dict(data[section])
    changes = parse_overrides(overrides)
    if isinstance(source, str):
        data = substitute(data, _take_variables(data, changes, cls), where=source)
    data = merge(data, changes)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        if isinstance(source, str):
            raise ConfigError(f"{source}: {exc}") from None
        raise


#: a placeholder in a config file's values: ``${data_root}/dogfacenet/metadata.csv``
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders(data: Any) -> set[str]:
    """The ``${name}`` placeholders used anywhere in ``data``'s string values."""
    if isinstance(data, Mapping):
        return set().union(*map(placeholders, data.values()))
    if isinstance(data, (list, tuple)):
        return set().union(*map(placeholders, data))
    return set(PLACEHOLDER.findall(data)) if isinstance(data, str) else set()


def _take_variables(data: Mapping[str, Any], changes: dict[str, Any], cls: type) -> dict[str, str]:
    """Values for the file's placeholders: a ``--set name=VALUE`` override (taken out of
    ``changes``: it names no setting), else the environment variable ``NAME``."""
    import os

    from reid_ray import io as rio

    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    values = {}
    for name in placeholders(data):
        if name in changes and name not in fields:
            values[name] = str(changes.pop(name))
        elif os.environ.get(name.upper()):
            values[name] = os.environ[name.upper()]
        else:
            continue
        if name.endswith(("_root", "_dir")) and not rio.is_remote(values[name]):
            # a folder named relative to where the user is, not to the config file
            values[name] = os.path.abspath(os.path.expanduser(values[name]))
    return values


def substitute(data: Any, values: Mapping[str, str], *, where: str = "") -> Any:
    """``data`` with every ``${name}`` replaced by ``values[name]``; a placeholder left
    without a value is a :class:`ConfigError` that says how to give one.

    This is how shipped configs name a user's folders: ``${data_root}/dogfacenet`` reads
    ``--set data_root=/data`` or ``DATA_ROOT=/data``."""
    missing = sorted(placeholders(data) - set(values))
    if missing:
        name = missing[0]
        raise ConfigError(
            f"{where or 'the config'} needs {name} (it uses ${{{name}}}): give it with "
            f"--set {name}=/path/to/folder or the environment variable {name.upper()}"
        )

    def replace_in(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: replace_in(v) for k, v in value.items()}
        if isinstance(value, list):
            return [replace_in(v) for v in value]
        if isinstance(value, str):
            return PLACEHOLDER.sub(lambda m: values[m.group(1)].rstrip("/"), value)
        return value

    return replace_in(data)


def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (tuples stay tuples; nested sections are dicts)."""
    return dataclasses.asdict(obj)


def replace(obj: T, **changes: Any) -> T:
    """A validated copy of the config ``obj`` with ``changes`` (dotted keys allowed;
    ``None`` values ignored)."""
    return load_config(type(obj), obj, changes)


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build ``cls`` from ``data``; unknown keys and badly typed values raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(map(str, data)) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown setting(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid{' in ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {
        name: _convert(data[name], hints[name], f"{where}.{name}" if where else name)
        for name in names
        if name in data
    }
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without a default
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check one value against the annotation ``tp``; convert where it is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) == len(typing.get_args(tp)):
                raise ConfigError(f"{where} must be set, got null")
            return None
        errors = []
        for arg in args:
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where} must be a list, got {value!r}")
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(
            _convert(v, a, f"{where}[{i}]")
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (list, typing.List):  # noqa: UP006 - matching the annotation object
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):  # noqa: UP006
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in (
            "true",
            "yes",
            "on",
            "1",
            "false",
            "no",
            "off",
            "0",
        ):
            return value.lower() in ("true", "yes", "on", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def check(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok``: the one-line validator configs use."""
    if not ok:
        raise ConfigError(message)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


__all__ = [
    "check",
    "check_choice",
    "from_dict",
    "load_config",
    "merge",
    "nest",
    "parse_overrides",
    "placeholders",
    "read_config_file",
    "replace",
    "substitute",
    "to_dict",
]
