"""Config files and typed config values: one parser for YAML files and command-line overrides.

Config files are untrusted input: `open_regular_file` refuses a FIFO or a device in place of a file
(either would block a read forever), `read_text_file` wants UTF-8, `load_json` a JSON object, and
`parse_yaml` reads YAML 1.2 floats (`1e-3` is a number, not PyYAML's string) without building
arbitrary objects; each failure is a one-line `ConfigError` naming the file.

A command-line override `a.b=value` (`split_override`, `nest_overrides`) keeps its value as text
(`OverrideText`) until it meets the field it sets. `typed_value` / `typed_fields` convert YAML,
JSON and override values alike to the type of that dataclass field (`1e-3` a float, `true` a bool,
nested sections included), and an unconvertible value is a `ConfigError` naming the key and the
type expected. The model configs (`config.apply_overrides`, YAML model configs) and the run
configs (`train.config`) both go through here.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import math
import os
import re
import stat
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the field."""


def short_repr(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut short: a hostile file may hold a megabyte where a number belongs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_regular_file(path: str, error: type[ValueError] = ConfigError) -> int:
    """A read-only descriptor of `path`, which must be a regular file: a FIFO or a device would
    block `open` or `read` forever (opened non-blocking, checked, then made blocking again)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise error(f"{path}: cannot open ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: not a regular file")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def read_text_file(path: str) -> str:
    """The UTF-8 text of the regular file `path`; a `ConfigError` naming the file otherwise."""
    with os.fdopen(open_regular_file(path), "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start})") from None


def load_json(path: str) -> dict[str, Any]:
    """The JSON object in the regular file `path`; a `ConfigError` naming the file otherwise."""
    try:
        d = json.loads(read_text_file(path))
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a JSON object is expected")
    return d


def _yaml_loader() -> type:
    import yaml

    # libyaml's parser is fast and bounds the nesting depth; PyYAML's own takes time quadratic in
    # the depth of nested `[`, seconds for a few thousand.
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):
        """PyYAML reads YAML 1.1, where `1e-3` (no dot) is a string; YAML 1.2 and every user
        mean a float. The float forms YAML 1.1 lacks resolve to floats here."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return Loader


_YAML_LOADER = functools.cache(_yaml_loader)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text, with YAML 1.2 floats (`1e-3`); a `ConfigError` naming `where` otherwise."""
    import yaml

    try:
        # str(): libyaml takes exact strings, not subclasses such as `OverrideText`.
        return yaml.load(str(text), Loader=_YAML_LOADER())  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply)") from None


def read_yaml_file(path: str) -> Any:
    """The YAML document in `path` (see `parse_yaml`)."""
    return parse_yaml(read_text_file(path), path)


class OverrideText(str):
    """A value as typed on the command line: converted to the type of the field it sets, or, in a
    free-form mapping (`data`, `reward`), read as a YAML scalar or list."""


def split_override(item: str) -> tuple[list[str], OverrideText]:
    """`"a.b=value"` -> (`["a", "b"]`, `OverrideText("value")`)."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(f"override {item!r}: KEY=VALUE expected (e.g. optimizer.lr=1e-5 or text.n_layers=2)")
    return [part.strip() for part in parts], OverrideText(value.strip())


def nest_overrides(d: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """`d` with each `a.b=value` set at `d["a"]["b"]` (as `OverrideText`, typed later)."""
    for item in overrides:
        parts, value = split_override(item)
        node = d
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node[parts[-1]] = value
    return d


_NULLS = ("", "null", "none", "None", "~")
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "null"}
    if tp in names:
        return names[tp]
    if origin in (tuple, list):
        return "a list"
    return "a mapping"


def _free_form(value: Any, key: str) -> Any:
    # Command-line text in a free-form mapping: a YAML value (numbers, lists, true/false, text).
    if isinstance(value, OverrideText):
        return parse_yaml(value, key)
    if isinstance(value, dict):
        return {k: _free_form(v, f"{key}.{k}") for k, v in value.items()}
    return value


def typed_value(value: Any, tp: Any, key: str) -> Any:
    """`value` (command-line text, or a value read from YAML or JSON) as type `tp`: bool, int,
    float, str, `X | None`, `Literal[...]`, tuples, lists, free-form `dict[str, Any]` or a config
    dataclass (a mapping typed field by field, returned as a dict). A `ConfigError` naming `key`
    and the type expected otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    text = value.strip() if isinstance(value, str) else None

    def wrong() -> ConfigError:
        return ConfigError(f"{key}: {_describe(tp)} is expected, got {short_repr(value)}")

    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or text in _NULLS):
            return None
        # Text fits any str member: try the others first (`[fsdp, data]` is a list).
        for member in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return typed_value(value, member, key)
            except ConfigError:
                pass
        raise wrong()
    if origin is Literal:
        got = text if text is not None else value
        if got in args:
            return got
        raise wrong()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise wrong()
    if tp is int or tp is float:
        number = value
        if text is not None:
            try:
                number = int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    raise wrong() from None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise wrong()
        if isinstance(number, float) and not math.isfinite(number):
            raise wrong()
        if tp is float:
            try:
                return float(number)
            except OverflowError:
                raise wrong() from None
        if isinstance(number, float):
            if not number.is_integer():
                raise wrong()
            number = int(number)
        if not -(2**63) <= number < 2**63:
            raise ConfigError(f"{key}: {short_repr(value)} is out of range (64-bit integers)")
        return number
    if tp is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # YAML read `run_dir: 2024` as a number
        raise wrong()
    if origin is list:
        items = parse_yaml(value, key) if isinstance(value, OverrideText) else value
        if not isinstance(items, list | tuple):
            raise wrong()
        return [typed_value(x, args[0] if args else Any, f"{key}[{i}]") for i, x in enumerate(items)]
    if origin is tuple:
        items = parse_yaml(value, key) if isinstance(value, OverrideText) else value
        if not isinstance(items, list | tuple):
            raise wrong()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(typed_value(x, args[0], f"{key}[{i}]") for i, x in enumerate(items))
        if len(items) != len(args):
            raise ConfigError(f"{key}: a list of {len(args)} items is expected, got {short_repr(value)}")
        return tuple(typed_value(x, a, f"{key}[{i}]") for i, (x, a) in enumerate(zip(items, args, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise wrong()
        return _free_form(value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong()
        return typed_fields(value, tp, f"{key}.")
    if tp is Any:
        return _free_form(value, key)
    raise TypeError(f"{key}: no conversion to {tp!r}")  # a field type this parser does not know yet


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def typed_fields(d: Mapping[str, Any], cls: type, prefix: str = "") -> dict[str, Any]:
    """The mapping `d` with each value converted to the type of `cls`'s field of that name
    (`typed_value`); dotted keys (`text.n_layers`) address nested fields; an unknown key is an
    error listing the known ones. Nested dataclasses stay dicts: the caller builds them."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: a mapping is expected, got {short_repr(d)}")
    nested: dict[str, Any] = {}
    for key, value in d.items():
        if not isinstance(key, str):
            raise ConfigError(f"{prefix}{short_repr(key)}: keys are names, got {type(key).__name__}")
        head, _, rest = key.partition(".")
        if rest:
            value = {rest: value}
            if isinstance(nested.get(head), dict):
                value = {**nested[head], **value}
        nested[head] = value
    types_ = _field_types(cls)
    out = {}
    for key, value in nested.items():
        if key not in types_:
            raise ConfigError(f"{prefix}{key}: unknown key; expected one of {sorted(types_)}")
        out[key] = typed_value(value, types_[key], f"{prefix}{key}")
    return out
