"""Circuit breakers on upstream scopes (one asset of an operation, an operation, or every
operation of the organisation).

A breaker is *closed* (calls go upstream), *open* (no call goes upstream until
``open_until``) or *half-open* (open time over: one probe call may go; its success closes the
breaker, its failure opens it again). It opens when

- the upstream answers 429: for the ``Retry-After`` it gave (Geopera rate limits guide: back
  off and retry on 429), on the scope its problem ``type`` names (the guard's choice, see
  :mod:`gateway.upstream.guard`): the asset, the operation, or :data:`ORGANISATION`;
- the upstream answers 402 (subscription past due): :data:`ORGANISATION`, for ``open_s``;
- ``failure_threshold`` failures (5xx, timeouts, no answer) happen within ``window_s``: for
  ``open_s`` seconds, on the operation.

State is kept in the host's :class:`~gateway.upstream.buckets.SharedState`, so every worker
process sees the same breakers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from gateway.errors import BreakerOpen
from gateway.upstream.buckets import SharedState

PROBE_TIMEOUT_S = 30.0
"""How long a half-open probe may take before another caller may probe, seconds."""


@dataclass(frozen=True, slots=True)
class Scope:
    """What a breaker guards. ``asset`` is a COG URL or clip job id, or None for the whole
    operation; it is part of the state key only, never of a metric label or a message.
    ``operation`` ``"*"`` with no asset is :data:`ORGANISATION`: every operation."""

    operation: str
    asset: str | None = None

    @property
    def kind(self) -> str:
        """``organisation``, ``operation`` or ``asset``, for metric labels."""
        if self.asset is not None:
            return "asset"
        return "organisation" if self.operation == "*" else "operation"

    @property
    def key(self) -> tuple[str, str, str]:
        """The breaker's key in the shared state."""
        return ("breaker", self.operation, self.asset or "")


ORGANISATION = Scope("*")
"""Every operation of the organisation: opened by a 402 or an organisation-wide 429."""


@dataclass(slots=True)
class _State:
    open_until: float = 0.0
    probe_until: float = 0.0
    failures: list[float] = field(default_factory=list)


class Breakers:
    """The breakers of one host.

    Args:
        state: shared state.
        failure_threshold: failures within ``window_s`` seconds that open an operation.
        open_s: how long such a breaker stays open before a probe, seconds.
    """

    def __init__(
        self, state: SharedState, failure_threshold: int, window_s: float, open_s: float
    ) -> None:
        self._cache = state.cache
        self.failure_threshold = failure_threshold
        self.window_s = window_s
        self.open_s = open_s

    def _get(self, scope: Scope) -> _State:
        return self._cache.get(scope.key) or _State()

    def check(self, scopes: Iterable[Scope]) -> None:
        """Let a call through, or raise :class:`BreakerOpen` for the first open scope.

        A half-open scope lets exactly one caller through as its probe.
        """
        for scope in scopes:
            if self._cache.get(scope.key) is None:
                continue  # closed and clean: the common case, one read
            with self._cache.transact(retry=True):
                state = self._get(scope)
                now = time.time()
                if state.open_until > now:
                    raise BreakerOpen(scope, state.open_until - now)
                if state.open_until and state.probe_until > now:
                    raise BreakerOpen(scope, state.probe_until - now)
                if state.open_until:
                    state.probe_until = now + PROBE_TIMEOUT_S
                    self._cache.set(scope.key, state)

    def record_success(self, scopes: Iterable[Scope]) -> None:
        """A call succeeded: close these scopes (a no-op for clean ones)."""
        for scope in scopes:
            if self._cache.get(scope.key) is not None:
                self._cache.delete(scope.key)

    def record_failure(self, scope: Scope) -> None:
        """A call failed (5xx, timeout, no answer); opens ``scope`` at the threshold or when
        it was a half-open probe."""
        with self._cache.transact(retry=True):
            state = self._get(scope)
            now = time.time()
            probing = bool(state.open_until) and state.open_until <= now
            state.failures = [t for t in state.failures if t > now - self.window_s] + [now]
            if probing or len(state.failures) >= self.failure_threshold:
                state.open_until, state.probe_until, state.failures = now + self.open_s, 0.0, []
            self._cache.set(scope.key, state, expire=max(self.window_s, self.open_s) * 4)

    def open_for(self, scope: Scope, seconds: float) -> None:
        """Open ``scope`` for ``seconds`` (a 429's Retry-After); never shortens an open time."""
        with self._cache.transact(retry=True):
            state = self._get(scope)
            now = time.time()
            state.open_until = max(state.open_until, now + seconds)
            state.probe_until = 0.0
            self._cache.set(scope.key, state, expire=seconds + self.window_s * 4)

    def open_scopes(self) -> Iterator[Scope]:
        """Scopes open now (for metrics and /readyz)."""
        now = time.time()
        for key in list(self._cache.iterkeys()):
            if isinstance(key, tuple) and key and key[0] == "breaker":
                state = self._cache.get(key)
                if state is not None and state.open_until > now:
                    yield Scope(key[1], key[2] or None)
