"""Bounds and choices declared on a setting's own field, checked in one place.

A settings dataclass (``DkimSettings``, ``DmarcSettings``...) declares each bounded setting with
:func:`bounded` or :func:`one_of` and calls :func:`validate` from ``__post_init__``, so a value out
of bounds is refused wherever the settings are built. config.py reads the same declarations
(:func:`bounds_of`, :func:`choices_of`) to refuse a bad key at load time with its file and line:
each bound is written once, beside the setting.
"""

from __future__ import annotations

from dataclasses import Field, field, fields
from enum import Enum
from typing import Any

_RANGE = "authmilter.range"
_CHOICES = "authmilter.choices"


def bounded(default: Any, low: float, high: float) -> Any:
    """A numeric field whose value must lie in ``[low, high]``."""
    return field(default=default, metadata={_RANGE: (low, high)})


def one_of(default: Any, choices: frozenset[str]) -> Any:
    """A field whose value (an enum's value for an enum) must be one of ``choices``."""
    return field(default=default, metadata={_CHOICES: choices})


def _field(cls: type[Any], name: str) -> Field[Any] | None:
    return next((f for f in fields(cls) if f.name == name), None)


def bounds_of(cls: type[Any], name: str) -> tuple[float, float] | None:
    """The declared ``(low, high)`` of a settings field, or None."""
    declared = _field(cls, name)
    return None if declared is None else declared.metadata.get(_RANGE)


def choices_of(cls: type[Any], name: str) -> frozenset[str] | None:
    """The declared choices of a settings field, or None."""
    declared = _field(cls, name)
    return None if declared is None else declared.metadata.get(_CHOICES)


def range_problem(value: float, bounds: tuple[float, float]) -> str:
    """Why ``value`` is out of ``bounds``, or "" when it is within them."""
    low, high = bounds
    return "" if low <= value <= high else f"{value} is out of range ({low:g} to {high:g})"


def choice_problem(value: Any, choices: frozenset[str]) -> str:
    """Why ``value`` is not one of ``choices``, or "" when it is."""
    plain = value.value if isinstance(value, Enum) else value
    return "" if plain in choices else f"'{plain}' is not one of: {', '.join(sorted(choices))}"


def validate(settings: Any) -> None:
    """Check every declared bound and choice of a settings dataclass instance.

    Raises:
        ValueError: naming the first field out of bounds, e.g. ``max_signatures: 0 is out of
            range (1 to 50)``.
    """
    for declared in fields(settings):
        value = getattr(settings, declared.name)
        bounds = declared.metadata.get(_RANGE)
        choices = declared.metadata.get(_CHOICES)
        problem = (range_problem(value, bounds) if bounds else "") or (
            choice_problem(value, choices) if choices else ""
        )
        if problem:
            raise ValueError(f"{declared.name}: {problem}")
