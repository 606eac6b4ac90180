"""The download service: clip files cross the upstream once, then are served from disk.

A request for a file the store does not hold starts one
:class:`~gateway.services.transfers.Transfer` per file and process: a task that streams
``clip.job.download`` through the upstream guard into a temporary file. Every request for that
file meanwhile reads the same temporary file as it grows, so the first clients get bytes as
they arrive and none causes a second upstream call. A client that goes away does not stop the
transfer; when the last one has left the transfer still runs to the end and stores the file,
so the next request is a cache hit. The transfer protocol itself (the checks, the writer, the
commit, and the readers that hold the last byte back) is :mod:`gateway.services.transfers`:
only a complete transfer whose size matches the upstream's ``Content-Length`` (and the job
descriptor's ``size_bytes`` when known) is flushed, renamed into place and indexed; a broken
transfer is never stored, its readers' connections are cut short, and the temporary file is
removed.

Across worker processes the store's claim makes one worker transfer while the others wait
for the stored file. Across the replicas of a fleet (``[state] redis_url`` and ``peer_url``),
:class:`~gateway.storage.coalesce.FleetFiles` makes one replica fetch from the upstream; the
others stream the file from it while it arrives, or from a replica that has stored it
(:mod:`gateway.services.peers`), through the same transfer protocol, and store their own copy.

Job states come from ``clip.job.get`` (rules from the Geopera "Clipping" guide, seeds
``001``: ``clip.job.get`` reports the status, ``clip.job.downloads`` the descriptors once
``completed``, ``clip.job.download`` streams the bytes with ``Content-Type: image/tiff`` and a
``Content-Disposition`` filename): a file is only asked for once the job is known
``completed``, so a 400 from the upstream is never read as "not ready". ``failed`` (or
``cancelled``) is final (:class:`~gateway.errors.JobFailed`, with the upstream's reason);
any other status is "not completed yet" (:class:`~gateway.errors.JobNotCompleted`). A 403
on a job is another organisation's job (:class:`~gateway.errors.JobForbidden`), a 404 an
unknown one.

A download is checked before anything is stored
(:func:`~gateway.services.transfers.checked_download`): its media type must be one of
``downloads.content_types`` (default ``image/tiff``), and its size must equal its
``Content-Length`` and the descriptor's ``size_bytes``
(:class:`~gateway.errors.UpstreamBadResponse` otherwise). Without a Content-Disposition the
descriptor's ``filename`` names the file. The service raises domain errors only
(:mod:`gateway.errors`); the HTTP edge answers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

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
from gateway.services.peers import PeerClient, PeerUnavailable
from gateway.services.transfers import Stream, Transfer, clean_filename
from gateway.storage.coalesce import FileSource, FleetFiles, SingleFlight
from gateway.storage.downloads import DownloadStore, StoredFile
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
"""How often a worker waiting for another worker's transfer looks for the stored file,
seconds."""

PEER_RETRY_S = 0.1
"""Pause before asking Redis again after the replica fetching a file had no transfer to send
(it had just failed, or just finished), seconds."""

PEER_ATTEMPTS = 50
"""Most sources tried for one file in the fleet before giving up."""


@dataclass(frozen=True, slots=True)
class Requester:
    """Who really asked, passed upstream as ``user_agent`` and ``requester_ip``."""

    user_agent: str | None
    ip: str | None


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename`` and, for non-ASCII names, an RFC 8187
    ``filename*`` (RFC 6266 section 4.3)."""
    ascii_name = filename.encode("ascii", "replace").decode().replace("?", "_")
    header = f'attachment; filename="{ascii_name}"'
    if ascii_name != filename:
        header += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return header


