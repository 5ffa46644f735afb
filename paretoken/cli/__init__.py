"""The `paretoken` command. Bad input is one line on stderr and exit status 2.

One subcommand module per kind of work: :mod:`~paretoken.cli.plans` (presets, flops, eval, slim: one
plan on one model), :mod:`~paretoken.cli.search` (search, spaces) and :mod:`~paretoken.cli.results`
(front, holdout, export, finetune: what a study gives); the flags they share are defined once in
:mod:`~paretoken.cli.flags`. Importing the package, and ``paretoken --help``, need no torch.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from paretoken import argtypes
from paretoken.cli.plans import add_plan_parsers
from paretoken.cli.results import add_results_parsers
from paretoken.cli.search import add_search_parser, add_spaces_parser
from paretoken.errors import ParetokenError


def build_parser() -> argparse.ArgumentParser:
    """The whole `paretoken` parser, every subcommand on it (each sets ``func``, its handler)."""
    parser = argtypes.Parser(
        prog="paretoken", description="Search the Pareto front of token-compression plans for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_plan_parsers(sub)
    add_search_parser(sub)
    add_spaces_parser(sub)
    add_results_parsers(sub)
    return parser


def subcommands(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser by name, in the order `paretoken --help` lists them (of ``parser``,
    default :func:`build_parser`'s): ``subcommands()["search"].format_help()`` is `paretoken search --help`."""
    parser = parser or build_parser()
    return next(dict(action.choices) for action in parser._actions
                if isinstance(action, argparse._SubParsersAction))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="fvcore")
    try:
        return args.func(args)
    except ParetokenError as err:
        print(f"paretoken: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paretoken: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:  # an output path that cannot be written, a disk that is full, ...
        where = f": {err.filename}" if err.filename else ""
        print(f"paretoken: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main", "subcommands"]
