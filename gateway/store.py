"""The download store: completed clip files on disk, an index, LRU eviction, crash recovery.

Layout under ``directory``:

- ``files/<name>.tif``: complete files only. ``<name>`` is a hash of job id and mosaic type,
  so no client-supplied text ever becomes a path.
- ``tmp/<pid>-<random>.part``: transfers in progress. A file is moved into ``files/`` with an
  atomic rename only after it is complete, flushed and its size checked.
- ``index/``: a diskcache (process-safe) of :class:`StoredFile` records and of job descriptors.

Eviction removes the least recently served files once the total passes ``size_limit_bytes``.
Removing is an unlink: a reader that already opened the file keeps reading it to the end
(POSIX keeps the data until the last descriptor closes), and files this process is serving
are skipped. At start, :meth:`DownloadStore.recover` deletes temporary files of dead processes
and makes the index and ``files/`` agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.diskcaches import open_diskcache

log = logging.getLogger("gateway.downloads")

CLAIM_S = 6 * 3600
"""Longest a transfer claim lasts if its process never releases it, seconds."""

DESCRIPTORS_TTL_S = 3600
"""How long the file list of a completed job is reused, seconds."""


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One complete file.

    Attributes:
        path: where it is.
        size: bytes.
        filename: the sanitised download name (for Content-Disposition).
        content_type: media type, ``image/tiff``.
        mtime_ns: its modification time, nanoseconds; fixed when stored and part of the ETag.
    """

    path: Path
    size: int
    filename: str
    content_type: str
    mtime_ns: int

    @property
    def etag(self) -> str:
        """Strong ETag, the same formula aiohttp's FileResponse uses: ``"<mtime_ns>-<size>"``
        in hex, so streamed and stored answers for one file carry one validator."""
        return file_etag(self.mtime_ns, self.size)


def file_etag(mtime_ns: int, size: int) -> str:
    """``"<mtime_ns hex>-<size hex>"`` (quoted, strong)."""
    return f'"{mtime_ns:x}-{size:x}"'


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        self._index.set(("file", name), {**record, "used": time.time()})
        return stored

    def _record_to_file(self, record: dict[str, Any]) -> StoredFile:
        return StoredFile(
            self.files_dir / f"{record['name']}.tif",
            record["size"],
            record["filename"],
            record["content_type"],
            record["mtime_ns"],
        )

    def temp_path(self) -> Path:
        """A new temporary path in ``tmp/`` named after this process."""
        return self.tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}.part"

    def commit(
        self,
        tmp: Path,
        job_id: str,
        mosaic_type: str,
        *,
        filename: str,
        content_type: str,
        mtime_ns: int,
    ) -> StoredFile:
        """Move a complete, flushed temporary file into place and index it.

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
            "used": time.time(),
        }
        self._index.set(("file", name), record)
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
        for part in self.tmp_dir.glob("*.part"):
            pid = part.name.split("-", 1)[0]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                part.unlink(missing_ok=True)
                log.info("removed an interrupted transfer left by process %s", pid)
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
        """Atomically claim the transfer of a file for this process (cross-process
        single-flight); False when another live process holds it."""
        key = ("claim", self._name(job_id, mosaic_type))
        if self._index.add(key, os.getpid(), expire=CLAIM_S):
            return True
        pid = self._index.get(key)
        if pid is not None and not _pid_alive(pid):
            self._index.delete(key)
            return bool(self._index.add(key, os.getpid(), expire=CLAIM_S))
        return False

    def claimed(self, job_id: str, mosaic_type: str) -> bool:
        """Whether a live process holds the claim on this file."""
        pid = self._index.get(("claim", self._name(job_id, mosaic_type)))
        return pid is not None and _pid_alive(pid)

    def release(self, job_id: str, mosaic_type: str) -> None:
        """Drop this process's claim on the file."""
        self._index.delete(("claim", self._name(job_id, mosaic_type)))

    def descriptors(self, job_id: str) -> list[dict[str, Any]] | None:
        """The cached file list of a completed job, or None."""
        return self._index.get(("descriptors", job_id))

    def remember_descriptors(self, job_id: str, descriptors: list[dict[str, Any]]) -> None:
        """Cache a completed job's file list for :data:`DESCRIPTORS_TTL_S` seconds."""
        self._index.set(("descriptors", job_id), descriptors, expire=DESCRIPTORS_TTL_S)


class _Serving(contextlib.AbstractContextManager[None]):
    def __init__(self, counter: Counter[str], name: str) -> None:
        self._counter, self._name = counter, name

    def __enter__(self) -> None:
        self._counter[self._name] += 1

    def __exit__(self, *exc: object) -> None:
        self._counter[self._name] -= 1