class DownloadService:
    """Job status and clip files through the store.

    Args:
        store: the download store.
        guard: the protected upstream client.
        content_types: media types a clip file may have (``downloads.content_types``).
        fleet: the fleet's claims and holders of clip files, with ``peers`` to pull them from
            other replicas (both or neither); None on one host (or without ``state.peer_url``).
    """

    def __init__(
        self,
        store: DownloadStore,
        guard: UpstreamGuard,
        content_types: frozenset[str] = frozenset({"image/tiff"}),
        fleet: FleetFiles | None = None,
        peers: PeerClient | None = None,
    ) -> None:
        self.store = store
        self.guard = guard
        self.content_types = content_types
        self.fleet = fleet
        self.peers = peers
        self._jobs: SingleFlight[dict[str, Any]] = SingleFlight()
        self._transfers: dict[tuple[str, str], Transfer] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        """Cancel running transfers (on shutdown: their readers are cut at once, so a
        SIGTERM does not wait for long downloads); their temporary files are removed."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.peers is not None:
            await self.peers.aclose()

    async def held(self, job_id: str, mosaic_type: str) -> tuple[StoredFile | Transfer, str]:
        """What this replica can send another one of a file without any upstream call: the
        stored file (``HIT``) or the transfer fetching it now (``COALESCED``), headers known.

        Raises:
            JobNotFound: neither (nor the transfer's headers, which failed).
        """
        stored = self.store.lookup(job_id, mosaic_type)
        if stored is not None:
            return stored, "HIT"
        transfer = self._transfers.get((job_id, mosaic_type))
        if transfer is not None:
            await transfer.ready.wait()
            if transfer.stored is not None:
                return transfer.stored, "HIT"
            if transfer.error is None:
                return transfer, "COALESCED"
        raise JobNotFound(job_id, "this replica holds no such file")

    async def stored(self, found: StoredFile | Transfer) -> StoredFile:
        """The stored file of an :meth:`open` answer: ``found`` itself, or the file its
        transfer stores once it has.

        Raises:
            TransferBroken: the transfer failed; nothing was stored.
        """
        return found if isinstance(found, StoredFile) else await found.stored_file()

    async def checksum(self, job_id: str, mosaic_type: str, stored: StoredFile) -> str:
        """The hex SHA-256 of a stored file (:meth:`DownloadStore.checksum`; read in a thread
        for a file stored without one).

        Raises:
            OSError: the file cannot be read.
        """
        return await asyncio.to_thread(self.store.checksum, job_id, mosaic_type, stored)

    def serving(self, stored: StoredFile) -> contextlib.AbstractContextManager[None]:
        """Context manager keeping ``stored`` from eviction while it is being sent."""
        return self.store.serving(stored)

    def with_sha256(self, job_id: str, files: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Copies of a job's file descriptors, each with ``sha256``: the stored file's hex
        SHA-256, or None while it is not stored (no use counted, no upstream call)."""
        described = [dict(f) for f in files]
        for file in described:
            stored = self.store.peek(job_id, file["mosaic_type"])
            file["sha256"] = stored.sha256 if stored is not None else None
        return described

    async def job(self, job_id: str) -> dict[str, Any]:
        """``{"job_id", "status", "files": [descriptor...]}``, files only when completed, and
        ``reason`` (the upstream's, cleaned) when the job failed. Concurrent asks for one job
        share one ``clip.job.get``.

        Raises:
            JobNotFound (unknown job), JobForbidden (another organisation's), UpstreamError,
            HeldBack.
        """
        descriptors = self.store.descriptors(job_id)
        result: dict[str, Any]
        if descriptors is not None:
            result = {"job_id": job_id, "status": "completed", "files": descriptors}
        else:
            state, _ = await self._jobs.run(job_id, lambda: self._job_state(job_id))
            result = dict(state)
        result["files"] = self.with_sha256(job_id, result["files"])  # copies: callers add to them
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
            described = [file_descriptor(d) for d in listing if isinstance(d, dict)]
            files = [f for f in described if f is not None]
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
        files: list[dict[str, Any]] = state["files"]
        for descriptor in files:
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
        cache_status = "COALESCED"
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
            cache_status = "MISS"
            transfer = Transfer(job_id, mosaic_type, self.store.temp_path())
            transfer.filename = descriptor.get("filename") or transfer.filename
            self._transfers[key] = transfer
            task = asyncio.ensure_future(self._run(transfer, requester))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await transfer.ready.wait()
        if transfer.from_peer:  # another replica fetched it: no upstream call of our own
            cache_status = "COALESCED"
        if transfer.error is not None:
            error = transfer.error
            if not isinstance(error, GatewayError):
                error = TransferFailed(f"the transfer failed: {type(error).__name__}")
            raise _job_error(job_id, error).about("this clip file") from None
        if transfer.stored is not None:
            return transfer.stored, cache_status
        return transfer, cache_status

    async def _run(self, transfer: Transfer, requester: Requester) -> None:
        """Fetch one file (or wait for the worker that does) and always finish ``transfer``:
        whatever fails, every reader and waiter is woken with the error and the claim is
        released (:meth:`Transfer.receive` removes its temporary file)."""
        key = (transfer.job_id, transfer.mosaic_type)
        claimed = False
        try:
            claimed = self._store_call(self.store.claim, *key)
            if not claimed:
                transfer.stored = await self._await_other_worker(*key)
                if transfer.stored is None:
                    claimed = self._store_call(self.store.claim, *key)
            if transfer.stored is None:
                if self.fleet is None:
                    await self._transfer(transfer, requester)
                else:
                    await self._fleet_transfer(transfer, requester)
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
        await self._receive(
            transfer, self.guard.stream("clip.job.download", body, asset=transfer.job_id)
        )

    async def _receive(self, transfer: Transfer, stream: Stream) -> None:
        await transfer.receive(
            stream,
            self.store,
            expected=self._expected_size(transfer.job_id, transfer.mosaic_type),
            content_types=self.content_types,
        )

    async def _fleet_transfer(self, transfer: Transfer, requester: Requester) -> None:
        """Get the file once for the fleet: from a replica that has stored it, else from the
        one fetching it now (as its bytes arrive), else (holding the fleet's claim) from the
        upstream. A replica that sends nothing (gone, unreachable) is skipped, and a dead
        fetcher's claim is taken over once it expires; one that breaks off midway breaks this
        transfer too (its readers resume, and the next request starts again).

        Raises:
            LimitExceeded: Redis cannot be reached (fail closed).
            TransferFailed: no source would send the file after :data:`PEER_ATTEMPTS` tries.
            Whatever the transfer raises.
        """
        fleet, peers = self.fleet, self.peers
        assert fleet is not None
        assert peers is not None
        key = f"{transfer.job_id}:{transfer.mosaic_type}"
        token = fleet.token()
        for _ in range(PEER_ATTEMPTS):
            source: FileSource = await fleet.claim(key, token)
            if source.claimed:
                async with fleet.holding(key, token):
                    await self._transfer(transfer, requester)
                await fleet.stored(key, token)
                return
            for peer in source.holders or (source.fetcher,):
                if not peer:
                    break
                transfer.from_peer = True
                try:
                    await self._receive(
                        transfer, peers.stream(peer, transfer.job_id, transfer.mosaic_type)
                    )
                except PeerUnavailable as exc:  # nothing received: try the next source
                    transfer.from_peer = False
                    log.info("another replica did not send a clip file: %s", exc.reason)
                    if source.holders:
                        fleet.forget(key, peer)
                    elif exc.reason == "unreachable":  # a dead fetcher: its claim expires
                        await asyncio.sleep(source.fetcher_left_s + PEER_RETRY_S)
                    continue
                await fleet.stored(key)
                return
            if not source.holders:
                await asyncio.sleep(PEER_RETRY_S)
        raise TransferFailed("no replica of the fleet would send this file")

    def _expected_size(self, job_id: str, mosaic_type: str) -> int | None:
        for descriptor in self.store.descriptors(job_id) or []:
            if descriptor.get("mosaic_type") == mosaic_type:
                size = descriptor.get("size_bytes")
                return size if isinstance(size, int) else None
        return None


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
