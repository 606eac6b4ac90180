"""The upstream guard: every call to Geopera passes the budget, breakers, limiter and retries.

Order for one call: daily egress budget → circuit breakers (operation, asset) → token buckets
(operation, asset) with a bounded wait → host-wide concurrency cap → the HTTP call. Idempotent
reads that fail with 5xx, a timeout or no answer are retried with jittered exponential backoff
(stamina), each attempt going through the breakers and buckets again; each failure counts
toward the operation's breaker. What a failed call does to the host (decided here, once per
call, never per waiting request):

- 429: opens the breaker of the scope its problem ``type`` maps to
  (``upstream.throttle_scopes``: the asset, the operation, or every operation of the
  organisation) for the ``Retry-After`` it gave; a type the mapping does not know pauses the
  whole operation, since an unattributed 429 may be the organisation's bandwidth breaker.
  Not retried: the caller serves stale or answers 503.
- 402 (subscription past due): pauses every operation
  (:data:`~gateway.upstream.breakers.ORGANISATION`) for ``breaker_open_s`` and raises the
  ``payment-required`` operator alert.
- 401, or 403 for the key's scope: raises the ``key-refused`` / ``scope-missing`` alert
  (:mod:`gateway.upstream.alerts`: one CRITICAL line per change of state for the host).
- other 4xx (404, 400, a 403 on another organisation's job): the upstream is up and
  answering; they count as a success for the breakers (a half-open probe closes).

A success closes the call's breakers and resolves the alerts it disproves. A half-open probe
that never reaches the upstream is given back (see :mod:`gateway.upstream.breakers`). The
budget, breakers, buckets and leases sit behind :class:`~gateway.upstream.state.UpstreamState`
(the host's diskcache, or the fleet's Redis); operator alerts stay in the host's diskcache
(one log line per change of state per host). A 429's ``Retry-After`` is capped at
``max_retry_after_s``. When the state cannot be reached the call is refused (scope ``state``,
503 with ``Retry-After``): a paid API is never called unaccounted.
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
from gateway.clock import Clock, system_clock
from gateway.config.settings import LimitSettings
from gateway.errors import LimitExceeded
from gateway.storage.diskcaches import STORE_ERRORS
from gateway.upstream.alerts import KEY_REFUSED, PAYMENT_REQUIRED, SCOPE_MISSING, Alerts
from gateway.upstream.breakers import ORGANISATION, Scope
from gateway.upstream.buckets import Bucket, Priority, SharedState
from gateway.upstream.client import (
    OPERATION_SCOPES,
    GeoperaClient,
    UpstreamAuthError,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
    UpstreamPaymentRequired,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamResponse,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.upstream.local import LocalUpstreamState, bytes_bucket
from gateway.upstream.state import UpstreamState

log = logging.getLogger("gateway.guard")

STREAM_CHUNK_BYTES = 1 << 20
"""Read size for streamed bodies, bytes."""

CHARGE_EVERY_BYTES = 8 << 20
"""Streamed bytes are charged to the bytes bucket and budget in batches of this many."""

RETRYABLE = (UpstreamServerError, UpstreamTimeout, UpstreamUnavailable)
"""Failures worth another attempt for an idempotent read."""

STATE_RETRY_S = 5.0
"""Retry-After when the host's limiter state cannot be read or written, seconds."""


ANSWERED = (UpstreamNotFound, UpstreamRejected, UpstreamForbidden)
"""Failures that are the upstream's considered answer: it is up (a success for breakers)."""


def _scopes(operation: str, asset: str) -> tuple[Scope, Scope, Scope]:
    """The breakers one call passes: the organisation, its operation and its asset."""
    return (ORGANISATION, Scope(operation), Scope(operation, asset))


