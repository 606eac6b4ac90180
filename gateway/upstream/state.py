"""The upstream state behind one typed interface: what the guard asks of the budget, the
circuit breakers, the token buckets and the concurrency cap, whatever holds them.

Two backends implement :class:`UpstreamState`:

- :class:`gateway.upstream.local.LocalUpstreamState`: the host's diskcache (SQLite), for one
  host however many worker processes it runs (the embedded default);
- :class:`gateway.upstream.fleet.RedisUpstreamState`: one Redis for every replica of a
  fleet (``[state] redis_url``), each call's reservations in one atomic Lua script timed by
  Redis ``TIME``.

Both keep the same rules (see :mod:`gateway.upstream.buckets` and
:mod:`gateway.upstream.breakers`): budget, then breakers, then buckets (reservation in
arrival order up to ``max_wait_s``, seeding never into a deficit), then a concurrency lease;
bytes are charged after the fact. When the store cannot be reached, every method that
decides whether a call may go raises one of :attr:`UpstreamState.errors`, and the guard
refuses the call (fail closed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.upstream.breakers import BreakerStatus, Scope
from gateway.upstream.buckets import Bucket, Priority


@dataclass(frozen=True, slots=True)
class Admitted:
    """What an admission took for one call.

    Attributes:
        probes: breaker scopes this call probes (half-open): report their outcome.
        wait_s: seconds to wait before calling (the tokens are reserved), 0 when none.
        lease: the concurrency lease taken with it, or None (then acquire one after the wait).
    """

    probes: list[Scope]
    wait_s: float
    lease: str | None


@dataclass(frozen=True, slots=True)
class StateReport:
    """For ``/readyz`` and metrics: breakers refusing calls, and today's budget left
    (bytes, None without a budget)."""

    breakers: list[BreakerStatus]
    budget_left: int | None


class StateHealth(Protocol):
    """Reports a failing store once per change (see
    :class:`gateway.storage.diskcaches.WriteHealth`)."""

    def failed(self, exc: BaseException, consequence: str) -> str: ...

    def succeeded(self) -> None: ...


class UpstreamState(ABC):
    """The budget, breakers, buckets and concurrency leases of every upstream call.

    Attributes:
        errors: what its methods raise when the store cannot be read or written.
        health: reports those failures.
        kind: ``local`` or ``redis``, for ``/readyz``.
    """

    errors: tuple[type[BaseException], ...]
    health: StateHealth
    kind: str

    @abstractmethod
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
        """The budget, the breakers of ``scopes``, ``costs[i]`` tokens of ``buckets[i]``
        (all or none) and, when ``want_lease`` and no wait is needed, a lease: atomically.

        With ``prompt`` (the process has no other call in flight) a backend whose answer
        comes from a local thread waits for it on the event loop's thread, briefly, instead
        of the loop's next turn; one that asks over the network ignores it.

        Raises:
            LimitExceeded: budget spent (``budget``), a bucket's wait over ``max_wait_s``
                or, for seeding, any wait (its scope); nothing is taken then.
            BreakerOpen: a breaker refuses the call; nothing is taken then.
        """

    @abstractmethod
    async def acquire_lease(self, max_wait_s: float, priority: Priority) -> str:
        """A concurrency lease within ``max_wait_s`` seconds (renewed while held).

        Raises:
            LimitExceeded: none free in time (scope ``concurrency``).
        """

    @abstractmethod
    def release(self, lease: str) -> None:
        """Give ``lease`` back (queued, never raises)."""

    @abstractmethod
    def abandon(self, probes: Sequence[Scope]) -> None:
        """Give back probes that never reached the upstream (queued, never raises)."""

    @abstractmethod
    def succeeded(self, scopes: Sequence[Scope], nbytes: int) -> None:
        """A call got an answer showing the upstream alive: close ``scopes`` and count its
        ``nbytes`` against the budget and the bytes bucket (queued, never raises)."""

    @abstractmethod
    async def account(self, nbytes: int) -> float:
        """Count ``nbytes`` of streamed egress (budget, bytes bucket); returns the bytes
        bucket's level after (negative: that many bytes are owed; 0 without one)."""

    @abstractmethod
    async def record_success(self, scopes: Sequence[Scope]) -> None:
        """Close ``scopes`` (a considered answer after a failure elsewhere)."""

    @abstractmethod
    async def record_failure(self, scopes: Sequence[Scope], at: float) -> None:
        """A call failed (5xx, timeout, no answer) at Unix time ``at`` (see
        :meth:`gateway.upstream.breakers.Breakers.record_failure`)."""

    @abstractmethod
    async def open_for(self, scope: Scope, seconds: float, at: float) -> None:
        """Open ``scope`` for ``seconds`` from Unix time ``at`` (a 429, a 402)."""

    @abstractmethod
    async def report(self) -> StateReport:
        """Breakers refusing calls now, and the budget left."""

    @abstractmethod
    async def probe(self) -> tuple[bool, str]:
        """Whether the store works now: ``(True, "")`` or ``(False, reason)``."""

    @abstractmethod
    async def aclose(self) -> None:
        """Give back every lease this process holds and stop its background work."""
