"""The config validation toolkit every config module uses (cluster, cluster.sync, healthcheck, bgp).

A config section is validated once, by a `from_dict`/`load` that walks what ``yaml.safe_load``
produced and knows the key path it is at. An error is a `ConfigError(path, reason)`; the YAML
loader (cluster.config) adds the file and line with `ConfigError.at`, from the `line_index` of the
composed document:

    services[2].backends[0].port: must be 1..65535, got 0 (node.yaml:31)

A package may subclass `ConfigError` to keep it under its own base exception (bgp's is a
`BgpError`); a `Validator` raises the package's class, in the package's wording (see there).

This module lives in `bpf` because `bpf` is the bottom of the package graph: it imports no other
lbnode package, and cluster, bgp and healthcheck may all import it without a cycle. It needs no
bcc, only PyYAML (`line_index`).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from bpf.structs import IPAddress


class ConfigError(Exception):
    """An invalid config: `path` is the key path, `reason` what is wrong with it, `line` the
    1-based YAML line in `source` (when known). ``str()`` is ``path: reason (source:line)``."""

    def __init__(self, path: str, reason: str, source: str | None = None, line: int | None = None) -> None:
        where = f" ({source or '<config>'}:{line})" if line is not None else ""
        super().__init__(f"{path}: {reason}{where}")
        self.path, self.reason, self.source, self.line = path, reason, source, line

    def at(self, source: str | None, lines: Mapping[str, int], prefix: str = "") -> ConfigError:
        """This error with `prefix` before its path, located in `source` by a `line_index`."""
        path = prefix + self.path
        return ConfigError(path, self.reason, source, line_of(path, lines))


def key_path(path: str, key: object) -> str:
    """`path.key`, or `key` at the top level (`path` "")."""
    return f"{path}.{key}" if path else str(key)


@dataclass(frozen=True, slots=True)
class Validator:
    """Checks of one config module, raising its `error` class.

    The wording options keep each package's messages byte for byte what they always were: the
    node's (`node_wording()`) say `required`, list the keys `expected`, name the first unknown key
    in file order and put a range into one message (``must be an integer 0..1000, got -1``);
    healthcheck's and sync's (the defaults) say `is required`, list the keys `known`, name the
    first unknown key in sorted order, and check the type before the range.
    """

    error: type[ConfigError] = ConfigError
    required: str = "is required"
    unknown: str = "unknown key (known: {known})"
    unknown_sorted: bool = True  # report the first unknown key in sorted order (else in file order)
    joined_ranges: bool = False  # "must be an integer lo..hi, got v" (else type, then range)
    string_keys: bool = False  # a mapping's keys must be strings

    def fail(self, path: str, reason: str) -> NoReturn:
        raise self.error(path, reason)

    def mapping(self, data: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            self.fail(path, f"must be a mapping, got {type(data).__name__}")
        if self.string_keys:
            for k in data:
                if not isinstance(k, str):
                    self.fail(path, f"keys must be strings, got {k!r}")
        return data

    def sequence(self, data: Any, path: str) -> Sequence[Any]:
        if not isinstance(data, list):
            self.fail(path, f"must be a list, got {type(data).__name__}")
        return data

    def no_unknown(self, d: Mapping[Any, Any], allowed: Collection[str], path: str) -> None:
        """A typo (`hold_time: 3`) must not silently run with the default."""
        unknown = [str(k) for k in d if k not in allowed]
        if unknown:
            first = min(unknown) if self.unknown_sorted else unknown[0]
            self.fail(key_path(path, first), self.unknown.format(known=", ".join(sorted(allowed))))

    def require(self, d: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in d:
            self.fail(key_path(path, key), self.required)
        return d[key]

    def integer(self, d: Mapping[str, Any], key: str, path: str, default: int | None, lo: int | None = None,
                hi: int | None = None) -> int:
        """`d[key]` (or `default`; None: required), an integer in lo..hi (None: unbounded)."""
        where = key_path(path, key)
        if key not in d and default is None:
            self.fail(where, self.required)
        v = d.get(key, default)
        is_int = isinstance(v, int) and not isinstance(v, bool)
        in_range = is_int and (lo is None or v >= lo) and (hi is None or v <= hi)
        if self.joined_ranges and not in_range:
            self.fail(where, f"must be an integer {lo}..{hi}, got {v!r}")
        if not is_int:
            self.fail(where, f"must be an integer, got {v!r}")
        if not in_range:
            self.fail(where, f"must be {lo}..{hi}, got {v}")
        return int(v)

    def number(self, d: Mapping[str, Any], key: str, path: str, default: float, lo: float, hi: float) -> float:
        """`d[key]` (or `default`), an int or float in lo..hi, as a float."""
        where = key_path(path, key)
        v = d.get(key, default)
        is_number = isinstance(v, (int, float)) and not isinstance(v, bool)
        in_range = is_number and lo <= v <= hi
        if self.joined_ranges and not in_range:
            self.fail(where, f"must be a number {lo}..{hi}, got {v!r}")
        if not is_number:
            self.fail(where, f"must be a number, got {v!r}")
        if not in_range:
            self.fail(where, f"must be {lo:g}..{hi:g}, got {v}")
        return float(v)

    def boolean(self, d: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        v = d.get(key, default)
        if not isinstance(v, bool):
            self.fail(key_path(path, key), f"must be true or false, got {v!r}")
        return v

    def port(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.fail(path, f"must be 1..65535, got {value!r}")
        return value

    def address(self, value: Any, path: str, *, text: bool = False) -> IPAddress:
        """An IPv4 or IPv6 address; `text`: only from its text form (YAML's `10` is no address)."""
        try:
            return ipaddress.ip_address(str(value) if text else value)
        except ValueError:
            self.fail(path, f"must be an IP address, got {value!r}")


def node_wording(error: type[ConfigError] = ConfigError) -> Validator:
    """The wording of the node's own config (cluster.config)."""
    return Validator(error, required="required", unknown="unknown key (expected one of {known})",
                     unknown_sorted=False, joined_ranges=True)


# -- YAML lines --------------------------------------------------------------------------------------

def load_yaml(text: str, source: str | None = None) -> tuple[Any, dict[str, int]]:
    """`yaml.safe_load(text)` and its `line_index`; a syntax error is a ConfigError at `(yaml)`."""
    try:
        data = yaml.safe_load(text)
        lines = line_index(yaml.compose(text)) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError("(yaml)", str(getattr(exc, "problem", None) or exc), source,
                          mark.line + 1 if mark is not None else None) from None
    return data, lines


def line_index(node: Any, path: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Key path -> 1-based line, from PyYAML's composed node tree."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = key_path(path, key.value)
            out[child] = key.start_mark.line + 1
            line_index(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = f"{path}[{i}]"
            out[child] = item.start_mark.line + 1
            line_index(item, child, out)
    return out


def line_of(path: str, lines: Mapping[str, int]) -> int | None:
    """The line of `path`, or of its nearest ancestor that is in the file."""
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None