class UpstreamGuard:
    """Protected access to the upstream for one worker process.

    Args:
        client: the Geopera client.
        state: the host's shared state (operator alerts; and the limiter unless ``limiter``).
        settings: the limits.
        limiter: where budget, breakers, buckets and leases live (default: ``state``,
            through :class:`~gateway.upstream.local.LocalUpstreamState`).
        clock: Unix time, seconds, for that default limiter's breakers, buckets, budget and
            leases (:mod:`gateway.clock`; the Redis backend times by Redis ``TIME``).

    Attributes:
        alerts: the host's operator alerts (:class:`~gateway.upstream.alerts.Alerts`).
        limiter: the upstream state (:class:`~gateway.upstream.state.UpstreamState`).
    """

    def __init__(
        self,
        client: GeoperaClient,
        state: SharedState,
        settings: LimitSettings,
        limiter: UpstreamState | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.client = client
        self.settings = settings
        self.state = state
        self.alerts = Alerts(state)
        self.clock = clock
        self.limiter = (
            limiter if limiter is not None else LocalUpstreamState(state, settings, clock=clock)
        )
        self._local_slots = asyncio.Semaphore(settings.max_concurrent)
        self._bytes = bytes_bucket(settings)
        self._calling = 0  # this process's calls between their admission and their answer

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
        prompt: bool = False,
    ) -> tuple[str, list[Scope]]:
        """Budget, breakers, buckets and a concurrency lease; returns the lease and the
        breaker scopes this call probes (half-open), whose outcome the caller reports.

        The admission is one trip to the state (its I/O thread, or one Lua script in
        Redis), so the event loop keeps serving cache hits meanwhile. With ``prompt`` (no
        other call of this process in flight) the host's state is waited for on the event
        loop's thread, briefly (:meth:`~gateway.upstream.state.UpstreamState.admit`), so
        the call is written without waiting for the loop's next turn.

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
        limiter = self.limiter
        buckets, costs = self._buckets(operation, asset)
        try:
            admitted = await limiter.admit(
                buckets,
                costs,
                _scopes(operation, asset),
                priority,
                max(0.0, deadline - started),
                slot,
                prompt=prompt and slot,
            )
        except BaseException as exc:
            if slot:
                self._local_slots.release()
            if isinstance(exc, LimitExceeded):
                metrics.LIMITER_REJECTIONS.labels(exc.scope).inc()
            elif isinstance(exc, limiter.errors):
                raise self._state_failed(exc) from None
            raise
        probes, wait, lease = admitted.probes, admitted.wait_s, admitted.lease
        if lease is None:
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
            except limiter.errors as exc:
                self._abandon(probes)
                raise self._state_failed(exc) from None
            except BaseException:
                self._abandon(probes)
                raise
        limiter.health.succeeded()
        metrics.LIMITER_WAIT.labels(operation).observe(time.monotonic() - started)
        return lease, probes

    async def _acquire_slot(self, deadline: float, priority: Priority) -> str:
        """A slot of this process (held until :meth:`_release`), then a host-wide lease.

        This process's callers queue on a local semaphore of ``max_concurrent`` slots, so
        with one worker nobody polls the shared state for a lease; only leases held by other
        worker processes (or replicas) make a caller poll.

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
            return await self.limiter.acquire_lease(max(0.0, deadline - time.monotonic()), priority)
        except BaseException:
            self._local_slots.release()
            raise

    def _state_failed(self, exc: BaseException) -> LimitExceeded:
        """The refusal for a call whose limits cannot be checked (reported once per change)."""
        self.limiter.health.failed(exc, "refusing upstream calls")
        metrics.LIMITER_REJECTIONS.labels("state").inc()
        where = "the fleet's" if self.limiter.kind == "redis" else "the host's"
        return LimitExceeded(
            "state", STATE_RETRY_S, f"{where} limiter state cannot be read or written"
        )

    def _abandon(self, probes: list[Scope]) -> None:
        if probes:
            self.limiter.abandon(probes)

    def _release(self, lease: str) -> None:
        """Give back this call's slot: the local one now, the lease queued in the state
        (before any later acquisition, so the shared count never runs ahead)."""
        self._local_slots.release()
        self.limiter.release(lease)

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
        prompt = self._calling == 0  # nothing else in flight: admitted without a loop turn
        self._calling += 1
        try:
            lease, probes = await self._admit(operation, asset, priority, deadline, prompt)
            try:
                response = await self.client.call(operation, body)
            except UpstreamError as exc:
                await self._failed(operation, asset, exc)
                raise
            except BaseException:  # cancelled: the probe, if any, learnt nothing
                self._abandon(probes)
                raise
            finally:
                self._release(lease)
        finally:
            self._calling -= 1
        nbytes = len(response.content)
        metrics.UPSTREAM_REQUESTS.labels(operation, str(response.status)).inc()
        metrics.UPSTREAM_DURATION.labels(operation).observe(response.elapsed_s)
        if nbytes > 0:
            metrics.UPSTREAM_BYTES.labels(operation).inc(nbytes)
        self._succeeded(operation, asset, nbytes)
        return response

    def _succeeded(self, operation: str, asset: str, nbytes: int) -> None:
        """Queued: close the call's breakers and count its bytes (the state), resolve the
        alerts a success disproves (the host's state, in its I/O thread)."""
        self.limiter.succeeded(_scopes(operation, asset), nbytes)
        self.state.submit(self.alerts.resolve_after_success, OPERATION_SCOPES.get(operation))

    async def _failed(self, operation: str, asset: str, exc: UpstreamError) -> None:
        """Metrics, and the failure's bookkeeping (:meth:`_record_outcome`), waited for:
        the breakers are open and the operator alert is logged before any client hears of
        the failure (failures are the rare path; a success's bookkeeping is queued without
        waiting).

        The exception is updated first, so the client is told what the breakers enforce: a
        429's Retry-After capped at ``max_retry_after_s``, a 402's pause of ``open_s``.
        """
        metrics.UPSTREAM_REQUESTS.labels(operation, str(exc.status or "error")).inc()
        if isinstance(exc, UpstreamRateLimited):
            exc.retry_after_s = min(exc.retry_after_s, self.settings.max_retry_after_s)
        elif isinstance(exc, UpstreamPaymentRequired):
            exc.retry_after_s = self.settings.open_s
        try:  # stamped now: a Retry-After counts from the answer, not from the bookkeeping
            await self._record_outcome(operation, asset, exc, self.clock())
        except (*self.limiter.errors, *STORE_ERRORS) as exc_state:
            self.limiter.health.failed(exc_state, "refusing upstream calls")

    async def _record_outcome(
        self, operation: str, asset: str, exc: UpstreamError, at: float
    ) -> None:
        """What a failed call does to the breakers and the host's alerts (the module
        docstring lists the rules), and one log line."""
        scopes = _scopes(operation, asset)
        limiter = self.limiter
        if isinstance(exc, UpstreamRateLimited):
            scope = {"asset": scopes[2], "organisation": ORGANISATION}.get(exc.scope, scopes[1])
            await limiter.open_for(scope, exc.retry_after_s, at)
            if scope is scopes[2]:
                await limiter.record_success(scopes[:2])  # the operation itself answered
            log.warning(
                "upstream throttled %s (problem type %s): %s paused for %.0f s",
                operation,
                exc.problem_type or "none",
                "every operation" if scope is ORGANISATION else f"the {scope.kind}",
                exc.retry_after_s,
            )
        elif isinstance(exc, UpstreamPaymentRequired):
            await limiter.open_for(ORGANISATION, self.settings.open_s, at)
            await self.state.run(
                self.alerts.raise_alert,
                PAYMENT_REQUIRED,
                "",
                f"UPSTREAM ANSWERED 402 PAYMENT REQUIRED ({operation}): the organisation's "
                "Geopera subscription is past due or its quota is spent; every upstream call "
                f"is paused, {self.settings.open_s:g} s at a time, until it is settled",
            )
        elif isinstance(exc, UpstreamAuthError):
            await limiter.record_success(scopes)  # the upstream is up: the key is the fault
            await self.state.run(self._key_alert, operation, exc)
        elif isinstance(exc, RETRYABLE):
            await limiter.record_failure(scopes[1:], at)
            log.warning("upstream call failed: %s", exc)
        else:  # a considered 4xx answer, or an unusable 2xx: the upstream is up
            if not isinstance(exc, ANSWERED):
                log.warning("upstream sent an unusable answer: %s", exc)
            await limiter.record_success(scopes)

    def _key_alert(self, operation: str, exc: UpstreamAuthError) -> None:
        """The alert for a refused key (401) or a missing scope (403); in the host state's
        I/O thread."""
        if exc.status == 401:
            self.alerts.raise_alert(
                KEY_REFUSED,
                "",
                f"UPSTREAM REFUSED THE GATEWAY'S KEY (401 on {operation}): the Geopera key is "
                "wrong or expired; fix GEOPERA_API_KEY",
            )
            return
        scope = OPERATION_SCOPES.get(operation, "the operation's")
        self.alerts.raise_alert(
            SCOPE_MISSING,
            scope,
            f"UPSTREAM REFUSED THE GATEWAY'S KEY THE {scope} SCOPE (403 on {operation}): "
            f"grant the key {scope}, or set GEOPERA_API_KEY to a key that has it",
        )

    async def _received(self, operation: str, nbytes: int) -> float:
        """Count ``nbytes`` of streamed egress (budget, bytes bucket, metrics); returns how
        long the bytes bucket asks the reader to pause, seconds (0 when the state cannot
        be written: that is reported, and the transfer goes on)."""
        if nbytes <= 0:
            return 0.0
        metrics.UPSTREAM_BYTES.labels(operation).inc(nbytes)
        try:
            level = await self.limiter.account(nbytes)
        except self.limiter.errors as exc:
            self.limiter.health.failed(exc, "refusing upstream calls")
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
            await self._failed(operation, asset, exc)
            raise
        except BaseException:  # the reader gave up or was cancelled: no verdict on the upstream
            self._abandon(probes)
            raise
        finally:
            self._release(lease)
        self._succeeded(operation, asset, 0)
        metrics.UPSTREAM_REQUESTS.labels(operation, "200").inc()
        metrics.UPSTREAM_DURATION.labels(operation).observe(time.perf_counter() - started)
