"""The embedded upstream state: one host's diskcache
(:class:`~gateway.upstream.buckets.SharedState`) behind
:class:`~gateway.upstream.state.UpstreamState`.

Every transaction runs in the state's own I/O thread (:meth:`SharedState.run`), never on the
event loop; an admission (budget, breakers, buckets and, when free, a lease) is one trip to
that thread (for the call of an idle process, waited for on the event loop's thread, up to
:data:`PROMPT_WAIT_S`). Bookkeeping after a call is queued without waiting
(:meth:`SharedState.submit`).
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway import metrics
from gateway.clock import Clock, system_clock
from gateway.config.settings import LimitSettings
from gateway.storage.diskcaches import STORE_ERRORS
from gateway.upstream.breakers import Breakers, Scope
from gateway.upstream.buckets import (
    Bucket,
    ConcurrencyCap,
    EgressBudget,
    Priority,
    SharedState,
    TokenBuckets,
)
from gateway.upstream.state import Admitted, StateReport, UpstreamState

PROMPT_WAIT_S = 0.005
"""Longest a prompt admission (an idle process's call) waits for the state's I/O thread on
the event loop's thread, seconds; past it the admission is awaited as any other."""


def bytes_bucket(settings: LimitSettings) -> Bucket | None:
    """The upstream egress bucket (bytes/s, burst bytes), or None when ``bytes_per_s`` is 0."""
    if settings.bytes_per_s <= 0:
        return None
    return Bucket("bytes", "bytes", settings.bytes_per_s, max(settings.bytes_burst, 1.0))


class LocalUpstreamState(UpstreamState):
    """The host's upstream state in its diskcache.

    Args:
        state: the host's shared state (its I/O thread runs every transaction).
        settings: the limits.
        clock: Unix time source for breakers, buckets, budget and leases, seconds.

    Attributes:
        buckets, breakers, budget, concurrency: the parts, for tests and commands.
    """

    kind = "local"
    errors = STORE_ERRORS

    def __init__(
        self, state: SharedState, settings: LimitSettings, clock: Clock = system_clock
    ) -> None:
        self.state = state
        self.health = state.health
        self.buckets = TokenBuckets(state, clock=clock)
        self.breakers = Breakers(
            state,
            settings.failure_threshold,
            settings.failure_window_s,
            settings.open_s,
            max_open_s=settings.max_retry_after_s,
            clock=clock,
        )
        self.budget = EgressBudget(state, settings.daily_egress_bytes, clock=clock)
        self.concurrency = ConcurrencyCap(state, settings.max_concurrent, clock=clock)
        self._bytes = bytes_bucket(settings)
        metrics.STATE_REACHABLE.set(1)  # no Redis: nothing to reach (see WriteHealth)

    async def admit(
        self,
        buckets: Sequence[Bucket],
        costs: Sequence[float],
        scopes: Sequence[Scope],
        priority: Priority,
        max_wait_s: float,
        want_lease: bool,
        *,
        prompt: bool = False,
    ) -> Admitted:
        admitted = await self.state.run_or_undo(
            self._admit,
            buckets,
            costs,
            scopes,
            priority,
            max_wait_s,
            want_lease,
            undo=self._undo,
            wait_s=PROMPT_WAIT_S if prompt else 0.0,
        )
        if admitted.lease is not None:
            self.concurrency.keep_renewed()
        return admitted

    def _admit(
        self,
        buckets: Sequence[Bucket],
        costs: Sequence[float],
        scopes: Sequence[Scope],
        priority: Priority,
        max_wait_s: float,
        want_lease: bool,
    ) -> Admitted:
        """In the state's I/O thread: budget, breakers, buckets, and a lease when asked for
        and no wait is needed."""
        self.budget.check()
        probes = self.breakers.check(scopes)
        try:
            wait = self.buckets.reserve(buckets, costs, max(0.0, max_wait_s), priority)
            lease = self.concurrency.try_acquire(priority) if want_lease and wait <= 0 else None
        except BaseException:
            self.breakers.abandon(probes)
            raise
        return Admitted(probes, wait, lease)

    def _undo(self, admitted: Admitted) -> None:
        """Give back what an admission took for a caller cancelled meanwhile."""
        self.breakers.abandon(admitted.probes)
        if admitted.lease is not None:
            self.concurrency.release(admitted.lease)

    async def acquire_lease(self, max_wait_s: float, priority: Priority) -> str:
        return await self.concurrency.acquire(max_wait_s, priority)

    def release(self, lease: str) -> None:
        self.state.submit(self.concurrency.release, lease)

    def abandon(self, probes: Sequence[Scope]) -> None:
        if probes:
            self.state.submit(self.breakers.abandon, list(probes))

    def succeeded(self, scopes: Sequence[Scope], nbytes: int) -> None:
        self.state.submit(self._succeeded, list(scopes), nbytes)

    def _succeeded(self, scopes: list[Scope], nbytes: int) -> None:
        self.breakers.record_success(scopes)
        self._account(nbytes)

    def _account(self, nbytes: int) -> float:
        """Count ``nbytes`` against the budget and the bytes bucket (one transaction)."""
        if nbytes <= 0:
            return 0.0
        with self.state.cache.transact(retry=True):
            self.budget.add(nbytes)
            if self._bytes is not None:
                return self.buckets.charge(self._bytes, float(nbytes))
        return 0.0

    async def account(self, nbytes: int) -> float:
        return await self.state.run(self._account, nbytes)

    async def record_success(self, scopes: Sequence[Scope]) -> None:
        await self.state.run(self.breakers.record_success, list(scopes))

    async def record_failure(self, scopes: Sequence[Scope], at: float) -> None:
        await self.state.run(self.breakers.record_failure, list(scopes), at)

    async def open_for(self, scope: Scope, seconds: float, at: float) -> None:
        await self.state.run(self.breakers.open_for, scope, seconds, at)

    async def report(self) -> StateReport:
        return await self.state.run(self._report)

    def _report(self) -> StateReport:
        return StateReport(list(self.breakers.statuses()), self.budget.remaining())

    async def probe(self) -> tuple[bool, str]:
        # in the state's I/O thread: after the bookkeeping of every call answered before
        return await self.state.run(self.state.probe)

    async def aclose(self) -> None:
        await self.concurrency.aclose()
