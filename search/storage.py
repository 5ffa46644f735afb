"""Storage URLs of studies: SQLite (default), a journal file, PostgreSQL.

  sqlite:///studies/NAME.db      the default (relative to the working directory)
  journal:PATH                   an Optuna JournalStorage on a file (several processes on one host);
                                 journal:///ABS/PATH and journal://REL/PATH work too
  postgresql://USER@HOST/DB      PostgreSQL, passed to SQLAlchemy as is (a cluster)

Any other ``scheme://`` URL SQLAlchemy knows is passed through as well. A storage
that cannot be opened is one :class:`ParetokenError` line with the password hidden.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any

from paretoken.errors import ParetokenError

STUDIES_DIR = Path("studies")
JOURNAL_LOCK_GRACE_S = 5
MAX_HEARTBEAT_S = 86_400  # s; a running trial's heartbeat (a day: far longer overflows thread timers)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SQLITE = re.compile(r"sqlite(\+\w+)?://")  # sqlite:// and sqlite+DRIVER://, what follows names the database
_FORMS = "sqlite:///FILE.db, journal:FILE, postgresql://USER[:PASSWORD]@HOST[:PORT]/DB"


def check_study_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 200:
        raise ParetokenError(f"study: {name!r} is not a valid study name; valid: letters, digits, '_', '.', '-' "
                             "(starting with a letter or digit)")
    return name


def default_storage(study: str) -> str:
    """Where study ``study`` lives when no storage is given: ``sqlite:///studies/<study>.db``."""
    return f"sqlite:///{STUDIES_DIR / (check_study_name(study) + '.db')}"


def study_storage(study: str, storage: str | None) -> str:
    """``storage``, or where study ``study`` lives when it is None (:func:`default_storage`)."""
    return storage if storage is not None else default_storage(study)


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    return re.sub(r"(://[^:/@]+):.*@", r"\1:***@", url)  # up to the last @: a password may hold / or @


