"""How constructors check their own options: :class:`OptionError` names the option that is wrong.

Every option of the package has one owner, the constructor that takes it (``ComposerMAE``, ``StreamingImageDataset``,
``MAGMA``...). The owner checks the value and raises :class:`OptionError` (a ``ValueError``) with the option's name;
the recipe reader (:mod:`magma_composer.config`) turns that into ``error: <section>.<option>: <message>``. The small
checkers below keep those messages uniform.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["OptionError", "check_choice", "check_int", "check_number"]


class OptionError(ValueError):
    """A bad option value: ``key`` is the option's name (a dotted path below its owner), ``message`` what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def check_int(key: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(key, f"expected an integer, got {value!r} ({type(value).__name__})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise OptionError(key, f"must be {_range(minimum, maximum, 'an integer')}, got {value}")
    return value


def check_number(
    key: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    open_min: bool = False,
    open_max: bool = False,
) -> float:
    """``value`` as a finite float in the range (bounds closed unless ``open_min`` / ``open_max``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(key, f"expected a finite number, got {value!r} ({type(value).__name__})")
    low_bad = minimum is not None and (value <= minimum if open_min else value < minimum)
    high_bad = maximum is not None and (value >= maximum if open_max else value > maximum)
    if low_bad or high_bad:
        lo = "" if minimum is None else f"{'(' if open_min else '['}{minimum}"
        hi = "" if maximum is None else f"{maximum}{')' if open_max else ']'}"
        where = f"in {lo}, {hi}" if minimum is not None and maximum is not None else _range(minimum, maximum, "")
        if minimum is not None and maximum is None:
            where = f"{'>' if open_min else '>='} {minimum}"
        elif maximum is not None and minimum is None:
            where = f"{'<' if open_max else '<='} {maximum}"
        raise OptionError(key, f"must be {where}, got {value}")
    return float(value)


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise OptionError(key, f"{value!r} is not valid; choose one of {', '.join(repr(c) for c in choices)}")
    return value


def check_list(key: str, value: Any, check: Callable[[str, Any], Any]) -> list:
    """``value`` (one item or a non-empty sequence of them) as a list, each item checked by ``check(key[i], item)``."""
    items = [value] if isinstance(value, (str, int, float)) else value
    try:
        items = list(items)
    except TypeError:
        raise OptionError(key, f"expected one value or a list of them, got {value!r}") from None
    if not items:
        raise OptionError(key, "must name at least one value")
    return [check(f"{key}[{i}]", item) for i, item in enumerate(items)]


def _range(minimum: int | None, maximum: int | None, what: str) -> str:
    if minimum is not None and maximum is not None:
        return f"{what} in [{minimum}, {maximum}]".strip()
    if minimum is not None:
        return f">= {minimum}"
    return f"<= {maximum}"
