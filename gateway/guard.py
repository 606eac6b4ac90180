"""The upstream guard: every call to Geopera passes the budget, breakers, limiter and retries.

Order for one call: daily egress budget → circuit breakers (operation, asset) → token buckets
(operation, asset) with a bounded wait → host-wide concurrency cap → the HTTP call. Idempotent
reads that fail with 5xx, a timeout or no answer are retried with jittered exponential backoff
(stamina), each attempt going through the breakers and buckets again; each failure counts
toward the operation's breaker. A 429 opens the asset's breaker (and the operation's, when the
upstream says its bandwidth circuit breaker tripped) for the ``Retry-After`` it gave, at most
``max_retry_after_s``, and is not retried: the caller serves stale or answers 503. Any other
answer (2xx, or a 4xx other than 429) shows the upstream alive and closes the breakers of the
call; a half-open probe that never reaches the upstream is given back (see
:mod:`gateway.breaker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import stamina

from gateway import metrics
from gateway.breaker import Breakers, Scope
from gateway.config import LimitSettings
from gateway.diskcaches import STORE_ERRORS
from gateway.limits import (
    Bucket,
    ConcurrencyCap,
    EgressBudget,
    LimitExceeded,
    Priority,
    SharedState,
    TokenBuckets,
)
from gateway.upstream import (
    GeoperaClient,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamResponse,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = logging.getLogger("gateway.guard")

STREAM_CHUNK_BYTES = 1 << 20
"""Read size for streamed bodies, bytes."""

CHARGE_EVERY_BYTES = 8 << 20
"""Streamed bytes are charged to the bytes bucket and budget in batches of this many."""

RETRYABLE = (UpstreamServerError, UpstreamTimeout, UpstreamUnavailable)
"""Failures worth another attempt for an idempotent read."""

STATE_RETRY_S = 5.0
"""Retry-After when the host's limiter state cannot be read or written, seconds."""


def _bandwidth_breaker(exc: UpstreamRateLimited) -> bool:
    """Whether a 429 came from the organisation-wide bandwidth circuit breaker."""
    text = str(exc).lower()
    return "bandwidth" in text or "circuit" in text


