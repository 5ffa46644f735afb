"""Keep docs/cli.md equal to the command's own ``--help``.

    python scripts/cli_docs.py            # rewrite the help blocks of docs/cli.md in place
    python scripts/cli_docs.py --check    # exit 1, naming the stale sections, if it is out of date

docs/cli.md has a section ``## paretoken`` and one ``## paretoken <command>`` per subcommand; the
first fenced ``text`` block of each section is that command's ``--help`` rendered at
:data:`WIDTH` columns. Rewriting replaces only those blocks, so the prose around them stays; a
subcommand without a section gets one appended, with its one-line help as prose.
tests/test_docs.py imports this module, so the parser is built in one place: :func:`build_parser`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path

CLI_MD = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
WIDTH = 100  # columns the help is rendered at (argparse reads $COLUMNS)
_SECTION = re.compile(r"^## (paretoken(?: [a-z][a-z0-9-]*)?)[ \t]*$", re.M)
_BLOCK = re.compile(r"^```text\n(.*?)^```$", re.M | re.S)


def build_parser() -> argparse.ArgumentParser:
    """The real ``paretoken`` parser, as ``paretoken`` builds it."""
    from paretoken.cli import build_parser as paretoken_parser

    return paretoken_parser()


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@contextlib.contextmanager
def _fixed_terminal():
    """$COLUMNS at :data:`WIDTH` and colour off while help is rendered; the environment restored after."""
    fixed = {"COLUMNS": str(WIDTH), "LINES": "50", "PYTHON_COLORS": "0", "NO_COLOR": "1"}
    saved = {name: os.environ.get(name) for name in fixed}
    os.environ.update(fixed)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def help_texts(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """``{"paretoken": its --help, "paretoken <command>": its --help, ...}`` in the parser's order,
    each rendered at :data:`WIDTH` columns, without trailing blanks."""
    parser = parser or build_parser()
    commands = _subparsers(parser).choices
    with _fixed_terminal():
        texts = {"paretoken": parser.format_help()}
        texts.update({f"paretoken {name}": sub.format_help() for name, sub in commands.items()})
    return {name: "\n".join(line.rstrip() for line in text.strip("\n").splitlines()) + "\n"
            for name, text in texts.items()}


def summaries(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """Each subcommand's one-line help (``paretoken --help`` lists them), keyed as :func:`help_texts`."""
    parser = parser or build_parser()
    return {f"paretoken {action.dest}": action.help or "" for action in _subparsers(parser)._choices_actions}


def sections(text: str) -> dict[str, tuple[int, int, str]]:
    """The sections of a cli.md text: heading -> (start, end, body) of the first ``text`` block in
    that section (character offsets of the block's body); sections without a block are left out."""
    heads = list(_SECTION.finditer(text))
    found = {}
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        block = _BLOCK.search(text, head.end(), end)
        if block:
            found[head.group(1)] = (block.start(1), block.end(1), block.group(1))
    return found


def rewrite(text: str, helps: dict[str, str], notes: dict[str, str] | None = None) -> str:
    """``text`` with each section's block replaced by ``helps[section]``; sections ``helps`` has and
    ``text`` lacks are appended, with ``notes[section]`` (a line of prose) above the block."""
    found = sections(text)
    for name, (start, end, _) in sorted(found.items(), key=lambda item: -item[1][0]):
        if name in helps:
            text = text[:start] + helps[name] + text[end:]
    for name in helps:
        if name not in found:
            prose = (notes or {}).get(name, "")
            text = text.rstrip("\n") + f"\n\n## {name}\n\n" + (f"{prose}.\n\n" if prose else "") \
                + f"```text\n{helps[name]}```\n"
    return text


def stale(text: str, helps: dict[str, str]) -> list[str]:
    """Sections of ``text`` that are missing or differ from ``helps``, and sections of no command."""
    found = sections(text)
    return ([name for name in helps if found.get(name, (0, 0, None))[2] != helps[name]]
            + [name for name in found if name not in helps])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rewrite docs/cli.md's help blocks from `paretoken --help`.")
    parser.add_argument("--check", action="store_true", help="only report stale sections (exit 1 if any)")
    args = parser.parse_args(argv)
    command = build_parser()
    helps = help_texts(command)
    text = CLI_MD.read_text(encoding="utf-8")
    if args.check:
        bad = stale(text, helps)
        for name in bad:
            print(f"docs/cli.md: section '## {name}' is stale or has no command", file=sys.stderr)
        return 1 if bad else 0
    new = rewrite(text, helps, summaries(command))
    if new != text:
        CLI_MD.write_text(new, encoding="utf-8")
        print(f"rewrote {CLI_MD}")
    for name in stale(new, helps):
        print(f"docs/cli.md: section '## {name}' names no command; remove it by hand", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
