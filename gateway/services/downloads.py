"""The download service: clip files cross the upstream once, then are served from disk.

A request for a file the store does not hold starts one :class:`Transfer` per file and
process: a task that streams ``clip.job.download`` through the upstream guard into a temporary
file. Every request for that file meanwhile reads the same temporary file as it grows, so the
first clients get bytes as they arrive and none causes a second upstream call. A client that
goes away does not stop the transfer; when the last one has left the transfer still runs to
the end and stores the file, so the next request is a cache hit. Only a complete transfer
whose size matches the upstream's ``Content-Length`` (and the job descriptor's ``size_bytes``
when known) is flushed, renamed into place and indexed. A broken transfer is never stored:
its readers' connections are cut short, and the temporary file is removed.

Across worker processes the store's claim makes one worker transfer while the others wait
for the stored file.

Job states come from ``clip.job.get`` (rules from the Geopera "Clipping" guide, seeds
``001``: ``clip.job.get`` reports the status, ``clip.job.downloads`` the descriptors once
``completed``, ``clip.job.download`` streams the bytes with ``Content-Type: image/tiff`` and a
``Content-Disposition`` filename): a file is only asked for once the job is known
``completed``, so a 400 from the upstream is never read as "not ready". ``failed`` (or
``cancelled``) is final (:class:`~gateway.errors.JobFailed`, with the upstream's reason);
any other status is "not completed yet" (:class:`~gateway.errors.JobNotCompleted`). A 403
on a job is another organisation's job (:class:`~gateway.errors.JobForbidden`), a 404 an
unknown one.

A download is checked before anything is stored: its media type must be one of
``downloads.content_types`` (default ``image/tiff``), and its size must equal its
``Content-Length`` and the descriptor's ``size_bytes``
(:class:`~gateway.errors.UpstreamBadResponse` otherwise). Without a Content-Disposition the
descriptor's ``filename`` names the file. The service raises domain errors only
(:mod:`gateway.errors`); the HTTP edge answers them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
import unicodedata
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from werkzeug.http import parse_options_header

from gateway.errors import (
    GatewayError,
    JobFailed,
    JobForbidden,
    JobNotCompleted,
    JobNotFound,
    ProjectForbidden,
    StoreUnavailable,
    TransferFailed,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
)
from gateway.secrets import redact
from gateway.storage.coalesce import SingleFlight
from gateway.storage.downloads import DownloadStore, StoredFile, file_etag
from gateway.upstream.guard import UpstreamGuard

log = logging.getLogger("gateway.downloads")

JOB_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
"""Allowed job ids: UUIDs, as Geopera issues them (Clipping guide: ``job.id``)."""

MOSAIC_TYPE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
"""Allowed mosaic types (``rgb``, ``multispectral``...): lower-case letters, digits, ``-``,
``_``, starting with a letter; up to 64."""

FINAL_FAILURES = frozenset({"failed", "cancelled", "canceled"})
"""Job statuses after which a job never completes (the Clipping guide's worked example stops
polling at ``failed``; ``cancelled`` is the processing jobs' other end state, seeds ``004``)."""

MAX_REASON_CHARS = 500
"""Longest failure reason passed on to a client, characters."""

CLAIM_POLL_S = 0.05

WRITE_BATCH_BYTES = 4 << 20
"""Received bytes queued behind the write in flight, at most, bytes; beyond it the transfer
waits for the disk."""

READ_CHUNK = 1 << 20
"""Largest chunk a :class:`TransferReader` yields, bytes."""


@dataclass(frozen=True, slots=True)
class Requester:
    """Who really asked, passed upstream as ``user_agent`` and ``requester_ip``."""

    user_agent: str | None
    ip: str | None


def clean_filename(name: str, fallback: str) -> str:
    """``name`` made safe to send on: the last path component only, no control characters
    or quotes, Unicode NFC, at most 200 characters; ``fallback`` when nothing is left."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable() and c not in "\"'")
    return name.strip(" .")[:200] or fallback


def safe_filename(header: str | None, fallback: str) -> str:
    """The file name from an upstream ``Content-Disposition`` (``filename*`` preferred),
    cleaned by :func:`clean_filename`."""
    name = ""
    if header:
        _, options = parse_options_header(header)
        name = options.get("filename*") or options.get("filename") or ""
    return clean_filename(name, fallback)


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename`` and, for non-ASCII names, an RFC 8187
    ``filename*`` (RFC 6266 section 4.3)."""
    ascii_name = filename.encode("ascii", "replace").decode().replace("?", "_")
    header = f'attachment; filename="{ascii_name}"'
    if ascii_name != filename:
        header += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return header


class TransferBroken(Exception):
    """The upstream transfer of a file broke off or failed before the file was stored.

    Raised by :class:`TransferReader` after it has yielded every byte that was written;
    the HTTP edge then cuts the connection, so the client sees a short body it can resume
    (``curl -C -``), never a whole-looking file.
    """


class Transfer:
    """One upstream download in progress in this process, shared by all its readers.

    Attributes:
        size: total bytes (from the upstream's Content-Length or the descriptor), or None.
        filename, content_type: for the response headers.
        mtime_ns: when the transfer started; the stored file keeps it, and with ``size`` it
            makes the ETag, so streamed and stored answers agree.
        written: bytes in the temporary file so far (every one of them written by the
            kernel: counted only once its write returned).
        sha256: hex SHA-256 of the whole file, computed while it was written; set once the
            transfer is complete.
        error: the failure, once failed.
        stored: the stored file, once committed.
    """

    def __init__(self, job_id: str, mosaic_type: str, tmp: os.PathLike[str]) -> None:
        self.job_id, self.mosaic_type, self.tmp = job_id, mosaic_type, tmp
        self.size: int | None = None
        self.filename = f"{job_id}_{mosaic_type}.tif"
        self.content_type = "image/tiff"
        # whole seconds: Last-Modified has one-second resolution, and must not round apart
        self.mtime_ns = int(time.time()) * 1_000_000_000
        self.written = 0
        self.sha256: str | None = None
        self.error: Exception | None = None
        self.stored: StoredFile | None = None
        self.ready = asyncio.Event()
        self.finished = asyncio.Event()
        self._progress = asyncio.Event()

    @property
    def etag(self) -> str:
        """The ETag the stored file will have (needs ``size``)."""
        return file_etag(self.mtime_ns, self.size or 0)

    def advance(self, nbytes: int) -> None:
        """Record ``nbytes`` more written and wake readers."""
        self.written += nbytes
        self._progress.set()

    def finish(self, error: Exception | None = None) -> None:
        """Mark the transfer over (``error`` when it failed) and wake everyone."""
        self.error = error
        self.ready.set()
        self.finished.set()
        self._progress.set()

    def sendable(self) -> int:
        """How many of the file's first bytes may be passed on now.

        Every written byte once the transfer is over; before that, every written byte but
        the file's last one (``size - 1``; without a known size, the newest byte), which is
        held back until the file has been verified and stored, so that no client can
        receive a whole-looking body from a transfer that later fails.
        """
        if self.finished.is_set():
            return self.written
        if self.size is not None:
            return min(self.written, self.size - 1)
        return max(0, self.written - 1)

    async def wait_sendable(self, offset: int) -> None:
        """Wait until more than ``offset`` bytes are :meth:`sendable` or the transfer is
        over."""
        while self.sendable() <= offset and not self.finished.is_set():
            self._progress.clear()
            await self._progress.wait()

    def reader(self, start: int = 0, end: int | None = None) -> TransferReader:
        """Open the growing temporary file for one client, for bytes ``start`` to ``end``
        (exclusive; None: to the end of the file). Blocking (opens a file).

        Raises:
            TransferBroken: the transfer already failed and its file is gone.
            ValueError: ``start`` < 0 or ``end`` < ``start``.
        """
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad byte range {start}..{end}")
        try:
            file = open(self.tmp, "rb")  # noqa: SIM115 - closed by TransferReader.close
        except FileNotFoundError:
            raise TransferBroken("the transfer ended before this reader joined") from None
        if start:
            file.seek(start)
        return TransferReader(self, file, start, end)


class TransferReader:
    """One client's view of a :class:`Transfer`: the bytes of one range of the file
    (``start`` to ``end``, exclusive; the whole file by default), in order, as soon as
    they are written.

    Iterating yields chunks of at most :data:`READ_CHUNK` bytes. The file's last byte is
    held back until the transfer has been verified and committed
    (:meth:`Transfer.sendable`), so a client can only receive a whole body from a whole
    transfer; a range that ends before the last byte is complete as soon as its own bytes
    are written. When the transfer breaks before the range is complete, every byte of it
    that was written is still yielded, then :class:`TransferBroken` is raised. Close it
    with :meth:`close` (or use it as a context manager).
    """

    def __init__(self, transfer: Transfer, file: Any, start: int = 0, end: int | None = None):
        self._transfer, self._file = transfer, file
        self._start, self._end = start, end

    def __enter__(self) -> TransferReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the temporary file (the transfer goes on)."""
        self._file.close()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        transfer, position, end = self._transfer, self._start, self._end
        while end is None or position < end:
            await transfer.wait_sendable(position)
            over = transfer.finished.is_set()
            limit = transfer.sendable() if end is None else min(end, transfer.sendable())
            while position < limit:
                data = await asyncio.to_thread(self._file.read, min(limit - position, READ_CHUNK))
                if not data:  # the file is shorter than its writer said: never pass it off
                    raise TransferBroken("the temporary file ended early")
                position += len(data)
                yield data
            if over and (end is None or position < end):
                if end is None and transfer.error is None and transfer.stored is not None:
                    return  # the whole file, verified and stored
                raise TransferBroken("the upstream transfer broke off")


class _TempFile:
    """A transfer's temporary file, written by one worker thread of its own.

    Every operation on the descriptor (writes, fsync, close) runs in submission order on
    that one thread, so no write can outlive the descriptor or land in a reused one
    (issue 9: a write thread once wrote clip bytes into whatever file next got the number).
    Received bytes are queued with :meth:`write`; whenever no write is in flight, all that
    is queued goes to the thread as one write (the next one starts from the last one's
    completion). So bytes reach the disk, and the readers, as soon as the disk is free,
    however slowly or unevenly the upstream sends them (a cold ``Range`` needs its first
    bytes at once), and big writes form only while the disk is busy. Bytes count as written
    (:meth:`Transfer.advance`) once their write has returned. The writer thread also feeds
    the file's SHA-256, in write order.
    """

    def __init__(self, transfer: Transfer) -> None:
        self._transfer = transfer
        self._fd = os.open(transfer.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gateway-download-write"
        )
        self._digest = hashlib.sha256()  # updated on the writer thread only, in write order
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        self._in_flight: asyncio.Future[int] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._changed = asyncio.Event()

    async def write(self, data: bytes) -> None:
        """Queue ``data``, written as soon as the write in flight (if any) returns; waits
        while :data:`WRITE_BATCH_BYTES` or more are queued (the disk is slower than the
        upstream: TCP flow control then slows the upstream).

        Raises:
            OSError: an earlier write failed (ENOSPC: disk full).
        """
        self._raise_error()
        self._queued.append(data)
        self._queued_bytes += len(data)
        if self._in_flight is None:
            self._submit()
        while self._queued_bytes >= WRITE_BATCH_BYTES and self._error is None:
            self._changed.clear()
            await self._changed.wait()
        self._raise_error()

    async def drain(self) -> None:
        """Wait until every queued byte has been written.

        Raises:
            OSError: a write failed.
        """
        while (self._queued or self._in_flight is not None) and self._error is None:
            if self._in_flight is None:
                self._submit()
            self._changed.clear()
            await self._changed.wait()
        self._raise_error()

    async def flush(self) -> str:
        """Write everything queued and ``fsync`` the file; returns the hex SHA-256 of
        everything written.

        Raises:
            OSError: a write or the flush failed.
        """
        await self.drain()
        await asyncio.wrap_future(self._thread.submit(os.fsync, self._fd))
        return self._digest.hexdigest()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _submit(self) -> None:
        data = self._queued[0] if len(self._queued) == 1 else b"".join(self._queued)
        self._queued, self._queued_bytes = [], 0
        future = self._thread.submit(_write_all, self._fd, data, self._digest)
        self._in_flight = asyncio.wrap_future(future)
        self._in_flight.add_done_callback(self._written)

    def _written(self, future: asyncio.Future[int]) -> None:
        """On the event loop, after each write: count its bytes, start the next write."""
        self._in_flight = None
        if future.cancelled():
            self._error = self._error or OSError("a write was cancelled")
        elif future.exception() is not None:
            self._error = self._error or future.exception()
        elif self._error is None:
            self._transfer.advance(future.result())
        if self._queued and self._error is None and not self._closed:
            self._submit()
        self._changed.set()

    async def aclose(self) -> None:
        """Close the descriptor after the write in flight (whose bytes then count as
        written when it succeeded); bytes still queued are dropped. Safe to call on any
        path, cancellation included: the close itself is shielded, so it always runs after
        the last write."""
        self._closed = True
        closing = self._thread.submit(os.close, self._fd)
        self._thread.shutdown(wait=False)
        await asyncio.shield(asyncio.wrap_future(closing))


class DownloadService:
    """Job status and clip files through the store.

    Args:
        store: the download store.
        guard: the protected upstream client.
        content_types: media types a clip file may have (``downloads.content_types``).
    """

    def __init__(
        self,
        store: DownloadStore,
        guard: UpstreamGuard,
        content_types: frozenset[str] = frozenset({"image/tiff"}),
    ) -> None:
        self.store = store
        self.guard = guard
        self.content_types = content_types
        self._jobs: SingleFlight[dict[str, Any]] = SingleFlight()
        self._transfers: dict[tuple[str, str], Transfer] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        """Cancel running transfers (on shutdown: their readers are cut at once, so a
        SIGTERM does not wait for long downloads); their temporary files are removed."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def job(self, job_id: str) -> dict[str, Any]:
        """``{"job_id", "status", "files": [descriptor...]}``, files only when completed, and
        ``reason`` (the upstream's, cleaned) when the job failed. Concurrent asks for one job
        share one ``clip.job.get``.

        Raises:
            JobNotFound (unknown job), JobForbidden (another organisation's), UpstreamError,
            HeldBack.
        """
        descriptors = self.store.descriptors(job_id)
        if descriptors is not None:
            result = {"job_id": job_id, "status": "completed", "files": descriptors}
        else:
            state, _ = await self._jobs.run(job_id, lambda: self._job_state(job_id))
            result = {**state, "files": [dict(f) for f in state["files"]]}  # callers add to them
        for file in result["files"]:
            stored = self.store.peek(job_id, file["mosaic_type"])
            file["sha256"] = stored.sha256 if stored is not None else None
        return result

    async def check_project(self, job_id: str, projects: frozenset[str] | None) -> None:
        """Let a client limited to ``projects`` (None: every project) reach ``job_id``.

        The job's project is remembered in the store's index once seen (in a listing or a
        ``clip.job.get`` answer, field ``project_id``); otherwise it is asked with one
        ``clip.job.get``, shared with concurrent asks. A job whose project the upstream
        does not name is refused to a limited client (fail closed).

        Raises:
            ProjectForbidden: the job is of another project; JobNotFound, JobForbidden,
            UpstreamError, HeldBack: from ``clip.job.get``.
        """
        if projects is None:
            return
        project = self.store.project(job_id)
        if project is None:
            state, _ = await self._jobs.run(job_id, lambda: self._job_state(job_id))
            project = state.get("project_id")
        if project not in projects:
            raise ProjectForbidden(job_id, "the clip job belongs to a project this token lacks")

    async def _job_state(self, job_id: str) -> dict[str, Any]:
        job = await self.upstream_json("clip.job.get", {"job_id": job_id}, job_id)
        if not isinstance(job, dict):
            raise UpstreamBadResponse("clip.job.get", "the job is not a JSON object", 200)
        status = job.get("status")
        status = status if isinstance(status, str) and status else "unknown"
        result: dict[str, Any] = {"job_id": job_id, "status": status, "files": []}
        project = job_project(job)
        if project is not None:
            result["project_id"] = project
            try:
                self.store.remember_project(job_id, project)
            except (OSError, sqlite3.Error) as exc:  # a full disk: answer, just uncached
                log.warning("could not cache a job's project: %s", type(exc).__name__)
        if status == "completed":
            listing = await self.upstream_json("clip.job.downloads", {"job_id": job_id}, job_id)
            if not isinstance(listing, list):
                raise UpstreamBadResponse("clip.job.downloads", "the listing is not a list", 200)
            files = [file_descriptor(d) for d in listing if isinstance(d, dict)]
            files = [f for f in files if f is not None]
            try:
                self.store.remember_descriptors(job_id, files)
            except (OSError, sqlite3.Error) as exc:  # a full disk: answer, just uncached
                log.warning("could not cache a job's file list: %s", type(exc).__name__)
            result["files"] = files
        elif status in FINAL_FAILURES:
            result["reason"] = failure_reason(job)
        return result

    async def upstream_json(self, operation: str, body: dict[str, Any], job_id: str) -> Any:
        """Call a clip operation about ``job_id`` through the guard; its parsed JSON answer.

        Raises:
            JobNotFound (upstream 404), JobForbidden (403 on the job), UpstreamError
            (others, and an answer that is not JSON), HeldBack.
        """
        try:
            response = await self.guard.call(operation, body, asset=job_id)
        except UpstreamError as exc:
            raise _job_error(job_id, exc) from None
        return _loads(operation, response.content)

    async def _completed_file(self, job_id: str, mosaic_type: str) -> dict[str, Any]:
        """The descriptor of ``mosaic_type`` in a job known to be completed.

        Raises:
            JobNotCompleted, JobFailed, JobNotFound (also: no such mosaic type),
            JobForbidden, UpstreamError, HeldBack.
        """
        state = await self.job(job_id)
        status = state["status"]
        if status in FINAL_FAILURES:
            raise JobFailed(job_id, status, state.get("reason") or "none given")
        if status != "completed":
            raise JobNotCompleted(job_id, status)
        for descriptor in state["files"]:
            if descriptor["mosaic_type"] == mosaic_type:
                return descriptor
        raise JobNotFound(job_id, "the job has no file of this mosaic type")

    async def open(
        self, job_id: str, mosaic_type: str, requester: Requester
    ) -> tuple[StoredFile | Transfer, str]:
        """The stored file, or the transfer that is fetching it (headers known), with the
        ``X-Cache`` value: ``HIT`` (stored), ``MISS`` (this request started the transfer) or
        ``COALESCED`` (it joined one in flight).

        Raises:
            JobNotCompleted (still running), JobFailed (final), JobNotFound (unknown job or
            mosaic type), JobForbidden (another organisation's job), HeldBack (throttled or
            held back), UpstreamError (the upstream failed or sent something else than the
            file: nothing stored), TransferFailed (the store failed); with ``subject`` set.
        """
        stored = self.store.lookup(job_id, mosaic_type)
        if stored is not None:
            return stored, "HIT"
        key = (job_id, mosaic_type)
        transfer = self._transfers.get(key)
        status = "COALESCED"
        descriptor: dict[str, Any] = {}
        if transfer is None:
            try:
                descriptor = await self._completed_file(job_id, mosaic_type)
            except GatewayError as exc:
                raise exc.about("this clip file") from None
            stored = self.store.lookup(job_id, mosaic_type)  # stored while we asked?
            if stored is not None:
                return stored, "HIT"
            transfer = self._transfers.get(key)
        if transfer is None:
            status = "MISS"
            transfer = Transfer(job_id, mosaic_type, self.store.temp_path())
            transfer.filename = descriptor.get("filename") or transfer.filename
            self._transfers[key] = transfer
            task = asyncio.ensure_future(self._run(transfer, requester))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await transfer.ready.wait()
        if transfer.error is not None:
            error = transfer.error
            if not isinstance(error, GatewayError):
                error = TransferFailed(f"the transfer failed: {type(error).__name__}")
            raise _job_error(job_id, error).about("this clip file") from None
        if transfer.stored is not None:
            return transfer.stored, status
        return transfer, status

    async def _run(self, transfer: Transfer, requester: Requester) -> None:
        """Fetch one file (or wait for the worker that does) and always finish ``transfer``:
        whatever fails, every reader and waiter is woken with the error, the claim is
        released and the temporary file removed."""
        key = (transfer.job_id, transfer.mosaic_type)
        claimed = False
        try:
            claimed = self._store_call(self.store.claim, *key)
            if not claimed:
                transfer.stored = await self._await_other_worker(*key)
                if transfer.stored is None:
                    claimed = self._store_call(self.store.claim, *key)
            if transfer.stored is None:
                await self._transfer(transfer, requester)
            transfer.finish()
        except asyncio.CancelledError:
            transfer.finish(TransferFailed("the gateway is shutting down"))
            raise
        except Exception as exc:  # every failure must reach the readers, never hang them
            if isinstance(exc, OSError | sqlite3.Error):
                exc = _storage_error(exc)
            log.log(
                logging.ERROR if isinstance(exc, StoreUnavailable) else logging.WARNING,
                "download of a %s file failed: %s",
                transfer.mosaic_type,
                exc if isinstance(exc, UpstreamError | StoreUnavailable) else repr(exc)[:200],
            )
            transfer.finish(exc)
        finally:
            if claimed:
                try:
                    self.store.release(*key)
                except (OSError, sqlite3.Error) as exc:  # it expires; other workers then take it
                    log.warning("could not release a download claim: %s", type(exc).__name__)
            self._transfers.pop(key, None)
            if transfer.stored is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(transfer.tmp)

    @staticmethod
    def _store_call(method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except (OSError, sqlite3.Error) as exc:
            raise _storage_error(exc) from None

    async def _await_other_worker(self, job_id: str, mosaic_type: str) -> StoredFile | None:
        try:
            return await self.store.wait_for_transfer(job_id, mosaic_type, CLAIM_POLL_S)
        except (OSError, sqlite3.Error) as exc:
            raise _storage_error(exc) from None

    async def _transfer(self, transfer: Transfer, requester: Requester) -> None:
        body: dict[str, Any] = {"job_id": transfer.job_id, "mosaic_type": transfer.mosaic_type}
        if requester.user_agent:
            body["user_agent"] = requester.user_agent[:512]
        if requester.ip:
            body["requester_ip"] = requester.ip
        expected = self._expected_size(transfer.job_id, transfer.mosaic_type)
        file = _TempFile(transfer)
        try:
            await self._stream_into(file, transfer, body, expected)
        finally:
            await file.aclose()
        if transfer.size is not None and transfer.written != transfer.size:
            raise UpstreamBadResponse(
                "clip.job.download",
                f"transfer ended at {transfer.written} of {transfer.size} bytes",
            )
        transfer.size = transfer.written
        transfer.stored = await asyncio.to_thread(
            self.store.commit,
            transfer.tmp,
            transfer.job_id,
            transfer.mosaic_type,
            filename=transfer.filename,
            content_type=transfer.content_type,
            mtime_ns=transfer.mtime_ns,
            sha256=transfer.sha256,
        )

    async def _stream_into(
        self, file: _TempFile, transfer: Transfer, body: dict[str, Any], expected: int | None
    ) -> None:
        stream = self.guard.stream("clip.job.download", body, asset=transfer.job_id)
        async with stream as (headers, chunks):
            transfer.content_type, size = checked_download(headers, expected, self.content_types)
            transfer.size = size if size is not None else expected
            if transfer.size is not None:
                free = await asyncio.to_thread(self.store.free_bytes)
                if free < transfer.size:  # refuse cleanly now, not with a cut body later
                    raise StoreUnavailable(
                        f"the download store has {free} bytes free, the file needs {transfer.size}"
                    )
            transfer.filename = safe_filename(headers.get("content-disposition"), transfer.filename)
            transfer.ready.set()
            # Writes run on the file's own thread while the next bytes are read.
            try:
                async for chunk in chunks:
                    await file.write(chunk)
            except Exception:
                # the bytes that did arrive go to the readers, so their clients can resume
                with contextlib.suppress(OSError):
                    await file.drain()
                raise
            transfer.sha256 = await file.flush()

    def _expected_size(self, job_id: str, mosaic_type: str) -> int | None:
        for descriptor in self.store.descriptors(job_id) or []:
            if descriptor.get("mosaic_type") == mosaic_type:
                size = descriptor.get("size_bytes")
                return size if isinstance(size, int) else None
        return None


def checked_download(
    headers: Mapping[str, str], expected: int | None, content_types: frozenset[str]
) -> tuple[str, int | None]:
    """The media type and ``Content-Length`` of a ``clip.job.download`` answer, checked
    before any byte is stored.

    Args:
        headers: the upstream answer's headers.
        expected: the descriptor's ``size_bytes``, or None when it gave none.
        content_types: the allowed media types (parameters are ignored: ``image/tiff;
            application=geotiff`` is ``image/tiff``).

    Raises:
        UpstreamBadResponse: another media type (a JSON or HTML answer), or a
            ``Content-Length`` other than ``size_bytes``.
    """
    media_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
    if media_type not in content_types:
        allowed = ", ".join(sorted(content_types))
        raise UpstreamBadResponse(
            "clip.job.download", f"answered {media_type or 'no type'!r}, not {allowed}", 200
        )
    length = headers.get("content-length")
    size = int(length) if length and length.isdigit() else None
    if size is not None and expected is not None and size != expected:
        raise UpstreamBadResponse(
            "clip.job.download", f"Content-Length {size} differs from size_bytes {expected}", 200
        )
    return media_type, size


def job_project(job: Mapping[str, Any]) -> str | None:
    """A job's project from its ``clip.job.get`` (or ``clip.jobs.list``) entry: the
    ``project_id`` member when it is a printable string of at most 128 characters
    (``clip.create_from_item`` takes ``project_id``, the Clipping guide, seeds ``001``; that
    the job reports it back is our reading), else None."""
    project = job.get("project_id")
    if isinstance(project, str) and 0 < len(project) <= 128 and project.isprintable():
        return project
    return None


def failure_reason(job: Mapping[str, Any]) -> str:
    """Why a job failed, from its ``clip.job.get`` answer, cleaned to pass on to a client.

    The Clipping guide does not name the field (our choice: ``error``, a string or an object
    with ``message``/``detail``, as processing jobs carry ``error``, seeds ``004``; then
    ``reason``, ``status_message``). Redacted, printable characters only, at most
    :data:`MAX_REASON_CHARS`; ``"none given"`` when absent.
    """
    for key in ("error", "reason", "status_message"):
        value = job.get(key)
        if isinstance(value, dict):
            value = value.get("message") or value.get("detail")
        if isinstance(value, str) and value.strip():
            return printable_text(value, MAX_REASON_CHARS)
    return "none given"


def printable_text(value: str, limit: int) -> str:
    """Upstream text made safe to pass on: redacted (:func:`gateway.secrets.redact`), every
    non-printable character a space, stripped, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else " " for c in redact(value)).strip()
    return text[:limit]


def _job_error(job_id: str, exc: GatewayError) -> GatewayError:
    """Upstream 404/403 on a job call as the job's domain error; others unchanged."""
    if isinstance(exc, UpstreamNotFound):
        return JobNotFound(job_id, "the upstream knows no such clip job or file")
    if isinstance(exc, UpstreamForbidden):
        return JobForbidden(job_id, "the clip job belongs to another organisation")
    return exc


def _storage_error(exc: BaseException) -> StoreUnavailable:
    """The domain error for a store that cannot take a file (only the error's kind is
    kept: OS messages name paths)."""
    if isinstance(exc, StoreUnavailable):
        return exc
    reason = type(exc).__name__
    if isinstance(exc, OSError) and exc.errno:
        reason = os.strerror(exc.errno)
    return StoreUnavailable(f"the download store cannot take the file: {reason}")


def _write_all(fd: int, data: bytes, digest: Any) -> int:
    """Add ``data`` to ``digest`` (a :mod:`hashlib` object) and write all of it to ``fd``;
    returns its length. Runs on a transfer's writer thread (hashlib releases the GIL)."""
    digest.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def _loads(operation: str, content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        raise UpstreamBadResponse(operation, "answer is not JSON", 200) from None


def file_descriptor(raw: dict[str, Any]) -> dict[str, Any] | None:
    """One file descriptor of ``clip.job.downloads`` (or ``output_artifacts.clips``) with
    the fields clients need, validated: ``{"mosaic_type", "filename", "size_bytes"}``
    (``gcs_path`` is not passed on); None when its mosaic type is unusable."""
    mosaic = raw.get("mosaic_type")
    if not isinstance(mosaic, str) or not MOSAIC_TYPE.fullmatch(mosaic):
        return None
    size = raw.get("size_bytes")
    return {
        "mosaic_type": mosaic,
        "filename": clean_filename(str(raw.get("filename", "")), f"{mosaic}.tif"),
        "size_bytes": size if isinstance(size, int) and size >= 0 else None,
    }
