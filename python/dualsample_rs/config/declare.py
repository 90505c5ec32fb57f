"""How a setting is declared: its type, default, range or choices, help and flag.

A setting is a field of one of `CoordinatorConfig`'s parts, declared with `setting()`.
From that one declaration come the part's checks (`check`), the docstrings
(`document`) and the flag of ``dualsample generate`` (`Flag`, read by the CLI), so a
default, a range or a help text is never written twice.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from ..exceptions import ConfigurationError

_SAME: Any = object()


@dataclass(frozen=True)
class Range:
    """The interval a number (or each number of a list) must lie in."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if math.isnan(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        if self.hi == math.inf and self.hi_open:
            return f"{'>' if self.lo_open else '>='} {_number(self.lo)}"
        if self.lo == -math.inf and self.lo_open:
            return f"{'<' if self.hi_open else '<='} {_number(self.hi)}"
        return f"{'(' if self.lo_open else '['}{_number(self.lo)}, {_number(self.hi)}{')' if self.hi_open else ']'}"


def _number(x: float) -> str:
    """Powers of two as such (2**64 reads better than its twenty digits)."""
    if isinstance(x, int) and abs(x) >= 1 << 20:
        near = abs(x) + 1 if (abs(x) + 1) & abs(x) == 0 else abs(x)
        if near & (near - 1) == 0:
            text = f"2**{near.bit_length() - 1}" + (" - 1" if near != abs(x) else "")
            return f"-{text}" if x < 0 else text
    return str(x)


@dataclass(frozen=True)
class Flag:
    """How ``dualsample generate`` sets a setting.

    A True/False setting's flag is a switch that gives the opposite of the default
    (``--no-...`` where the default is True). Several settings may name one flag (each
    then reads it through its own `convert`); the first one declares it.

    Args:
        name: the flag, e.g. ``"--alpha-tol"``.
        group: the section of ``--help`` it is listed in.
        text: parses the flag's text (default: the setting's own scalar type).
        default: the flag's value when not given, where it is not the setting's default.
        convert: (the flag's value, the setting's default) -> the setting's value.
        scale: the setting is the flag times this (an integer); e.g. bytes from MiB.
        syntax: how the flag is written, added to its help.
        metavar: the value's name in ``--help``.
        repeat: the flag may be given several times (a list of values).
    """

    name: str
    group: Literal["sampling", "servers"]
    text: Callable[[str], Any] | None = None
    default: Any = _SAME
    convert: Callable[[Any, Any], Any] | None = None
    scale: int = 1
    syntax: str = ""
    metavar: str | None = None
    repeat: bool = False

    @property
    def dest(self) -> str:
        """The attribute argparse stores the flag's value in."""
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Setting:
    """One declared setting (built from a part's field; see `setting`)."""

    name: str
    part: str
    hint: Any
    default: Any
    help: str
    doc: str = ""
    range: Range | None = None
    flag: Flag | None = None
    old: str | None = None
    check: Callable[[Any], str | None] | None = None
    normalize: Callable[[Any], Any] | None = None
    kernel: bool = False

    def flag_default(self) -> Any:
        """The flag's value when it is not given."""
        assert self.flag is not None
        if self.flag.default is not _SAME:
            return self.flag.default
        return self.default / self.flag.scale if self.flag.scale != 1 else self.default

    def from_flag(self, value: Any) -> Any:
        """The setting's value for the flag's parsed value."""
        assert self.flag is not None
        if self.flag.convert is not None:
            return self.flag.convert(value, self.default)
        if self.hint is bool:
            return (not self.default) if value else self.default
        if self.flag.scale != 1:
            return max(1, int(value * self.flag.scale))
        return value


def setting(
    default: Any,
    help: str,
    *,
    doc: str = "",
    range: Range | None = None,
    flag: Flag | None = None,
    old: str | None = None,
    check: Callable[[Any], str | None] | None = None,
    normalize: Callable[[Any], Any] | None = None,
    kernel: bool = False,
    secret: bool = False,
) -> Any:
    """Declare a field of a settings part (the field's annotation is its type).

    Args:
        default: its value when not given.
        help: one line, shown by ``--help`` and in the docstrings.
        doc: more for the docstrings only.
        range: the interval its numbers must lie in (default: any finite number).
        flag: how ``dualsample generate`` sets it (None: no flag).
        old: the keyword it had in earlier releases (still taken and readable flat).
        check: more checks; returns what is wrong, or None.
        normalize: brings an accepted spelling to the stored form, before any check.
        kernel: passed to ``SamplerConfig`` under this name.
        secret: never shown by ``repr``.
    """
    meta = {"help": help, "doc": doc, "range": range, "flag": flag, "old": old, "check": check,
            "normalize": normalize, "kernel": kernel}  # fmt: skip
    return field(default=default, repr=not secret, metadata={"setting": meta})


