"""Config helpers: dataclass fields that carry their documentation, YAML + dotted overrides, and
``NAME=VALUE`` lists as the command line types them.

A config comes from three layers, later wins: the dataclass defaults, a YAML file whose sections
mirror the dataclasses (``model:``, ``data:``, ``train:``), and overrides given as dotted keys
(``train.lr=1e-5``). :func:`load_config` does all three and type-checks each value.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Any, Dict, List, Mapping, Optional

import yaml


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its documentation (``metadata['help']``)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def field_help(cls: type, dotted: str) -> str:
    """The documentation of the field at ``dotted`` (``train.lr``) of config class ``cls``."""
    head, _, rest = dotted.partition(".")
    f = {f.name: f for f in dataclasses.fields(cls)}[head]
    if rest:
        return field_help(typing.get_type_hints(cls)[head], rest)
    return f.metadata.get("help", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, List):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, key) for v in value]
    if origin in (dict, Dict):
        if isinstance(value, str):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        _, inner = typing.get_args(tp)
        return {str(k): _coerce(v, inner, key) for k, v in value.items()}
    return value


def apply_overrides(cfg: Any, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Set nested dataclass fields from a mapping (YAML section or dotted CLI keys).

    Unknown keys raise, naming the key and the valid ones -- a typo never passes silently.
    """
    types = typing.get_type_hints(type(cfg))
    for key, value in values.items():
        head, _, rest = key.partition(".")
        full = f"{prefix}{head}"
        if head not in types:
            raise ValueError(f"unknown config key {full!r}; valid: {sorted(types)}")
        current = getattr(cfg, head)
        if dataclasses.is_dataclass(current):
            if rest:
                apply_overrides(current, {rest: value}, prefix=full + ".")
            elif isinstance(value, Mapping):
                apply_overrides(current, value, prefix=full + ".")
            else:
                raise ValueError(f"{full}: expected a mapping of fields, got {value!r}")
        else:
            if rest:
                raise ValueError(f"{full} is not a section; cannot set {full}.{rest}")
            setattr(cfg, head, _coerce(value, types[head], full))
    return cfg


def parse_dotted(pairs: List[str]) -> Dict[str, Any]:
    """``["train.lr=1e-5", "data.columns={prompt: q}"]`` -> ``{"train.lr": 1e-5, ...}`` (YAML values)."""
    out: Dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not KEY=VALUE")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def parse_assignments(spec: str, what: str = "NAME=VALUE", noun: str = "values") -> Dict[str, str]:
    """``"a=x,b=y"`` -> ``{"a": "x", "b": "y"}`` (order kept); a name given twice or an item without
    ``=`` is an error."""
    out: Dict[str, str] = {}
    for item in [s for s in spec.split(",") if s.strip()]:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{item!r} is not {what}")
        if name.strip() in out:
            raise ValueError(f"{name.strip()!r} is given twice")
        out[name.strip()] = value.strip()
    if not out:
        raise ValueError(f"no {noun} given ({what},{what})")
    return out


def parse_numbers(spec: str) -> Dict[str, float]:
    """``"a=0.7,b=0.3"`` -> ``{"a": 0.7, "b": 0.3}``, naming a value that is not a number."""
    out = {}
    for k, v in parse_assignments(spec).items():
        try:
            out[k] = float(v)
        except ValueError:
            raise ValueError(f"{k}={v}: not a number") from None
    return out


def load_config(cls: type, path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Any:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (dotted keys)."""
    cfg = cls()
    if path:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        apply_overrides(cfg, loaded)
    if overrides:
        apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None})
    return cfg


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    return apply_overrides(cls(), values)


def describe(cfg: Any, prefix: str = "") -> List[str]:
    """One line per config field of ``cfg`` (a config class or instance): dotted key, default,
    documentation."""
    cfg = cfg() if isinstance(cfg, type) else cfg
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe(value, prefix + f.name + ".")
            continue
        lines.append(f"{prefix}{f.name} = {value!r}\n    {f.metadata.get('help', '')}")
    return lines
