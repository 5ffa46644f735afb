"""What the subcommands share on the command line: a parser whose errors are one line, and value
types that refuse a bad flag value by naming its valid values. Cheap to import (no torch)."""
from __future__ import annotations

import argparse
import math
from typing import Callable

from paretoken.errors import integers

MAX_SEED = 2**32 - 1  # the seed range of numpy's generators and Optuna's samplers


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit status 2 (the usage is
    in ``--help``); subparsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high`` (no upper end with ``high`` None)."""
    valid = integers(low, high)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; valid: {valid}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; valid: {valid}")
        return value

    return parse


def float_in(low: float = -math.inf, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number at least ``low`` (``above``: greater than ``low``)."""
    valid = "a finite number" + ("" if low == -math.inf else f" {'>' if above else '>='} {low:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; valid: {valid}") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; valid: {valid}")
        return value

    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
seed = int_in(0, MAX_SEED)
finite = float_in()
positive = float_in(0.0, above=True)
non_negative = float_in(0.0)
