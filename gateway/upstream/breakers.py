"""Circuit breakers on upstream scopes (one asset of an operation, an operation, or every
operation of the organisation).

A breaker is *closed* (calls go upstream), *open* (no call goes upstream until
``open_until``) or *half-open* (open time over: one probe call may go; while it is in flight
every other call is refused). The probe's outcome decides:

- any answer that shows the upstream alive (2xx, or a 4xx other than 429) closes the breaker;
- a failure (5xx, timeout, no answer) opens it again for as long as it was last opened for
  (``open_s`` after repeated failures, the ``Retry-After`` after a 429);
- a 429 opens it for its new ``Retry-After``;
- a probe that never reaches the upstream (refused by the limiter, cancelled) gives the probe
  back, so the next call probes at once.

It opens when

- the upstream answers 429: for the ``Retry-After`` it gave (Geopera rate limits guide: back
  off and retry on 429), on the scope its problem ``type`` names (the guard's choice, see
  :mod:`gateway.upstream.guard`): the asset, the operation, or :data:`ORGANISATION`, at most
  ``max_open_s``;
- the upstream answers 402 (subscription past due): :data:`ORGANISATION`, for ``open_s``;
- ``failure_threshold`` failures (5xx, timeouts, no answer) happen within ``window_s``: for
  ``open_s`` seconds, on the operation.

Whether a call is refused is decided in one place (:meth:`Breakers._refusal`), for
:meth:`Breakers.check` and for :meth:`Breakers.statuses` (``/readyz``, metrics), so what is
reported is what is enforced. State is kept in the host's
:class:`~gateway.upstream.buckets.SharedState`, so every worker process sees the same breakers
(a fleet of replicas keeps the same state in Redis: :mod:`gateway.upstream.fleet`).

Each breaker is stored in a versioned plain format, a JSON object
``{"v": 1, "open_until": ..., "probe_until": ..., "open_s": ..., "failures": [...]}``
(Unix seconds), never a pickled class: an entry that cannot be read (another version, a
pickle stored by an older gateway, damage) counts as a closed breaker. Time comes from one
injectable clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from gateway.errors import BreakerOpen
from gateway.storage.diskcaches import STORE_ERRORS
from gateway.upstream.buckets import SharedState

PROBE_TIMEOUT_S = 30.0
"""How long a half-open probe may take before another caller may probe, seconds."""

BREAKER_PREFIX = "breaker/"
"""Start of every breaker key in the shared state (operation ids hold no ``/``)."""

FORMAT_VERSION = 1
"""Version of the stored breaker format (the ``v`` field)."""

DEFAULT_MAX_OPEN_S = 3600.0
"""Longest a breaker stays open for one 429, seconds (``limits.max_retry_after_s``)."""


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
    def key(self) -> str:
        """The breaker's key in the shared state, ``breaker/<operation>/<asset or "">`` (a
        string: diskcache stores string keys as they are, other keys pickled)."""
        return f"{BREAKER_PREFIX}{self.operation}/{self.asset or ''}"


ORGANISATION = Scope("*")
"""Every operation of the organisation: opened by a 402 or an organisation-wide 429."""


@dataclass(slots=True)
class BreakerState:
    """One breaker's state (Unix seconds); ``open_s`` is how long it was last opened for
    (a failed probe reopens it as long)."""

    open_until: float = 0.0
    probe_until: float = 0.0
    failures: list[float] = field(default_factory=list)
    open_s: float = 0.0

    def dump(self) -> str:
        """The stored form: a JSON object with ``"v": FORMAT_VERSION``."""
        return json.dumps({"v": FORMAT_VERSION, **asdict(self)}, separators=(",", ":"))

    @classmethod
    def load(cls, stored: object) -> BreakerState | None:
        """The state in ``stored`` (see :meth:`dump`), or None when it cannot be read."""
        if not isinstance(stored, str):
            return None
        try:
            data = json.loads(stored)
            if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
                return None
            return cls(
                float(data["open_until"]),
                float(data["probe_until"]),
                [float(t) for t in data["failures"]],
                float(data["open_s"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """A breaker that refuses calls now: ``state`` is ``open`` or ``half-open`` (a probe is
    in flight), ``retry_after_s`` how long until a call may be tried, seconds."""

    scope: Scope
    state: str
    retry_after_s: float


class Breakers:
    """The breakers of one host.

    Args:
        state: shared state.
        failure_threshold: failures within ``window_s`` seconds that open an operation.
        open_s: how long such a breaker stays open before a probe, seconds.
        max_open_s: the longest any breaker stays open, seconds: caps a 429's Retry-After,
            and any open time already stored (by an older gateway, or with a higher cap).
        clock: Unix time source, seconds (tests pass their own).
    """

    def __init__(
        self,
        state: SharedState,
        failure_threshold: int,
        window_s: float,
        open_s: float,
        max_open_s: float = DEFAULT_MAX_OPEN_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cache = state.cache
        self._clock = clock
        self.failure_threshold = failure_threshold
        self.window_s = window_s
        self.open_s = open_s
        self.max_open_s = max_open_s

    def _read(self, key: str) -> BreakerState | None:
        """The stored state under ``key``; None when absent or unreadable (closed)."""
        try:
            stored = self._cache.get(key)
        except STORE_ERRORS:
            raise
        except Exception:  # a pickle of a class that no longer exists: unreadable
            return None
        return BreakerState.load(stored)

    def _get(self, scope: Scope) -> BreakerState:
        return self._read(scope.key) or BreakerState()

    def _put(self, scope: Scope, state: BreakerState, now: float) -> None:
        self._cache.set(scope.key, state.dump(), expire=self._keep_s(state, now))

    @staticmethod
    def _refusal(state: BreakerState, now: float) -> tuple[str, float] | None:
        """``(state name, seconds until a call may go)`` when ``state`` refuses calls at
        ``now`` (``open``, or ``half-open`` with a probe in flight); None when one may go."""
        if state.open_until > now:
            return "open", state.open_until - now
        if state.open_until and state.probe_until > now:
            return "half-open", state.probe_until - now
        return None

    def _capped(self, state: BreakerState, now: float) -> bool:
        """Hold an open time beyond ``now + max_open_s`` to it; True when it changed."""
        if state.open_until > now + self.max_open_s:
            state.open_until = now + self.max_open_s
            state.open_s = min(state.open_s, self.max_open_s)
            return True
        return False

    def check(self, scopes: Iterable[Scope]) -> list[Scope]:
        """Let a call through, or raise :class:`BreakerOpen` for the first refusing scope.

        A half-open scope lets exactly one caller through as its probe.

        Returns:
            The scopes this call probes. The caller reports the outcome for them with
            :meth:`record_success` or :meth:`record_failure`, or gives them back with
            :meth:`abandon` when the call never reaches the upstream.
        """
        probes: list[Scope] = []
        try:
            for scope in scopes:
                if self._read(scope.key) is None:
                    continue  # closed and clean: the common case, one read
                with self._cache.transact(retry=True):
                    state = self._get(scope)
                    now = self._clock()
                    changed = self._capped(state, now)
                    refusal = self._refusal(state, now)
                    if refusal is None and state.open_until:
                        state.probe_until = now + PROBE_TIMEOUT_S
                        probes.append(scope)
                        changed = True
                    if changed:
                        self._put(scope, state, now)
                if refusal is not None:  # after the transaction: raising inside rolls it back
                    raise BreakerOpen(scope, refusal[1])
        except BaseException:
            self.abandon(probes)
            raise
        return probes

    def _keep_s(self, state: BreakerState, now: float) -> float:
        """How long the shared state keeps a breaker entry, seconds."""
        return max(state.open_until - now, 0.0) + max(self.window_s, self.open_s) * 4

    def record_success(self, scopes: Iterable[Scope]) -> None:
        """A call got an answer showing the upstream alive (2xx, or 4xx other than 429):
        close these scopes (a no-op for clean ones)."""
        for scope in scopes:
            if self._cache.get(scope.key) is not None:
                self._cache.delete(scope.key)

    def record_failure(self, scopes: Iterable[Scope], at: float | None = None) -> None:
        """A call failed (5xx, timeout, no answer) at Unix time ``at`` (default now).

        A scope whose half-open probe this was opens again for as long as it was last open;
        an operation scope also counts the failure and opens for ``open_s`` at the threshold.
        Other asset scopes are left alone (failures count per operation).
        """
        for scope in scopes:
            if scope.asset is not None and self._cache.get(scope.key) is None:
                continue
            with self._cache.transact(retry=True):
                state = self._get(scope)
                now = self._clock() if at is None else at
                probing = bool(state.open_until) and state.open_until <= now
                if probing:
                    state.open_s = state.open_s or self.open_s
                    state.open_until, state.probe_until = now + state.open_s, 0.0
                elif scope.asset is None:
                    recent = [t for t in state.failures if t > now - self.window_s]
                    state.failures = [*recent, now]
                    if len(state.failures) >= self.failure_threshold:
                        state.open_until, state.probe_until = now + self.open_s, 0.0
                        state.open_s, state.failures = self.open_s, []
                else:
                    continue
                self._put(scope, state, now)

    def abandon(self, probes: Iterable[Scope]) -> None:
        """Give back probes that never reached the upstream, so the next call may probe."""
        for scope in probes:
            with self._cache.transact(retry=True):
                state = self._get(scope)
                if state.probe_until:
                    state.probe_until = 0.0
                    self._put(scope, state, self._clock())

    def open_for(self, scope: Scope, seconds: float, at: float | None = None) -> None:
        """Open ``scope`` for ``seconds`` (a 429's Retry-After) from Unix time ``at`` (when
        the answer came; default now), at most ``max_open_s``; never shortens an open
        time."""
        seconds = min(max(seconds, 0.0), self.max_open_s)
        with self._cache.transact(retry=True):
            state = self._get(scope)
            now = self._clock() if at is None else at
            state.open_until = max(state.open_until, now + seconds)
            state.open_s, state.probe_until = seconds, 0.0
            self._capped(state, now)
            self._put(scope, state, now)

    def statuses(self) -> Iterator[BreakerStatus]:
        """Breakers that refuse calls now, open or half-open (for metrics and /readyz)."""
        now = self._clock()
        for key in list(self._cache.iterkeys()):
            if isinstance(key, str) and key.startswith(BREAKER_PREFIX):
                stored = self._read(key)
                if stored is None:
                    continue
                state = BreakerState(stored.open_until, stored.probe_until)
                self._capped(state, now)
                refusal = self._refusal(state, now)
                if refusal is not None:
                    operation, _, asset = key.removeprefix(BREAKER_PREFIX).partition("/")
                    yield BreakerStatus(Scope(operation, asset or None), *refusal)
