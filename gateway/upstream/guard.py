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

A success closes the call's breakers and resolves the alerts it disproves.
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
from gateway.config.settings import LimitSettings
from gateway.upstream.alerts import KEY_REFUSED, PAYMENT_REQUIRED, SCOPE_MISSING, Alerts
from gateway.upstream.breakers import ORGANISATION, Breakers, Scope
from gateway.upstream.buckets import (
    Bucket,
    ConcurrencyCap,
    EgressBudget,
    LimitExceeded,
    Priority,
    SharedState,
    TokenBuckets,
)
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

log = logging.getLogger("gateway.guard")

STREAM_CHUNK_BYTES = 1 << 20
"""Read size for streamed bodies, bytes."""

CHARGE_EVERY_BYTES = 8 << 20
"""Streamed bytes are charged to the bytes bucket and budget in batches of this many."""

STREAM_LEASE_S = 6 * 3600.0
"""A streamed transfer's concurrency lease, seconds (a crashed worker's slot returns after)."""

RETRYABLE = (UpstreamServerError, UpstreamTimeout, UpstreamUnavailable)
"""Failures worth another attempt for an idempotent read."""

ANSWERED = (UpstreamNotFound, UpstreamRejected, UpstreamForbidden)
"""Failures that are the upstream's considered answer: it is up (a success for breakers)."""


def _scopes(operation: str, asset: str) -> tuple[Scope, Scope, Scope]:
    """The breakers one call passes: the organisation, its operation and its asset."""
    return (ORGANISATION, Scope(operation), Scope(operation, asset))


class UpstreamGuard:
    """Protected access to the upstream for one worker process.

    Args:
        client: the Geopera client.
        state: the host's shared limiter state.
        settings: the limits.
        read_timeout_s: the client's read timeout; concurrency leases outlive it.

    Attributes:
        alerts: the host's operator alerts (:class:`~gateway.upstream.alerts.Alerts`).
    """

    def __init__(
        self,
        client: GeoperaClient,
        state: SharedState,
        settings: LimitSettings,
        read_timeout_s: float,
    ) -> None:
        self.client = client
        self.settings = settings
        self.alerts = Alerts(state)
        self.buckets = TokenBuckets(state)
        self.breakers = Breakers(
            state, settings.failure_threshold, settings.failure_window_s, settings.open_s
        )
        self.budget = EgressBudget(state, settings.daily_egress_bytes)
        self.concurrency = ConcurrencyCap(state, settings.max_concurrent, read_timeout_s + 30)
        self._local_slots = asyncio.Semaphore(settings.max_concurrent)
        self._bytes = (
            Bucket("bytes", "bytes", settings.bytes_per_s, max(settings.bytes_burst, 1.0))
            if settings.bytes_per_s > 0
            else None
        )

    def _buckets(self, operation: str, asset: str) -> tuple[list[Bucket], list[float]]:
        """The buckets one call draws from, and what it takes from each up front.

        The bytes bucket takes nothing up front (the size is unknown): a call waits while it
        is in deficit, and :meth:`_charge_bytes` takes the bytes received afterwards.
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
        lease_s: float | None = None,
    ) -> str:
        """Budget, breakers, buckets and a concurrency lease; returns the lease."""
        scopes = _scopes(operation, asset)
        self.budget.check()
        self.breakers.check(scopes)
        started = time.monotonic()
        try:
            buckets, costs = self._buckets(operation, asset)
            wait = self.buckets.reserve(buckets, costs, max(0.0, deadline - started), priority)
            if wait > 0:
                await asyncio.sleep(wait)
            async with self._local_slots:
                lease = await self.concurrency.acquire(
                    max(0.0, deadline - time.monotonic()), priority, lease_s
                )
        except LimitExceeded as exc:
            metrics.LIMITER_REJECTIONS.labels(exc.scope).inc()
            raise
        metrics.LIMITER_WAIT.labels(operation).observe(time.monotonic() - started)
        return lease

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
        lease = await self._admit(operation, asset, priority, deadline)
        try:
            response = await self.client.call(operation, body)
        except UpstreamError as exc:
            self._failed(operation, asset, exc)
            raise
        finally:
            self.concurrency.release(lease)
        self._succeeded(operation, asset)
        await self._received(operation, len(response.content))
        metrics.UPSTREAM_REQUESTS.labels(operation, str(response.status)).inc()
        metrics.UPSTREAM_DURATION.labels(operation).observe(response.elapsed_s)
        return response

    def _succeeded(self, operation: str, asset: str) -> None:
        """Close the call's breakers and resolve the alerts a success disproves."""
        self.breakers.record_success(_scopes(operation, asset))
        self.alerts.resolve_after_success(OPERATION_SCOPES.get(operation))

    def _failed(self, operation: str, asset: str, exc: UpstreamError) -> None:
        """Breakers, alerts, metrics and one log line for a failed call."""
        metrics.UPSTREAM_REQUESTS.labels(operation, str(exc.status or "error")).inc()
        if isinstance(exc, UpstreamRateLimited):
            scope = {
                "asset": Scope(operation, asset),
                "organisation": ORGANISATION,
            }.get(exc.scope, Scope(operation))
            self.breakers.open_for(scope, exc.retry_after_s)
            log.warning(
                "upstream throttled %s (problem type %s): %s paused for %.0f s",
                operation,
                exc.problem_type or "none",
                "every operation" if scope is ORGANISATION else f"the {scope.kind}",
                exc.retry_after_s,
            )
        elif isinstance(exc, UpstreamPaymentRequired):
            exc.retry_after_s = self.settings.open_s
            self.breakers.open_for(ORGANISATION, self.settings.open_s)
            self.alerts.raise_alert(
                PAYMENT_REQUIRED,
                "",
                f"UPSTREAM ANSWERED 402 PAYMENT REQUIRED ({operation}): the organisation's "
                "Geopera subscription is past due or its quota is spent; every upstream call "
                f"is paused, {self.settings.open_s:g} s at a time, until it is settled",
            )
        elif isinstance(exc, UpstreamAuthError):
            self._key_alert(operation, exc)
        elif isinstance(exc, RETRYABLE):
            self.breakers.record_failure(Scope(operation))
            log.warning("upstream call failed: %s", exc)
        elif isinstance(exc, ANSWERED):
            self.breakers.record_success(_scopes(operation, asset))
        else:
            log.warning("upstream sent an unusable answer: %s", exc)

    def _key_alert(self, operation: str, exc: UpstreamAuthError) -> None:
        """The alert for a refused key (401) or a missing scope (403)."""
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
        """Count ``nbytes`` of egress (budget, bytes bucket, metrics); returns how long the
        bytes bucket asks the caller to pause, seconds."""
        if nbytes <= 0:
            return 0.0
        self.budget.add(nbytes)
        metrics.UPSTREAM_BYTES.labels(operation).inc(nbytes)
        if self._bytes is None:
            return 0.0
        level = self.buckets.charge(self._bytes, float(nbytes))
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
        lease = await self._admit(operation, asset, priority, deadline, lease_s=STREAM_LEASE_S)
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
        finally:
            self.concurrency.release(lease)
        self._succeeded(operation, asset)
        metrics.UPSTREAM_REQUESTS.labels(operation, "200").inc()
        metrics.UPSTREAM_DURATION.labels(operation).observe(time.perf_counter() - started)
