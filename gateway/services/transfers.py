"""The download transfer protocol: one upstream download into the store, read by any number
of clients while it runs. This module owns both halves.

The writer (:meth:`Transfer.receive`) checks the upstream answer before any byte is kept (its
media type, and its ``Content-Length`` against the job descriptor's ``size_bytes``), refuses a
file the store has no room for, streams the body into a temporary file on the file's own
writer thread (:class:`_TempFile`, SHA-256 computed on the way), and then verifies the size
and commits the file to the store (flushed, renamed into place, indexed). Nothing short,
long or of another type is ever stored; a failed transfer's temporary file is removed.

The reader (:meth:`Transfer.reader`) is one client's view of the growing file: a
:class:`TransferReader` yields the bytes of its range in order as soon as they are written,
holds the file's last byte back until the transfer is verified and committed, and raises
:class:`TransferBroken` (after every byte that was written) when the transfer breaks, so the
HTTP edge only writes chunks and, on that error, cuts the connection: the client sees a
short body it can resume, never a whole-looking file. :meth:`Transfer.stored_file` waits for
the committed file instead (several ranges, checksums).

Who starts a transfer, and the claim that makes one worker process fetch while the others
wait, is the download service's (:mod:`gateway.services.downloads`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import time
import unicodedata
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from werkzeug.http import parse_options_header

from gateway.errors import StoreUnavailable, TransferBroken, UpstreamBadResponse
from gateway.storage.downloads import DownloadStore, StoredFile, file_etag

Stream = AbstractAsyncContextManager[tuple[Mapping[str, str], AsyncIterator[bytes]]]
"""An open upstream download: its response headers and an iterator over its body chunks
(:meth:`gateway.upstream.guard.UpstreamGuard.stream`)."""

WRITE_BATCH_BYTES = 4 << 20
"""Received bytes queued behind the write in flight, at most, bytes; beyond it the transfer
waits for the disk."""

READ_CHUNK = 1 << 20
"""Largest chunk a :class:`TransferReader` yields, bytes."""


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
        from_peer: the bytes come from another replica of the fleet, not the upstream.
    """

    def __init__(self, job_id: str, mosaic_type: str, tmp: Path) -> None:
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
        self.from_peer = False
        self.ready = asyncio.Event()
        self.finished = asyncio.Event()
        self._progress = asyncio.Event()

    @property
    def etag(self) -> str:
        """The ETag the stored file will have (needs ``size``)."""
        return file_etag(self.mtime_ns, self.size or 0)

    async def receive(
        self,
        stream: Stream,
        store: DownloadStore,
        *,
        expected: int | None,
        content_types: frozenset[str],
    ) -> StoredFile:
        """The writer half: receive ``stream`` into the temporary file, verify it and
        commit it to ``store``; sets and returns :attr:`stored`. :attr:`ready` is set once
        the upstream's headers have been checked (readers may join from then on). Whatever
        fails, the temporary file is removed (readers that opened it keep reading it).

        Args:
            stream: the upstream download, not yet entered.
            expected: the descriptor's ``size_bytes``, or None.
            content_types: the media types a file may have (:func:`checked_download`).

        Raises:
            UpstreamBadResponse: another media type, a ``Content-Length`` other than
                ``expected``, or a body of another size than announced.
            StoreUnavailable: the store has no room for the announced size.
            UpstreamError, HeldBack: from the stream.
            OSError, sqlite3.Error: the temporary file or the store failed.
        """
        try:
            file = _TempFile(self)
            try:
                await self._stream_into(file, stream, store, expected, content_types)
            finally:
                await file.aclose()
            if self.size is not None and self.written != self.size:
                raise UpstreamBadResponse(
                    "clip.job.download", f"transfer ended at {self.written} of {self.size} bytes"
                )
            self.size = self.written
            self.stored = await asyncio.to_thread(
                store.commit,
                self.tmp,
                self.job_id,
                self.mosaic_type,
                filename=self.filename,
                content_type=self.content_type,
                mtime_ns=self.mtime_ns,
                sha256=self.sha256,
            )
            return self.stored
        finally:
            if self.stored is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.tmp)

    async def _stream_into(
        self,
        file: _TempFile,
        stream: Stream,
        store: DownloadStore,
        expected: int | None,
        content_types: frozenset[str],
    ) -> None:
        async with stream as (headers, chunks):
            self.content_type, size = checked_download(headers, expected, content_types)
            self.size = size if size is not None else expected
            if self.size is not None:
                free = await asyncio.to_thread(store.free_bytes)
                if free < self.size:  # refuse cleanly now, not with a cut body later
                    raise StoreUnavailable(
                        f"the download store has {free} bytes free, the file needs {self.size}"
                    )
            self.filename = safe_filename(headers.get("content-disposition"), self.filename)
            self.ready.set()
            # Writes run on the file's own thread while the next bytes are read.
            try:
                async for chunk in chunks:
                    await file.write(chunk)
            except Exception:
                # the bytes that did arrive go to the readers, so their clients can resume
                with contextlib.suppress(OSError):
                    await file.drain()
                raise
            self.sha256 = await file.flush()

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

        Every written byte once the file has been verified and committed (``stored``);
        before that, and for ever when the transfer failed, every written byte but the
        file's last one (``size - 1``; without a known size, the newest byte), so that no
        client can receive a whole-looking body from a transfer that was not stored (one
        that broke off, sent more than it announced, or could not be committed).
        """
        if self.stored is not None:
            return self.written
        held = self.size - 1 if self.size is not None else self.written - 1
        return max(0, min(self.written, held))

    async def wait_sendable(self, offset: int) -> None:
        """Wait until more than ``offset`` bytes are :meth:`sendable` or the transfer is
        over."""
        while self.sendable() <= offset and not self.finished.is_set():
            self._progress.clear()
            await self._progress.wait()

    @contextlib.asynccontextmanager
    async def reader(self, start: int = 0, end: int | None = None) -> AsyncIterator[TransferReader]:
        """One client's :class:`TransferReader` of bytes ``start`` to ``end`` (exclusive;
        None: to the end of the file), closed on leaving the context.

        Raises:
            TransferBroken: the transfer already failed and its file is gone (nothing has
                been sent yet: answer 502).
            ValueError: ``start`` < 0 or ``end`` < ``start``.
        """
        reader = await asyncio.to_thread(self._open, start, end)
        try:
            yield reader
        finally:
            reader.close()

    async def stored_file(self) -> StoredFile:
        """The committed file, once this transfer has stored it.

        Raises:
            TransferBroken: the transfer failed; nothing was stored.
        """
        await self.finished.wait()
        if self.error is not None or self.stored is None:
            raise TransferBroken("the transfer broke off before the file was stored")
        return self.stored

    def _open(self, start: int, end: int | None) -> TransferReader:
        """Open the growing temporary file for one reader (blocking)."""
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
    that was written (the last byte of the file excepted) is still yielded, then
    :class:`TransferBroken` is raised. Made by :meth:`Transfer.reader`, which closes it.
    """

    def __init__(self, transfer: Transfer, file: Any, start: int = 0, end: int | None = None):
        self._transfer, self._file = transfer, file
        self._start, self._end = start, end

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
                raise TransferBroken("the transfer broke off")


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


def _write_all(fd: int, data: bytes, digest: Any) -> int:
    """Add ``data`` to ``digest`` (a :mod:`hashlib` object) and write all of it to ``fd``;
    returns its length. Runs on a transfer's writer thread (hashlib releases the GIL)."""
    digest.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)
