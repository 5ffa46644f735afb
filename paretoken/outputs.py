"""Files the commands write, checked before the work that fills them: a bad path is one line that
names its flag, not a traceback (or a study overwritten) after minutes of measuring."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from paretoken.errors import ParetokenError

PLAN_SUFFIXES = (".yaml", ".yml", ".json")
PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".html")


def check_suffix(flag: str, path: str | Path, suffixes: Sequence[str]) -> str:
    """The suffix of ``path`` (lower case) when it is one of ``suffixes``; else a :class:`ParetokenError`
    naming ``flag``."""
    suffix = Path(path).suffix.lower()
    if suffix not in suffixes:
        raise ParetokenError(f"{flag}: {str(path)!r} has suffix {Path(path).suffix or '(none)'!r}; "
                             f"valid: a file ending in {', '.join(suffixes)}")
    return suffix


def check_output(flag: str, path: str | Path, suffixes: Sequence[str], storage: str | None = None) -> Path:
    """``path`` once a file ending in one of ``suffixes`` (any case) can be written there and it is not
    the file that ``storage`` (a study's URL) keeps its studies in. Nothing is left behind (folders
    made to try are removed; the writer makes them again). Otherwise a :class:`ParetokenError`
    naming ``flag`` (``out``, ``csv``, ...)."""
    path = Path(path)
    valid = f"a file ending in {', '.join(suffixes)}"
    check_suffix(flag, path, suffixes)
    if storage is not None:
        from paretoken.search.storage import storage_file

        kept = storage_file(storage)
        if kept is not None and path.resolve() == kept.resolve():
            raise ParetokenError(f"{flag}: {str(path)!r} is the study's storage; valid: {valid}, another file")
    if path.is_dir():
        raise ParetokenError(f"{flag}: {str(path)!r} is a folder; valid: {valid}")
    missing, folder = [], path.parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise ParetokenError(f"{flag}: cannot write {str(path)!r}: {str(folder)!r} is a file, not a folder; "
                             f"valid: {valid}")
    existed, made = path.exists(), []
    try:  # the real test (permissions, read-only disks, root): make it, then take back what was made
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
        with path.open("ab"):
            pass
    except OSError as exc:
        raise ParetokenError(f"{flag}: cannot write {str(path)!r} ({exc.strerror or exc}); valid: {valid} in a "
                             "folder that can be written") from None
    finally:
        if not existed and path.is_file():
            path.unlink()
        for folder in reversed(made):
            folder.rmdir()
    return path