def journal_path(url: str) -> Path | None:
    """The file of a ``journal:`` URL, else None."""
    if not url.startswith("journal:"):
        return None
    rest = url[len("journal:"):]
    if rest.startswith("//"):
        rest = rest[2:]  # journal:///abs -> /abs, journal://rel -> rel
    if not rest:
        raise ParetokenError(f"storage: {url!r} names no file; valid: journal:PATH")
    return Path(rest)


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///FILE`` (or ``sqlite+DRIVER:///FILE``) URL, else None (also for an
    in-memory database)."""
    match = _SQLITE.match(url)
    if match is None or not url.startswith("/", match.end()):
        return None
    rest = url[match.end() + 1:].split("?", 1)[0]
    return None if rest in ("", ":memory:") else Path(rest)


def storage_file(url: str) -> Path | None:
    """The file a SQLite or journal URL keeps its studies in; None for a server."""
    return sqlite_path(url) or journal_path(url)


def _check_sqlite_file(path: Path, create: bool) -> None:
    """One-line error unless ``path`` is an Optuna SQLite database, or (``create``) an empty file:
    Optuna would add its tables to another program's database. Read without creating anything, but
    read-write where the file allows it: a process killed mid-write (SIGKILL) leaves a hot journal
    that SQLite must roll back before anyone can read the database."""
    import sqlite3

    mode = "rw" if os.access(path, os.W_OK) else "ro"
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise ParetokenError(f"storage: {str(path)!r} is not a SQLite database ({exc}); "
                             "valid: an Optuna study database" + (", or a new file" if create else "")) from None
    if "studies" in tables or (create and not tables):
        return
    what = "holds no Optuna studies" if not tables else "is another program's SQLite database (no Optuna tables)"
    raise ParetokenError(f"storage: {str(path)!r} {what}; valid: an Optuna study database"
                         + (", or a new file" if create else ""))


def _check_server_database(target: str, engine_kwargs: dict[str, Any], url: str) -> None:
    """One-line error unless the database at ``target`` (a server's, e.g. PostgreSQL) has Optuna's
    tables: a reader must not create them."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(target, **engine_kwargs)
    try:
        if not sqlalchemy.inspect(engine).has_table("studies"):
            raise ParetokenError(f"storage: {redact(url)} holds no Optuna studies; valid: a database a search "
                                 "has written")
    finally:
        engine.dispose()


def _check_journal_file(path: Path, create: bool) -> None:
    """One-line error unless ``path`` is empty or its first line is an Optuna journal record (a JSON
    object with an ``op_code``): Optuna would append its records to another file."""
    import json

    try:
        with path.open("rb") as file:
            first = file.readline(1 << 20)
    except OSError as exc:
        raise ParetokenError(f"storage: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    try:
        record = json.loads(first) if first.strip() else {"op_code": None}
    except ValueError:  # not JSON, not UTF-8
        record = None
    if isinstance(record, dict) and "op_code" in record:
        return
    raise ParetokenError(f"storage: {str(path)!r} is not an Optuna journal file; valid: a journal a search wrote"
                         + (", or a new or empty file" if create else ""))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"\(Background on this error at: [^)]*\)", "", text).strip()
    return (text[:240] or type(exc).__name__)


def _postgres_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3,
    while the project's extra installs psycopg2-binary."""
    scheme, rest = url.split("://", 1)
    if scheme not in ("postgresql", "postgres"):
        return url  # the user named a driver
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}"


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 stale_callback=None, create: bool = True):
    """An Optuna storage object for ``url``.

    RDB storages (SQLite, PostgreSQL) get Optuna's heartbeat when ``heartbeat_interval`` is given,
    with ``stale_callback(study, trial)`` called for each trial ``fail_stale_trials`` fails.
    ``create=False`` (readers): a SQLite or journal file must exist and hold studies already, and a
    server's database must have Optuna's tables (a reader creates none).
    A SQLite file of another program is refused rather than given Optuna's tables.
    Unreachable or malformed storage: one-line :class:`ParetokenError`.
    """
    import optuna

    if not isinstance(url, str) or not url.strip():
        raise ParetokenError(f"storage: {url!r} is not a storage URL; valid: {_FORMS}")
    journal = journal_path(url)
    path = storage_file(url)
    if create and url.startswith("sqlite") and path is None:
        match = _SQLITE.match(url)
        if match and url[match.end():].split("?", 1)[0] in ("", "/:memory:") or "mode=memory" in url:
            raise ParetokenError(f"storage: {url!r} is an in-memory database: the study would be lost when the "
                                 f"search ends; valid: {_FORMS}")
        raise ParetokenError(f"storage: {url!r} is not a storage URL; valid: {_FORMS}")
    if path is not None and path.exists() and not path.is_file():
        raise ParetokenError(f"storage: {str(path)!r} is not a file (from {redact(url)}); valid: {_FORMS}")
    if path is not None and not create and not path.exists():
        near = sorted(p.stem for p in path.parent.glob("*.db")) if path.parent.is_dir() else []
        hint = f"; studies beside it: {', '.join(near)}" if near else ""
        raise ParetokenError(f"storage: {str(path)!r} does not exist (from {redact(url)}){hint}")
    if path is not None and journal is None and path.exists():
        _check_sqlite_file(path, create)
    if journal is not None and journal.is_file():
        _check_journal_file(journal, create)
    target = url
    try:
        if journal is not None:
            from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage

            journal.parent.mkdir(parents=True, exist_ok=True)
            # the lock is held for one append (milliseconds); one older than JOURNAL_LOCK_GRACE_S was left by a
            # killed process and is broken (Optuna's default waits 30 s)
            lock = JournalFileSymlinkLock(str(journal), grace_period=JOURNAL_LOCK_GRACE_S)
            return JournalStorage(JournalFileBackend(str(journal), lock_obj=lock))
        if "://" not in url:
            raise ParetokenError(f"storage: {url!r} is not a storage URL; valid: {_FORMS}")
        engine_kwargs = {}
        if url.startswith("sqlite:"):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            engine_kwargs = {"connect_args": {"timeout": 60}}
        elif url.startswith(("postgresql", "postgres:")):
            engine_kwargs = {"pool_pre_ping": True}
            target = _postgres_driver(url)
        if not create and path is None:
            _check_server_database(target, engine_kwargs, url)
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # heartbeat arguments are "experimental"
                    return optuna.storages.RDBStorage(
                        target, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period, heartbeat_stale_trial_callback=stale_callback,
                        skip_table_creation=not create)
            except Exception as exc:  # noqa: BLE001
                # two processes creating Optuna's tables in an empty database at once: the loser sees
                # "already exists" / a unique violation; the tables exist now, so try again
                text = str(exc).lower()
                if attempt == 4 or not any(k in text for k in ("already exists", "duplicate key", "unique")):
                    raise
                time.sleep(0.5 + random.random())
    except ParetokenError:
        raise
    except Exception as exc:  # unreachable server, bad URL, unwritable file, missing driver
        raise ParetokenError(f"storage: cannot open {redact(url)} ({_one_line(exc)})") from None
