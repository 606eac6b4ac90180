"""The download store: completed clip files on disk, an index, LRU eviction, crash recovery.

Layout under ``directory``:

- ``files/<name>.tif``: complete files only. ``<name>`` is a hash of job id and mosaic type,
  so no client-supplied text ever becomes a path.
- ``tmp/<pid>-<start>-<random>.part``: transfers in progress, named after the writing
  process and its start time (so a restarted container whose new process has the same pid
  still recognises its predecessor's files as abandoned). A file is moved into ``files/`` with an
  atomic rename only after it is complete, flushed and its size checked.
- ``index/``: a diskcache (process-safe) of :class:`StoredFile` records (with each file's
  SHA-256, computed while it streamed in) and of what is known about jobs: their file
  descriptors, their project and their tile rendering parameters.

Eviction removes the least recently served files once the total passes ``size_limit_bytes``.
Removing is an unlink: a reader that already opened the file keeps reading it to the end
(POSIX keeps the data until the last descriptor closes), and files this process is serving
are skipped. At start, :func:`remove_interrupted` deletes the temporary files of dead
processes before anything else opens (on a full disk they are what fills it), then
:meth:`DownloadStore.recover` makes the index and ``files/`` agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.storage.claims import Claims, owner_alive
from gateway.storage.diskcaches import open_diskcache

log = logging.getLogger("gateway.downloads")

CLAIM_S = 6 * 3600
"""Longest a transfer claim lasts, seconds; a claim whose process died is taken over at once."""

DESCRIPTORS_TTL_S = 3600
"""How long the file list (and the tile info) of a completed job is reused, seconds."""

PROJECT_TTL_S = 30 * 86400
"""How long a job's project is remembered, seconds (it never changes; the limit only keeps
the index from growing without end)."""


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One complete file.

    Attributes:
        path: where it is.
        size: bytes.
        filename: the sanitised download name (for Content-Disposition).
        content_type: media type, ``image/tiff``.
        mtime_ns: its modification time, nanoseconds; fixed when stored and part of the ETag.
        sha256: hex SHA-256 of the file, computed while it streamed in; None for a file
            stored by a gateway version that did not compute it (see
            :meth:`DownloadStore.checksum`).
    """

    path: Path
    size: int
    filename: str
    content_type: str
    mtime_ns: int
    sha256: str | None = None

    @property
    def etag(self) -> str:
        """Strong ETag, the same formula aiohttp's FileResponse uses: ``"<mtime_ns>-<size>"``
        in hex, so streamed and stored answers for one file carry one validator."""
        return file_etag(self.mtime_ns, self.size)


def file_etag(mtime_ns: int, size: int) -> str:
    """``"<mtime_ns hex>-<size hex>"`` (quoted, strong)."""
    return f'"{mtime_ns:x}-{size:x}"'


def remove_interrupted(directory: Path) -> int:
    """Delete the ``tmp/*.part`` files of processes that no longer run; returns how many.

    Touches no index, so it works on a full disk and runs before anything is opened.
    """
    removed = 0
    for part in (directory / "tmp").glob("*.part"):
        owner = part.name.rsplit("-", 1)[0]
        if not owner_alive(owner):
            part.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d interrupted transfer(s) left by stopped processes", removed)
    return removed


