"""Configs own their command-line flags: each field declares its help once, argparse is generated.

A config is a frozen dataclass whose fields are made with ``opt(default, help)``; ``add_flags``
turns its fields into flags (``block_size`` -> ``--block-size``, a ``False`` bool -> a switch, a
``True`` bool -> ``--no-...``) with the default shown in ``--help``, and ``values_from_args`` reads
them back. Validation stays in the config's ``__post_init__``, so a flag and a Python keyword are
checked by the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable
from typing import Any


def opt(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    cli: bool = True,
    append: bool = False,
) -> Any:
    """A config field with its flag's help (``cli=False``: a Python-only field, e.g. for tests;
    ``append``: a repeatable flag collected into a tuple)."""
    meta = {"help": help, "flag": flag, "choices": choices, "parse": parse, "metavar": metavar, "cli": cli,
            "append": append}
    return dataclasses.field(default=default, metadata=meta)


def _flag_name(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    if f.default is True:
        return "--no-" + f.name.replace("_", "-")
    return "--" + f.name.replace("_", "-")


def _value_type(f: dataclasses.Field) -> Callable[[str], Any]:
    if f.metadata.get("parse"):
        return f.metadata["parse"]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        shown = "" if f.default is None or isinstance(f.default, bool) else f" (default: {_shown(f.default)})"
        # dest is namespaced by the config: a command's own flags (bench --seed) never collide
        kwargs: dict[str, Any] = {"dest": _dest(cls, f), "help": meta["help"] + shown}
        if isinstance(f.default, bool):
            kwargs["action"] = "store_false" if f.default else "store_true"
        elif meta.get("append"):
            kwargs.update(action="append", default=None, metavar=meta.get("metavar") or f.name.upper())
        else:
            kwargs.update(type=_value_type(f), default=f.default)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar") or not meta.get("choices"):  # choices show themselves
                kwargs["metavar"] = meta.get("metavar") or f.name.upper()
        parser.add_argument(_flag_name(f), **kwargs)


def _dest(cls: type, f: dataclasses.Field) -> str:
    return f"{cls.__name__}.{f.name}"


def _shown(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def values_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that ``args`` has (flags added by ``add_flags``)."""
    given = vars(args)
    values = {f.name: given[_dest(cls, f)] for f in dataclasses.fields(cls) if _dest(cls, f) in given}
    for f in dataclasses.fields(cls):
        if f.metadata.get("append") and values.get(f.name) is not None:
            values[f.name] = tuple(values[f.name])
    return values


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


def parse_bytes(value: str | int) -> int:
    """``"4GiB"``, ``"512MiB"``, ``"2G"``, ``1073741824`` -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid size {value!r}: use e.g. '512MiB', '4GiB', '2G' or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
