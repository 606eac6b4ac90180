"""Operator alerts: upstream conditions only an operator can fix, logged once per change.

An alert is *raised* where an upstream call fails (the guard, the source check) and
*resolved* when a later call shows the condition is gone. Each change of state is one log
line for the whole host, however many client requests, coalesced waiters or worker
processes saw the failure: the state lives in the host's shared state (one diskcache
transaction decides who logs). ``/readyz`` lists the active alerts and ``/metrics`` exports
them as ``gateway_upstream_alert``.

Kinds (:data:`KINDS`), with the subject that tells two alerts of a kind apart:

- ``key-refused`` (subject ``""``): a 401, the key is wrong or expired;
- ``scope-missing`` (the Geopera scope, e.g. ``clip:read``): a 403 for the key's scope;
- ``payment-required`` (``""``): a 402, every operation is paused;
- ``source-unknown`` (a layer name): the upstream does not know the layer's COG.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from gateway.upstream.buckets import SharedState

log = logging.getLogger("gateway.alerts")

KEY_REFUSED = "key-refused"
SCOPE_MISSING = "scope-missing"
PAYMENT_REQUIRED = "payment-required"
SOURCE_UNKNOWN = "source-unknown"
KINDS = (KEY_REFUSED, SCOPE_MISSING, PAYMENT_REQUIRED, SOURCE_UNKNOWN)

_STATE_KEY = ("alerts",)

_RESOLVED = {
    KEY_REFUSED: "resolved: the upstream accepts the gateway's key again",
    PAYMENT_REQUIRED: "resolved: the upstream serves the organisation again (no more 402)",
    SCOPE_MISSING: "resolved: the gateway's key has the {subject} scope again",
}


@dataclass(frozen=True, slots=True)
class Alert:
    """One active alert: ``kind`` (of :data:`KINDS`), ``subject``, the ``message`` logged
    when it was raised (never holding a key or token) and ``since`` (Unix time, seconds)."""

    kind: str
    subject: str
    message: str
    since: float

    def as_json(self) -> dict[str, object]:
        """``{"kind", "subject", "message", "since"}`` for ``/readyz``."""
        return {
            "kind": self.kind,
            "subject": self.subject,
            "message": self.message,
            "since": round(self.since, 3),
        }


class Alerts:
    """The host's operator alerts, in the shared state.

    Args:
        state: the host's shared state (every worker process sees the same alerts).
    """

    def __init__(self, state: SharedState) -> None:
        self._cache = state.cache

    def raise_alert(
        self, kind: str, subject: str, message: str, level: int = logging.CRITICAL
    ) -> bool:
        """Make ``(kind, subject)`` active; logs ``message`` at ``level`` only when it was not
        active already. Returns whether this call raised it."""
        with self._cache.transact(retry=True):
            active: dict[tuple[str, str], Alert] = self._cache.get(_STATE_KEY) or {}
            if (kind, subject) in active:
                return False
            active[(kind, subject)] = Alert(kind, subject, message, time.time())
            self._cache.set(_STATE_KEY, active)
        log.log(level, message)
        return True

    def resolve(self, kind: str, subject: str = "", message: str | None = None) -> bool:
        """Make ``(kind, subject)`` inactive; logs one WARNING line (``message``, or a default
        one) when it was active. Returns whether this call resolved it."""
        if not self._cache.get(_STATE_KEY):
            return False  # the common case: nothing active, one read
        with self._cache.transact(retry=True):
            active: dict[tuple[str, str], Alert] = self._cache.get(_STATE_KEY) or {}
            alert = active.pop((kind, subject), None)
            if alert is None:
                return False
            self._cache.set(_STATE_KEY, active)
        log.warning(message or f"resolved: {kind} {subject}".rstrip())
        return True

    def resolve_after_success(self, scope: str | None) -> None:
        """A call needing Geopera ``scope`` (or None) succeeded: the key works, the
        organisation is paid up and the key has that scope. One read when nothing is
        active."""
        active = self._cache.get(_STATE_KEY)
        if not active:
            return
        for kind, subject in list(active):
            if kind in (KEY_REFUSED, PAYMENT_REQUIRED) or (
                kind == SCOPE_MISSING and subject == scope
            ):
                self.resolve(kind, subject, _RESOLVED[kind].format(subject=subject))

    def active(self) -> list[Alert]:
        """The active alerts, oldest first."""
        alerts = (self._cache.get(_STATE_KEY) or {}).values()
        return sorted(alerts, key=lambda a: a.since)