class DownloadStore:
    """Complete clip files by (job id, mosaic type).

    Args:
        directory: root of the store (created if missing).
        size_limit_bytes: total size of ``files/`` above which LRU files are evicted.

    Raises:
        OSError: the directories cannot be created.
    """

    def __init__(self, directory: Path, size_limit_bytes: int) -> None:
        self.directory = directory
        self.size_limit_bytes = size_limit_bytes
        self.files_dir = directory / "files"
        self.tmp_dir = directory / "tmp"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # a damaged index is started empty; recover() then drops the files it no longer lists
        self._index = open_diskcache(directory / "index", "downloads", eviction_policy="none")
        self._serving: Counter[str] = Counter()
        self.claims = Claims(self._index)

    def close(self) -> None:
        """Close the index."""
        self._index.close()

    @staticmethod
    def _name(job_id: str, mosaic_type: str) -> str:
        return hashlib.sha256(f"{job_id}\0{mosaic_type}".encode()).hexdigest()[:40]

    def lookup(self, job_id: str, mosaic_type: str) -> StoredFile | None:
        """The complete file, or None; counts as a use for LRU eviction."""
        name = self._name(job_id, mosaic_type)
        record = self._index.get(("file", name))
        if record is None:
            return None
        stored = self._record_to_file(record)
        if not stored.path.is_file():
            self._index.delete(("file", name))
            return None
        try:  # recency for LRU eviction is best effort: a full disk must not hide the file
            self._index.set(("file", name), {**record, "used": time.time()})
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not record a download's use: %s", type(exc).__name__)
        return stored

    def peek(self, job_id: str, mosaic_type: str) -> StoredFile | None:
        """The complete file's record, or None, without counting a use (for listings)."""
        record = self._index.get(("file", self._name(job_id, mosaic_type)))
        return None if record is None else self._record_to_file(record)

    def checksum(self, job_id: str, mosaic_type: str, stored: StoredFile) -> str:
        """The hex SHA-256 of a stored file: the one computed while it streamed in, else
        (a file stored by an older version) computed now from the file and recorded.
        Blocking (reads the whole file in that case).

        Raises:
            OSError: the file cannot be read.
        """
        if stored.sha256 is not None:
            return stored.sha256
        digest = hashlib.sha256()
        with open(stored.path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        hexdigest = digest.hexdigest()
        key = ("file", self._name(job_id, mosaic_type))
        record = self._index.get(key)
        if record is not None and record["mtime_ns"] == stored.mtime_ns:
            self._index.set(key, {**record, "sha256": hexdigest})
        return hexdigest

    def _record_to_file(self, record: dict[str, Any]) -> StoredFile:
        return StoredFile(
            self.files_dir / f"{record['name']}.tif",
            record["size"],
            record["filename"],
            record["content_type"],
            record["mtime_ns"],
            record.get("sha256"),
        )

    def free_bytes(self) -> int:
        """Bytes free for this process on the store's file system (``statvfs``)."""
        stats = os.statvfs(self.tmp_dir)
        return stats.f_bavail * stats.f_frsize

    def temp_path(self) -> Path:
        """A new temporary path in ``tmp/`` named after this process
        (:func:`~gateway.storage.claims.process_tag`)."""
        return self.tmp_dir / f"{self.claims.owner}-{uuid.uuid4().hex}.part"

    def commit(
        self,
        tmp: Path,
        job_id: str,
        mosaic_type: str,
        *,
        filename: str,
        content_type: str,
        mtime_ns: int,
        sha256: str | None = None,
    ) -> StoredFile:
        """Move a complete, flushed temporary file into place and index it, with its hex
        SHA-256 when known.

        The file's mtime is set to ``mtime_ns`` first, so its ETag is the one already sent
        to the clients that streamed it. Then older files are evicted past the size limit.
        """
        name = self._name(job_id, mosaic_type)
        final = self.files_dir / f"{name}.tif"
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, final)
        size = final.stat().st_size
        record = {
            "name": name,
            "size": size,
            "filename": filename,
            "content_type": content_type,
            "mtime_ns": mtime_ns,
            "sha256": sha256,
            "used": time.time(),
        }
        try:
            self._index.set(("file", name), record)
        except BaseException:
            final.unlink(missing_ok=True)  # never a file the index does not know
            raise
        self.evict()
        return self._record_to_file(record)

    def serving(self, stored: StoredFile) -> contextlib.AbstractContextManager[None]:
        """Context manager marking ``stored`` as being served by this process."""
        return _Serving(self._serving, stored.path.stem)

    def evict(self) -> int:
        """Remove least recently used files until the total fits; returns bytes freed."""
        records = [
            r
            for k in self._index.iterkeys()
            if isinstance(k, tuple) and k[0] == "file" and (r := self._index.get(k)) is not None
        ]
        total = sum(r["size"] for r in records)
        freed = 0
        for record in sorted(records, key=lambda r: r["used"]):
            if total <= self.size_limit_bytes:
                break
            if self._serving[record["name"]]:
                continue
            self._index.delete(("file", record["name"]))
            with contextlib.suppress(FileNotFoundError):
                (self.files_dir / f"{record['name']}.tif").unlink()
            total -= record["size"]
            freed += record["size"]
            log.info(
                "evicted a %d-byte download to stay under %d bytes",
                record["size"],
                self.size_limit_bytes,
            )
        return freed

    def total_bytes(self) -> int:
        """Bytes of complete files indexed."""
        return sum(
            r["size"]
            for k in self._index.iterkeys()
            if isinstance(k, tuple) and k[0] == "file" and (r := self._index.get(k))
        )

    def recover(self) -> None:
        """Clean up after a crash: temporary files of dead processes, index entries without a
        file, and files without an index entry (a crash between rename and index)."""
        remove_interrupted(self.directory)
        indexed = set()
        for key in list(self._index.iterkeys()):
            if isinstance(key, tuple) and key[0] == "file":
                if (self.files_dir / f"{key[1]}.tif").is_file():
                    indexed.add(key[1])
                else:
                    self._index.delete(key)
        for path in self.files_dir.glob("*.tif"):
            if path.stem not in indexed:
                path.unlink(missing_ok=True)

    def claim(self, job_id: str, mosaic_type: str) -> bool:
        """Claim the transfer of a file for this process (cross-process single-flight,
        :class:`~gateway.storage.claims.Claims`); False when another live process holds it."""
        return self.claims.claim(self._name(job_id, mosaic_type), CLAIM_S)

    def claimed(self, job_id: str, mosaic_type: str) -> bool:
        """Whether a live process holds the claim on this file."""
        return self.claims.held(self._name(job_id, mosaic_type))

    async def wait_for_transfer(
        self, job_id: str, mosaic_type: str, poll_s: float
    ) -> StoredFile | None:
        """Wait while another process transfers this file; the stored file, or None when
        its claim ended without one (or after :data:`CLAIM_S`)."""
        return await self.claims.wait(
            self._name(job_id, mosaic_type),
            lambda: self.lookup(job_id, mosaic_type),
            CLAIM_S,
            poll_s,
        )

    def release(self, job_id: str, mosaic_type: str) -> None:
        """Drop this process's claim on the file (never another process's)."""
        self.claims.release(self._name(job_id, mosaic_type))

    def descriptors(self, job_id: str) -> list[dict[str, Any]] | None:
        """The cached file list of a completed job, or None."""
        value = self._index.get(("descriptors", job_id))
        return value if isinstance(value, list) else None

    def remember_descriptors(self, job_id: str, descriptors: list[dict[str, Any]]) -> None:
        """Cache a completed job's file list for :data:`DESCRIPTORS_TTL_S` seconds."""
        self._index.set(("descriptors", job_id), descriptors, expire=DESCRIPTORS_TTL_S)

    def project(self, job_id: str) -> str | None:
        """The remembered project of a job, or None when it is not known here."""
        value = self._index.get(("project", job_id))
        return value if isinstance(value, str) else None

    def remember_project(self, job_id: str, project_id: str) -> None:
        """Remember a job's project (for :data:`PROJECT_TTL_S` seconds)."""
        if self._index.get(("project", job_id)) != project_id:
            self._index.set(("project", job_id), project_id, expire=PROJECT_TTL_S)

    def tile_info(self, job_id: str) -> dict[str, Any] | None:
        """The cached tile rendering parameters of a completed job, or None."""
        value = self._index.get(("tile-info", job_id))
        return value if isinstance(value, dict) else None

    def remember_tile_info(self, job_id: str, info: dict[str, Any]) -> None:
        """Cache a completed job's tile rendering parameters for :data:`DESCRIPTORS_TTL_S`."""
        self._index.set(("tile-info", job_id), info, expire=DESCRIPTORS_TTL_S)


class _Serving(contextlib.AbstractContextManager[None]):
    def __init__(self, counter: Counter[str], name: str) -> None:
        self._counter, self._name = counter, name

    def __enter__(self) -> None:
        self._counter[self._name] += 1

    def __exit__(self, *exc: object) -> None:
        self._counter[self._name] -= 1
