"""Checking user values against Python type hints: the one validator behind pass parameters
(a pass's keyword-only signature is its YAML schema), quantization spec fields and CLI numbers.

Supported hints: ``bool``, ``int`` (a bool is not an int here), ``float`` (an int is a float;
NaN and Inf are refused), ``str``, ``list``/``tuple`` (``list[X]`` checks items), ``dict``
(``dict[str, X]`` checks values), ``None``, unions (``X | None``), ``Literal[...]``, ``Any``,
and ``Annotated[T, Range(...)]`` for numeric bounds.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Annotated, Literal, Union

from qgraph.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Numeric bounds: ``lo <= value <= hi`` (strict with `lo_open` / `hi_open`)."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
        return " and ".join(parts)


def check_value(value: Any, hint: Any, where: str) -> None:
    """Raise ConfigError naming `where` unless `value` fits `hint`."""
    problem = _problem(value, hint)
    if problem:
        raise ConfigError(f"{where} must be {problem}, got {_show(value)}")


def describe(hint: Any) -> str:
    """A phrase for `hint` ("an integer >= 1", "true or false", ...)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return "any value"
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        ranges = [e.describe() for e in extras if isinstance(e, Range)]
        return describe(base) + (" " + " and ".join(ranges) if ranges else "")
    if origin in (Union, types.UnionType):
        options = [describe(a) for a in typing.get_args(hint) if a is not type(None)]
        none = type(None) in typing.get_args(hint)
        return " or ".join(options) + (" or null" if none else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    base = origin or hint
    args = typing.get_args(hint)
    if base in (list, tuple) and args and args[0] is not Ellipsis:
        return f"a list whose items are each {describe(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list", dict: "a mapping"}.get(base, getattr(base, "__name__", str(base)))


def _problem(value: Any, hint: Any) -> str | None:
    """None if `value` fits `hint`, else the phrase of what was expected."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        problem = _problem(value, base)
        if problem:
            return describe(hint)
        for extra in extras:
            if isinstance(extra, Range) and value is not None and not extra.contains(value):
                return describe(hint)
        return None
    if origin in (Union, types.UnionType):
        if any(_problem(value, option) is None for option in typing.get_args(hint)):
            return None
        return describe(hint)
    if origin is Literal:
        return None if value in typing.get_args(hint) else describe(hint)
    if hint is type(None) or hint is None:
        return None if value is None else "null"
    base = origin or hint
    if base is bool:
        return None if isinstance(value, bool) else describe(hint)
    if base is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else describe(hint)
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if base is str:
        return None if isinstance(value, str) else describe(hint)
    if base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return describe(hint)
        args = typing.get_args(hint)
        if args and args[0] is not Ellipsis:
            for item in value:
                if _problem(item, args[0]):
                    return f"a list whose items are each {describe(args[0])}"
        return None
    if base is dict:
        if not isinstance(value, dict):
            return describe(hint)
        args = typing.get_args(hint)
        if len(args) == 2:
            for key, item in value.items():
                if _problem(key, args[0]) or _problem(item, args[1]):
                    return f"a mapping from {describe(args[0])} to {describe(args[1])}"
        return None
    if isinstance(base, type):
        return None if isinstance(value, base) else describe(hint)
    return None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
