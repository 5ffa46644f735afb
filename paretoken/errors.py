"""The one exception type users see: a bad input, reported as a single line."""
from __future__ import annotations

from typing import Any


class ParetokenError(ValueError):
    """Bad user input (plan, model, data, checkpoint, storage).

    The message is one line that names the field, the bad value and the valid
    values. The CLI prints it to stderr and exits with status 2, no traceback.
    """


def integers(low: int, high: int | None = None) -> str:
    """The valid values of an integer range in words: ``low..high``, no upper end when ``high`` is None."""
    return f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"


def check_int(name: str, value: Any, low: int, high: int | None = None, note: str = "") -> int:
    """``value`` when it is an integer (not a bool) in ``low..high`` (no upper end when ``high`` is
    None); else a :class:`ParetokenError` naming ``name`` and the valid range, ``note`` (units, what
    the number counts) in brackets after it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ParetokenError(f"{name}: {value!r} is invalid; valid: {integers(low, high)}"
                             + (f" ({note})" if note else ""))
    return value
