"""Per-operation call counters, read by tests (``app[STATS_KEY]``) and ``GET /_emulator/stats``."""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

LOG_SIZE = 2000


class EmulatorStats:
    """Counts operation calls as they reach an operation handler, whatever the outcome.

    Attributes:
        calls: requests per operation id, e.g. ``calls["cog.tile.render"]``.
        statuses: requests per ``(operation_id, http_status)``.
        log: the last ``LOG_SIZE`` calls as ``(operation_id, body_dict_or_None, status)``;
            the body is ``None`` when it was never parsed (auth failure, invalid JSON).
        throttled: total ``429`` answers (egress limits or injected faults).
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.log: deque[tuple[str, dict[str, Any] | None, int]] = deque(maxlen=LOG_SIZE)
        self._recorded = asyncio.Event()

    def record(self, operation_id: str, body: dict[str, Any] | None, status: int) -> None:
        """Count one answered call (and wake :meth:`wait_until`)."""
        self.calls[operation_id] += 1
        self.statuses[(operation_id, status)] += 1
        self.log.append((operation_id, body, status))
        self._recorded.set()
        self._recorded = asyncio.Event()

    async def wait_until(self, done: Callable[[EmulatorStats], bool]) -> None:
        """Return once ``done(self)`` is true, checked after every recorded call (no
        polling). Bound it with ``asyncio.timeout``."""
        while not done(self):
            await self._recorded.wait()

    @property
    def throttled(self) -> int:
        """How many calls were answered ``429 Too Many Requests``, all operations together."""
        return sum(n for (_op, status), n in self.statuses.items() if status == 429)

    def reset(self) -> None:
        """Forget every count and log entry."""
        self.calls.clear()
        self.statuses.clear()
        self.log.clear()

    def as_json(self) -> dict[str, Any]:
        """``{"calls": {op: n}, "statuses": {"op status": n}, "throttled": n}`` for HTTP."""
        return {
            "calls": dict(self.calls),
            "statuses": {f"{op} {status}": n for (op, status), n in self.statuses.items()},
            "throttled": self.throttled,
        }


STATS_KEY: web.AppKey[EmulatorStats] = web.AppKey("geopera_emulator_stats", EmulatorStats)