class UpstreamGuard:
    """Protected access to the upstream for one worker process.

    Args:
        client: the Geopera client.
        state: the host's shared limiter state.
        settings: the limits.
    """

    def __init__(self, client: GeoperaClient, state: SharedState, settings: LimitSettings) -> None:
        self.client = client
        self.settings = settings
        self.state = state
        self.buckets = TokenBuckets(state)
        self.breakers = Breakers(
            state,
            settings.failure_threshold,
            settings.failure_window_s,
            settings.open_s,
            max_open_s=settings.max_retry_after_s,
        )
        self.budget = EgressBudget(state, settings.daily_egress_bytes)
        self.concurrency = ConcurrencyCap(state, settings.max_concurrent)
        self._local_slots = asyncio.Semaphore(settings.max_concurrent)
        self._bytes = (
            Bucket("bytes", "bytes", settings.bytes_per_s, max(settings.bytes_burst, 1.0))
            if settings.bytes_per_s > 0
            else None
        )

    def _buckets(self, operation: str, asset: str) -> tuple[list[Bucket], list[float]]:
        """The buckets one call draws from, and what it takes from each up front.

        The bytes bucket takes nothing up front (the size is unknown): a call waits while it
        is in deficit, and :meth:`_account` takes the bytes received afterwards.
        """
        op = self.settings.rate_for(operation)
        asset_rate = self.settings.asset
        buckets = [
            Bucket("operation", f"op:{operation}", op.rps, op.burst),
            Bucket("asset", f"asset:{asset}", asset_rate.rps, asset_rate.burst),
        ]
        costs = [1.0, 1.0]
        if self._bytes is not None:
            buckets.append(self._bytes)
            costs.append(0.0)
        return buckets, costs

    async def _admit(
        self,
        operation: str,
        asset: str,
        priority: Priority,
        deadline: float,
    ) -> tuple[str, list[Scope]]:
        """Budget, breakers, buckets and a concurrency lease; returns the lease and the
        breaker scopes this call probes (half-open), whose outcome the caller reports.

        The shared-state work runs in the state's I/O thread (:meth:`SharedState.run`), so
        the event loop keeps serving cache hits meanwhile.

        Raises:
            LimitExceeded: as for :meth:`call`; scope ``state`` when the shared state cannot
                be read or written (fail closed: no call goes upstream unaccounted).
            BreakerOpen: a breaker refuses the call.
        """
        started = time.monotonic()
        # a local slot free now: ask for the lease in the same trip to the state's thread
        slot = not self._local_slots.locked()
        if slot:
            await self._local_slots.acquire()  # free: returns at once
        try:
            probes, wait, lease = await self.state.run_or_undo(
                self._check_and_reserve,
                operation,
                asset,
                priority,
                deadline - started,
                slot,
                undo=self._undo_admission,
            )
        except BaseException as exc:
            if slot:
                self._local_slots.release()
            if isinstance(exc, LimitExceeded):
                metrics.LIMITER_REJECTIONS.labels(exc.scope).inc()
            elif isinstance(exc, STORE_ERRORS):
                raise self._state_failed(exc) from None
            raise
        if lease is not None:
            self.concurrency.keep_renewed()
        else:
            if slot:
                self._local_slots.release()  # not while waiting for tokens: others may go
            try:
                if wait > 0:
                    await asyncio.sleep(wait)
                lease = await self._acquire_slot(deadline, priority)
            except LimitExceeded as exc:
                self._abandon(probes)
                metrics.LIMITER_REJECTIONS.labels(exc.scope).inc()
                raise
            except STORE_ERRORS as exc:
                self._abandon(probes)
                raise self._state_failed(exc) from None
            except BaseException:
                self._abandon(probes)
                raise
        self.state.health.succeeded()
        metrics.LIMITER_WAIT.labels(operation).observe(time.monotonic() - started)
        return lease, probes

    def _check_and_reserve(
        self, operation: str, asset: str, priority: Priority, max_wait_s: float, lease: bool
    ) -> tuple[list[Scope], float, str | None]:
        """In the state's I/O thread: the budget, the breakers (returns the scopes probed),
        the token buckets (returns the wait for the tokens reserved, seconds) and, when
        ``lease`` and no wait is needed, a concurrency lease (else None)."""
        self.budget.check()
        probes = self.breakers.check((Scope(operation), Scope(operation, asset)))
        try:
            buckets, costs = self._buckets(operation, asset)
            wait = self.buckets.reserve(buckets, costs, max(0.0, max_wait_s), priority)
            held = self.concurrency.try_acquire(priority) if lease and wait <= 0 else None
        except BaseException:
            self.breakers.abandon(probes)
            raise
        return probes, wait, held

    def _undo_admission(self, admitted: tuple[list[Scope], float, str | None]) -> None:
        """In the state's I/O thread: give back what an admission took for a caller that
        was cancelled meanwhile (its probes, its lease)."""
        probes, _, lease = admitted
        self.breakers.abandon(probes)
        if lease is not None:
            self.concurrency.release(lease)

    async def _acquire_slot(self, deadline: float, priority: Priority) -> str:
        """A slot of this process (held until :meth:`_release`), then a host-wide lease.

        This process's callers queue on a local semaphore of ``max_concurrent`` slots, so
        with one worker nobody polls the shared state for a lease; only leases held by other
        worker processes make a caller poll.

        Raises:
            LimitExceeded: no slot before ``deadline`` (monotonic seconds).
        """
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._local_slots.acquire()
        except TimeoutError:
            raise LimitExceeded(
                "concurrency", 1.0, "concurrency limit: every upstream slot is busy"
            ) from None
        try:
            return await self.concurrency.acquire(max(0.0, deadline - time.monotonic()), priority)
        except BaseException:
            self._local_slots.release()
            raise

    def _state_failed(self, exc: BaseException) -> LimitExceeded:
        """The refusal for a call whose limits cannot be checked (reported once per change)."""
        self.state.health.failed(exc, "refusing upstream calls")
        metrics.LIMITER_REJECTIONS.labels("state").inc()
        return LimitExceeded(
            "state", STATE_RETRY_S, "the host's limiter state cannot be read or written"
        )

    def _abandon(self, probes: list[Scope]) -> None:
        if probes:
            self.state.submit(self.breakers.abandon, probes)

    def _release(self, lease: str) -> None:
        """Give back this call's slot: the local one now, the lease in the state's thread
        (queued before any later acquisition, so the host-wide count never runs ahead)."""
        self._local_slots.release()
        self.state.submit(self.concurrency.release, lease)

    async def call(
        self,
        operation: str,
        body: dict[str, Any],
        *,
        asset: str,
        priority: Priority = Priority.INTERACTIVE,
    ) -> UpstreamResponse:
        """Call ``operation`` with ``body`` under every limit, retrying idempotent failures.

        Args:
            asset: what the per-asset limits and breakers key on (COG URL or clip job id).
            priority: interactive map traffic or seeding.

        Raises:
            LimitExceeded: budget spent or no token/slot within ``max_wait_s``.
            BreakerOpen: a breaker for the operation or asset is open.
            UpstreamError: the call failed (after retries where they apply).
        """
        deadline = time.monotonic() + self.settings.max_wait_s
        s = self.settings
        retries = stamina.retry_context(
            on=RETRYABLE,
            attempts=s.retry_attempts,
            timeout=None,
            wait_initial=s.retry_initial_s,
            wait_max=s.retry_max_s,
            wait_jitter=s.retry_initial_s,
        )
        async for attempt in retries:
            with attempt:
                return await self._attempt(operation, body, asset, priority, deadline)
        raise AssertionError("unreachable")  # stamina re-raises the last failure

    async def _attempt(
        self, operation: str, body: dict[str, Any], asset: str, priority: Priority, deadline: float
    ) -> UpstreamResponse:
        lease, probes = await self._admit(operation, asset, priority, deadline)
        try:
            response = await self.client.call(operation, body)
        except UpstreamError as exc:
            self._failed(operation, asset, exc)
            raise
        except BaseException:  # cancelled: the probe, if any, learnt nothing
            self._abandon(probes)
            raise
        finally:
            self._release(lease)
        nbytes = len(response.content)
        metrics.UPSTREAM_REQUESTS.labels(operation, str(response.status)).inc()
        metrics.UPSTREAM_DURATION.labels(operation).observe(response.elapsed_s)
        if nbytes > 0:
            metrics.UPSTREAM_BYTES.labels(operation).inc(nbytes)
        self.state.submit(self._succeeded, operation, asset, nbytes)
        return response

    def _succeeded(self, operation: str, asset: str, nbytes: int) -> None:
        """In the state's I/O thread: close the call's breakers, count its bytes."""
        self.breakers.record_success((Scope(operation), Scope(operation, asset)))
        self._account(nbytes)

    def _failed(self, operation: str, asset: str, exc: UpstreamError) -> None:
        """Breaker and metric bookkeeping for a failed call.

        A 429 opens the asset's breaker (and the operation's for the bandwidth circuit
        breaker) for its Retry-After, capped at ``max_retry_after_s`` (the exception is
        updated, so the client is told the capped time too); 5xx, timeouts and no answer
        count as failures; any other answer (a 4xx but 429, an unusable 2xx) shows the
        upstream alive and closes the call's breakers. The breakers are updated in the
        state's I/O thread, before any later call of this process is admitted.
        """
        metrics.UPSTREAM_REQUESTS.labels(operation, str(exc.status or "error")).inc()
        if isinstance(exc, UpstreamRateLimited):
            exc.retry_after_s = min(exc.retry_after_s, self.settings.max_retry_after_s)
        # stamped now: a Retry-After counts from the answer, not from the bookkeeping
        self.state.submit(self._record_outcome, operation, asset, exc, time.time())

    def _record_outcome(self, operation: str, asset: str, exc: UpstreamError, at: float) -> None:
        scopes = (Scope(operation), Scope(operation, asset))
        if isinstance(exc, UpstreamRateLimited):
            self.breakers.open_for(scopes[1], exc.retry_after_s, at)
            if _bandwidth_breaker(exc):
                self.breakers.open_for(scopes[0], exc.retry_after_s, at)
            else:
                self.breakers.record_success(scopes[:1])  # the operation itself answered
        elif isinstance(exc, RETRYABLE):
            self.breakers.record_failure(scopes, at)
        else:
            self.breakers.record_success(scopes)

    def _account(self, nbytes: int) -> float:
        """In the state's I/O thread: count ``nbytes`` of egress against the budget and the
        bytes bucket (one transaction); returns the bucket's level after."""
        if nbytes <= 0:
            return 0.0
        with self.state.cache.transact(retry=True):
            self.budget.add(nbytes)
            if self._bytes is not None:
                return self.buckets.charge(self._bytes, float(nbytes))
        return 0.0

    async def _received(self, operation: str, nbytes: int) -> float:
        """Count ``nbytes`` of streamed egress (budget, bytes bucket, metrics); returns how
        long the bytes bucket asks the reader to pause, seconds (0 when the state cannot
        be written: that is reported, and the transfer goes on)."""
        if nbytes <= 0:
            return 0.0
        metrics.UPSTREAM_BYTES.labels(operation).inc(nbytes)
        try:
            level = await self.state.run(self._account, nbytes)
        except STORE_ERRORS as exc:
            self.state.health.failed(exc, "refusing upstream calls")
            return 0.0
        if self._bytes is None:
            return 0.0
        return max(0.0, -level / self._bytes.rate)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        operation: str,
        body: dict[str, Any],
        *,
        asset: str,
        priority: Priority = Priority.INTERACTIVE,
    ) -> AsyncIterator[tuple[Mapping[str, str], AsyncIterator[bytes]]]:
        """Open a streamed call (a download) under every limit; yields the upstream response
        headers and an iterator over its body chunks.

        The bytes are paced by the bytes bucket: every :data:`CHARGE_EVERY_BYTES` received
        are charged, and reading pauses while the bucket is in deficit, which slows the
        upstream through TCP flow control. The concurrency slot is held for the whole
        transfer. A stream is not retried: a client resumes with Range instead.

        Raises:
            LimitExceeded, BreakerOpen: as for :meth:`call`, before anything is sent.
            UpstreamError: the upstream refused the call, or the transfer broke.
        """
        deadline = time.monotonic() + self.settings.max_wait_s
        lease, probes = await self._admit(operation, asset, priority, deadline)
        started = time.perf_counter()
        try:
            async with self.client.stream(operation, body) as (headers, body_chunks):

                async def chunks() -> AsyncIterator[bytes]:
                    pending = 0
                    async for chunk in body_chunks(STREAM_CHUNK_BYTES):
                        yield chunk
                        pending += len(chunk)
                        if pending >= CHARGE_EVERY_BYTES:
                            pause = await self._received(operation, pending)
                            pending = 0
                            if pause > 0:
                                await asyncio.sleep(pause)
                    await self._received(operation, pending)

                yield headers, chunks()
        except UpstreamError as exc:
            self._failed(operation, asset, exc)
            raise
        except BaseException:  # the reader gave up or was cancelled: no verdict on the upstream
            self._abandon(probes)
            raise
        finally:
            self._release(lease)
        self.state.submit(self.breakers.record_success, (Scope(operation), Scope(operation, asset)))
        metrics.UPSTREAM_REQUESTS.labels(operation, "200").inc()
        metrics.UPSTREAM_DURATION.labels(operation).observe(time.perf_counter() - started)
