"""What every config section is made of: fields with allowed values and ranges, the type rules a
YAML value must follow, and the one error they all raise.

Kept apart from the sections themselves (`config_schema`, the model families' configs) so every
one of them can use it without importing another, and without importing JAX.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing


class ConfigError(ValueError):
    """Bad user input: the message names the key or file and what was expected."""


def choices(*values):
    """Field metadata: the value must be one of `values`."""
    return {"choices": values}


def bounds(lo=None, hi=None, exclusive=False):
    """Field metadata: lo <= value <= hi (None: no bound); lo < value < hi when `exclusive`."""
    return {"min": lo, "max": hi, "exclusive": exclusive}


def check_field(key: str, value, meta) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{key}: {value!r} is not one of: {allowed}")
    lo, hi = meta.get("min"), meta.get("max")
    if meta.get("exclusive") and ((lo is not None and value <= lo)
                                  or (hi is not None and value >= hi)):
        raise ConfigError(f"{key}: {value!r} is out of range; expected a value strictly "
                          + " and ".join(([f"above {lo}"] if lo is not None else [])
                                         + ([f"below {hi}"] if hi is not None else [])))
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is above the maximum {hi}")


def check_positive_int(name: str, value) -> None:
    """For options passed in code (not config fields): a positive int, not a bool."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: expected a positive int")


def check_fields(obj, prefix: str = "") -> None:
    """Every field of a (nested) config dataclass against its metadata."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{prefix}{f.name}.")
        else:
            check_field(f"{prefix}{f.name}", value, f.metadata)


def type_name(tp) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string",
             list: "a list", type(None): "null"}
    args = typing.get_args(tp)
    if args:
        return " or ".join(type_name(a) for a in args)
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value, tp, key: str, source: str):
    """`value` as type `tp` (an int is accepted for a float), or one error naming the key."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
        or (tp is list and isinstance(value, list))
    )
    if not ok:
        raise ConfigError(f"{source}: {key}: expected {type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value
