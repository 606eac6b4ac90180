"""Opening the gateway's diskcache stores so that damage or a full disk never stops it.

Three stores are SQLite databases in diskcache directories: the tile cache, the host's
limiter and breaker state, and the download index. Each holds only what can be fetched or
learnt again, so when one is damaged the gateway starts it afresh instead of failing:

- :func:`open_diskcache` opens a store; when SQLite says the file is damaged (``file is not a
  database``, ``database disk image is malformed``), or an earlier run marked it damaged
  (:func:`mark_damaged`), it moves ``cache.db`` aside to ``cache.db.damaged`` (one copy, for
  a post-mortem), opens an empty store, removes the value files the old database pointed to,
  logs one WARNING line and counts it in ``gateway_store_rebuilds_total``. Opening holds an
  exclusive lock (``cache.db.lock``), so worker processes starting together rebuild once.
- :class:`WriteHealth` follows whether a store's disk accepts writes: it logs one line when
  writes start failing (disk full, read-only, damaged) and one when they work again.

SQLite result codes are from https://www.sqlite.org/rescode.html.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache

from gateway import metrics

log = logging.getLogger("gateway.storage")

DBNAME = diskcache.core.DBNAME
"""diskcache's database file name in its directory (``cache.db``)."""

SQLITE_READONLY, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB = 8, 11, 13, 26
"""Primary SQLite result codes (the low byte of extended codes)."""

STORE_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)
"""What a diskcache read or write raises when its disk or database fails."""


def _sqlite_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_damage(exc: BaseException) -> bool:
    """Whether ``exc`` says an SQLite file is damaged (corrupt, or not a database at all),
    as opposed to busy, full, read-only or closed."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = _sqlite_code(exc)
    if code is not None:
        return code in (SQLITE_CORRUPT, SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def failure_reason(exc: BaseException) -> str:
    """A short, path-free reason for a failed store access, for logs, ``/readyz`` and the
    ``reason`` label: ``disk-full``, ``read-only``, ``damaged``, ``busy`` or ``io-error``."""
    if is_damage(exc):
        return "damaged"
    code = _sqlite_code(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk-full"
    if code == SQLITE_FULL or "disk is full" in str(exc):
        return "disk-full"
    if (isinstance(exc, OSError) and exc.errno == errno.EROFS) or code == SQLITE_READONLY:
        return "read-only"
    if isinstance(exc, diskcache.Timeout) or "locked" in str(exc):
        return "busy"
    return "io-error"


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold ``directory/cache.db.lock`` exclusively (``flock``); diskcache's own consistency
    check leaves files whose name holds ``cache.db`` alone."""
    fd = os.open(directory / f"{DBNAME}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _marker(directory: Path) -> Path:
    return directory / f"{DBNAME}.rebuild"


def mark_damaged(directory: Path) -> None:
    """Record that the store in ``directory`` was found damaged while in use, so the next
    :func:`open_diskcache` rebuilds it (best effort: a full disk may refuse even this)."""
    with contextlib.suppress(OSError):
        _marker(directory).touch()


def open_diskcache(directory: Path, store: str, **settings: Any) -> diskcache.Cache:
    """Open (creating if needed) the diskcache in ``directory``, rebuilding it when damaged.

    Args:
        directory: the diskcache directory.
        store: ``tiles``, ``state`` or ``downloads``: names the store in the log line and
            the ``gateway_store_rebuilds_total`` label.
        settings: passed to :class:`diskcache.Cache` (``timeout``, ``size_limit``,
            ``eviction_policy``...).

    Raises:
        OSError: the directory cannot be created, or a damaged database cannot be moved.
        sqlite3.Error: the database fails for another reason than damage (locked, full...).
    """
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory):
        marked = _marker(directory).exists()
        if not marked:
            try:
                return diskcache.Cache(str(directory), **settings)
            except sqlite3.DatabaseError as exc:
                if not is_damage(exc):
                    raise
                why = str(exc)
        else:
            why = "marked damaged while in use"
        aside = directory / f"{DBNAME}.damaged"
        db = directory / DBNAME
        if db.exists():
            os.replace(db, aside)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (directory / f"{DBNAME}{suffix}").unlink()
        cache = diskcache.Cache(str(directory), **settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache.check(fix=True)  # the old database's value files: nothing points to them now
        _marker(directory).unlink(missing_ok=True)
    log.warning(
        "the %s store's database in %s was damaged (%s): moved it to %s and started an empty one",
        store,
        directory,
        why,
        aside.name,
    )
    metrics.STORE_REBUILDS.labels(store).inc()
    return cache


class WriteHealth:
    """Whether a store's disk accepts writes, as seen by this process's recent writes.

    :meth:`failed` and :meth:`succeeded` are called after each write; a change of state is
    logged once (WARNING when writes start failing, INFO when they work again) and shown by
    the ``gateway_cache_writable`` gauge (tiles only). Damage also marks the store for a
    rebuild at the next start (:func:`mark_damaged`).

    Args:
        store: the store's name, for the log.
        directory: the store's directory.
        gauge: set to 1 while writable, 0 while not (optional).
    """

    def __init__(self, store: str, directory: Path, gauge: Any = None) -> None:
        self.store, self.directory, self._gauge = store, directory, gauge
        self.ok = True
        self.reason = ""
        if gauge is not None:
            gauge.set(1)

    def failed(self, exc: BaseException, consequence: str) -> str:
        """A write (or a read that writes) failed with ``exc``; returns the reason.

        ``consequence`` completes the WARNING line ("serving tiles uncached").
        """
        reason = failure_reason(exc)
        if reason == "damaged":
            mark_damaged(self.directory)
        if self.ok or reason != self.reason:
            log.warning(
                "the %s store cannot write (%s): %s until it can", self.store, reason, consequence
            )
        self.ok, self.reason = False, reason
        if self._gauge is not None:
            self._gauge.set(0)
        return reason

    def succeeded(self) -> None:
        """A write worked: if writes were failing, say that they work again."""
        if not self.ok:
            self.ok, self.reason = True, ""
            log.info("the %s store writes again", self.store)
            if self._gauge is not None:
                self._gauge.set(1)
