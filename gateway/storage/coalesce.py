"""Request coalescing (single-flight): one upstream fetch per key, however many ask at once.

Like nginx's ``proxy_cache_lock`` or Varnish's waiting list, but with no lock timeout: every
caller that arrives while a fetch for its key is in flight waits for that fetch and gets its
result or its exception. The fetch runs as its own task, so a caller that goes away (client
disconnect, cancellation) never cancels work that others still wait on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Per-key deduplication of concurrent async work within one event loop."""

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        """Number of keys with a fetch in flight."""
        return len(self._inflight)

    def in_flight(self, key: str) -> bool:
        """Whether a fetch for ``key`` is running now."""
        return key in self._inflight

    async def run(self, key: str, fetch: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Run ``fetch()`` once for ``key`` among concurrent callers.

        Returns:
            ``(result, coalesced)``: ``coalesced`` is False for the caller that started the
            fetch and True for callers that joined it.

        Raises:
            Whatever ``fetch()`` raised, to every caller that waited on it.
        """
        future = self._inflight.get(key)
        if future is not None:
            return await asyncio.shield(future), True
        task = asyncio.ensure_future(fetch())
        self._inflight[key] = task
        task.add_done_callback(lambda done: self._finish(key, done))
        return await asyncio.shield(task), False

    def _finish(self, key: str, done: asyncio.Future[T]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so an error nobody waited for is not warned about