def declared(part: type, name: str) -> tuple[Setting, ...]:
    """The settings of a part class (a frozen dataclass of `setting()` fields), in order."""
    hints = typing.get_type_hints(part)
    return tuple(
        Setting(name=f.name, part=name, hint=hints[f.name], default=f.default, **f.metadata["setting"])
        for f in dataclasses.fields(part)
    )


def check(s: Setting, value: Any, name: str | None = None) -> Any:
    """`value` in the stored form, or `ConfigurationError` naming `name` (default: the
    setting's) with what was expected."""
    if isinstance(value, list):
        value = tuple(value)
    if s.normalize is not None:
        value = s.normalize(value)
    if not _matches(s.hint, value, s.range):
        raise ConfigurationError(f"{name or s.name}: expected {_describe(s.hint, s.range)}, got {value!r}")
    problem = s.check(value) if s.check is not None else None
    if problem is not None:
        raise ConfigurationError(f"{name or s.name}: {problem}")
    return value


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _matches(hint: Any, value: Any, rng: Range | None) -> bool:
    origin = get_origin(hint)
    if hint is type(None):
        return value is None
    if _is_union(hint):
        return any(_matches(h, value, rng) for h in get_args(hint))
    if origin is Literal:
        return isinstance(value, str) and value in get_args(hint)
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(args[0], v, rng) for v in value)
        return len(value) == len(args) and all(_matches(h, v, rng) for h, v in zip(args, value, strict=True))
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and (rng is None or value in rng)
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and (value in rng if rng is not None else math.isfinite(value))
    raise TypeError(f"no check for a setting of type {hint!r}")


def _describe(hint: Any, rng: Range | None) -> str:
    """What `_matches` accepts, in words."""
    if hint is type(None):
        return "None"
    if _is_union(hint):
        return " or ".join(_describe(h, rng) for h in get_args(hint))
    if get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_describe(args[0], rng)})"
        return f"a {len(args)}-tuple of ({_describe(args[0], rng)})"
    if hint is bool:
        return "True or False"
    if hint is str:
        return "a string"
    if hint is int:
        return "an integer" + (f" {_in(rng)}" if rng is not None else "")
    return f"a number {_in(rng)}" if rng is not None else "a finite number"


def _in(rng: Range) -> str:
    text = str(rng)
    return text if text[0] in "<>" else f"in {text}"


def scalar_type(hint: Any) -> tuple[Callable[[str], Any], tuple[str, ...] | None]:
    """The type a flag's text is read as, and its choices (for a Literal)."""
    options = [h for h in (get_args(hint) if _is_union(hint) else (hint,)) if h is not type(None)]
    if len(options) == 1 and get_origin(options[0]) is Literal:
        return str, tuple(get_args(options[0]))
    if len(options) == 1 and options[0] in (int, float, str):
        return options[0], None
    raise TypeError(f"a flag of a {hint!r} setting needs its own text parser")


def document(intro: str, settings: tuple[Setting, ...], flat: bool = False, lead: str = "") -> str:
    """A Google-style docstring: `intro`, then one Args entry per setting (after `lead`,
    an entry of its own). `flat`: also give each setting's earlier keyword."""
    lines = [intro.rstrip(), "", "Args:"] + ([f"    {lead}"] if lead else [])
    for s in settings:
        name = f"{s.name} (or {s.old})" if flat and s.old else s.name
        text = s.help + (f". {s.doc[0].upper()}{s.doc[1:]}" if s.doc else "")
        lines.append(f"    {name}: {text}" + ("" if text.endswith(".") else "."))
    return "\n".join(lines) + "\n"


def help_text(s: Setting) -> str:
    """``--help``'s line for a setting's flag."""
    assert s.flag is not None
    text = f"do not {s.help}" if s.hint is bool and s.default else s.help
    if s.flag.syntax:
        text += f"; {s.flag.syntax}"
    shown = s.default if s.flag.repeat else s.flag_default()
    if s.hint is not bool and shown is not None and not isinstance(shown, tuple):
        text += f" (default: {shown})"
    return text.replace("%", "%%")
