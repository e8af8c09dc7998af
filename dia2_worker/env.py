"""The worker's settings from environment variables: one way to read a number, a flag or a text, and one
error that names the variable and what it accepts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})

N = TypeVar("N", int, float)


class WorkerConfigError(ValueError):
    """An environment variable holds a value the worker cannot run with; the message names it."""


@dataclass(frozen=True)
class Range:
    """Bounds of a number, inclusive unless `lo_open`; describes itself for error messages."""

    lo: int | float
    hi: int | float = math.inf
    lo_open: bool = False

    def __contains__(self, value: int | float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        return above and value <= self.hi

    def describe(self) -> str:
        lo, hi = show_number(self.lo), show_number(self.hi)
        low = f"greater than {lo}" if self.lo_open else f"at least {lo}"
        if self.hi == math.inf:
            return low
        return f"{low} and at most {hi}" if self.lo_open else f"between {lo} and {hi}"


def show_number(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def env_text(env: Mapping[str, str], name: str) -> str | None:
    """The variable without surrounding whitespace; None when unset or blank."""
    return env.get(name, "").strip() or None


def env_number(env: Mapping[str, str], name: str, kind: type[N], allowed: Range, default: N | None,
               note: str = "") -> N | None:
    """The variable as an int or a finite float within `allowed`; `default` when unset or blank."""
    text = env_text(env, name)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value not in allowed:
        what = "an integer" if kind is int else "a number"
        raise WorkerConfigError(f"{name}: must be {what} {allowed.describe()}{note}, got {text!r}")
    return value


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = (env_text(env, name) or "").lower()
    if not text:
        return default
    if text not in TRUE | FALSE:
        raise WorkerConfigError(f"{name}: must be true or false, got {text!r}")
    return text in TRUE


def env_auto_flag(env: Mapping[str, str], name: str) -> bool | None:
    """A flag that may also be `auto` (the default, None): the worker decides."""
    text = (env_text(env, name) or "auto").lower()
    if text != "auto" and text not in TRUE | FALSE:
        raise WorkerConfigError(f"{name}: must be auto, true or false, got {text!r}")
    return None if text == "auto" else text in TRUE
