"""One process's link to the fleet's Redis: Lua scripts in pipelines, deferred bookkeeping,
reachability and one pub/sub listener.

Every replica of a multi-replica deployment keeps its upstream state (buckets, breakers,
budget, leases: :mod:`gateway.upstream.fleet`) and its cross-replica claims
(:mod:`gateway.storage.coalesce`) in one Redis, through redis-py's asyncio client (hiredis
parses the replies). This module is the one place that talks to it:

- :meth:`RedisLink.call` sends Lua scripts by ``EVALSHA`` in one pipeline (one round trip),
  loading them on ``NOSCRIPT`` (a Redis that restarted forgot them);
- :meth:`RedisLink.defer` queues bookkeeping (a lease given back, bytes counted) without
  waiting: it rides in the pipeline of the next :meth:`call`, or goes on its own after
  :data:`DEFER_S`. So a cache miss costs three round trips: its claim, its admission, and
  one pipeline with its bookkeeping and its published result;
- :attr:`RedisLink.reachable` follows whether the last exchange worked, shown by the
  ``gateway_state_reachable`` gauge and ``/readyz``; redis-py reconnects by itself on the next
  command (one immediate retry, for a pooled connection broken by an outage), and the
  caller fails closed at once when that fails too;
- :meth:`RedisLink.listen` runs one pattern subscription for the process, re-subscribing
  after an outage, and hands each message to the waiter registered for its channel.

Errors: every Redis failure surfaces as :class:`StateUnavailable` (an ``OSError``, so callers
that already treat a failing store as "refuse upstream calls" do so for Redis too). Its text
never holds the URL or the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from gateway import metrics
from gateway.secrets import Secret

log = logging.getLogger("gateway.redis")

DEFER_S = 0.01
"""Longest deferred bookkeeping waits for a pipeline to ride in, seconds."""

HOLD_MAX_S = 1.0
"""Longest deferred bookkeeping waits while a fetch :meth:`RedisLink.holding` it runs towards
its own result pipeline (a tile's check and store), seconds."""

CONNECT_TIMEOUT_S = 0.5
"""How long connecting to Redis may take before the command fails, seconds."""

COMMAND_TIMEOUT_S = 2.0
"""How long one pipeline may take before it fails, seconds."""

RELISTEN_S = 0.5
"""Pause before the pub/sub listener connects again after losing Redis, seconds."""

PREFIX = "ggw:"
"""Start of every key and channel the gateway uses in Redis."""


class StateUnavailable(OSError):
    """Redis cannot be reached or failed a command (the message names only the kind of
    failure, never the URL or a password)."""


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script: its source and SHA-1 (the ``EVALSHA`` name)."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())  # noqa: S324 - Redis names scripts by SHA-1


Arg = str | bytes | int | float
"""One ARGV value of a script call, as redis-py encodes it."""

Call = tuple[Script, Sequence[str], Sequence[Arg]]
"""One script call: the script, its KEYS and its ARGV."""


class RedisLink:
    """The process's connection pool to Redis, with scripts, deferral and reachability.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL (a :class:`Secret`: may hold a
            password).
        password: overrides the URL's password (from a secret file).

    Attributes:
        round_trips: pipelines sent so far for requests' work (each one round trip), for tests
            and the bench.
        background_round_trips: commands of background work (the purge follower's polls),
            counted apart so that they never blur what a request costs.
        reachable: whether the last exchange with Redis worked.
    """

    def __init__(self, url: Secret, password: Secret | None = None) -> None:
        options: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            # no socket_timeout: redis-py bounds each send with asyncio.wait_for then, which on
            # Python 3.11 loses a cancel that lands as the send completes (a claim's renewer
            # then never stops); each exchange is bounded with asyncio.timeout below instead
            # one retry at once: a pooled connection that broke in an outage reconnects; a
            # Redis that is down still fails fast (connection refused), and the caller
            # fails closed
            "retry": Retry(NoBackoff(), 1),
            "health_check_interval": 0,
        }
        if password is not None:
            options["password"] = password.reveal()
        try:
            self.client: aioredis.Redis = aioredis.Redis.from_url(url.reveal(), **options)
        except (ValueError, RedisError) as exc:
            raise StateUnavailable(f"invalid Redis URL ({type(exc).__name__})") from None
        self._url, self._password = url, password
        self._outbox: list[Call] = []
        self._holds = 0
        self._flusher: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._handlers: dict[str, Callable[[str, bytes], None]] = {}
        self.subscribed = asyncio.Event()
        """Set while the pub/sub listener is subscribed."""
        self.round_trips = 0
        self.background_round_trips = 0
        self.reachable = True
        metrics.STATE_REACHABLE.set(1)

    def _mark(self, ok: bool, exc: BaseException | None = None) -> None:
        if ok and not self.reachable:
            log.warning("Redis is reachable again: upstream calls resume")
        elif not ok and self.reachable:
            log.error(
                "Redis is unreachable (%s): cache misses are refused (503), hits still served",
                type(exc).__name__ if exc else "error",
            )
        self.reachable = ok
        metrics.STATE_REACHABLE.set(1 if ok else 0)

    async def call(self, *calls: Call) -> list[Any]:
        """Run ``calls`` (after any deferred bookkeeping) in one pipeline; their results.

        Raises:
            StateUnavailable: Redis cannot be reached, or a script failed.
        """
        batch = self._take_outbox() + list(calls)
        results = await self._send(batch)
        return results[len(batch) - len(calls) :]

    def defer(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Queue a script call without waiting: it goes with the next :meth:`call`, or on
        its own within :data:`DEFER_S`. A failure is logged and marks Redis unreachable."""
        self._outbox.append((script, keys, args))
        if self._flusher is None:
            self._schedule_flush(HOLD_MAX_S if self._holds else DEFER_S)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """While this block runs, deferred bookkeeping waits for the block's own next
        :meth:`call` (up to :data:`HOLD_MAX_S`) instead of going alone after :data:`DEFER_S`.

        A fleet fetch holds the link from its claim to its result pipeline: the call's
        bookkeeping (lease given back, breakers closed, bytes counted) then rides with the
        result however long the tile's check and store take, so a miss stays at three round
        trips. When the block ends, whatever is still queued goes within :data:`DEFER_S`.
        """
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds and self._outbox:
                self._schedule_flush(DEFER_S)

    def _schedule_flush(self, delay_s: float) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        with contextlib.suppress(RuntimeError):  # no running loop: the next call sends it
            loop = asyncio.get_running_loop()
            self._flusher = loop.call_later(delay_s, self._flush_soon)

    async def flush(self) -> None:
        """Send deferred bookkeeping now (a pipeline of its own), and wait for it.

        Raises:
            StateUnavailable: Redis cannot be reached.
        """
        await self._send(self._take_outbox())
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)

    def _take_outbox(self) -> list[Call]:
        batch, self._outbox = self._outbox, []
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        return batch

    def _flush_soon(self) -> None:
        self._flusher = None
        batch = self._take_outbox()
        if not batch:
            return

        async def flush() -> None:
            with contextlib.suppress(StateUnavailable):  # reported by _send
                await self._send(batch)

        task = asyncio.ensure_future(flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send(self, batch: list[Call]) -> list[Any]:
        if not batch:
            return []
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for script, keys, args in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            self.round_trips += 1
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT_S):
                    results = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:  # TimeoutError is an OSError
                self._mark(False, exc)
                raise StateUnavailable(f"Redis unreachable ({type(exc).__name__})") from None
            missing = {
                script
                for (script, _, _), r in zip(batch, results, strict=True)
                if isinstance(r, NoScriptError)
            }
            if missing and attempt == 1:
                await self._load(missing)
                continue
            for result in results:
                if isinstance(result, Exception):
                    self._mark(False, result)
                    log.error("a Redis script failed: %s", type(result).__name__)
                    raise StateUnavailable(f"Redis script failed ({type(result).__name__})")
            self._mark(True)
            return list(results)
        raise AssertionError("unreachable")

    async def _load(self, scripts: set[Script]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for script in scripts:
            pipe.script_load(script.source)
        self.round_trips += 1
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._mark(False, exc)
            raise StateUnavailable(f"Redis unreachable ({type(exc).__name__})") from None

    async def command(self, name: str, *args: object, background: bool = False) -> Any:
        """One plain Redis command (admin and reports: ``SCAN``, ``PING``...); ``background``
        counts it in :attr:`background_round_trips` instead of :attr:`round_trips`.

        Raises:
            StateUnavailable: Redis cannot be reached.
        """
        if background:
            self.background_round_trips += 1
        else:
            self.round_trips += 1
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                result = await self.client.execute_command(name, *args)  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            self._mark(False, exc)
            raise StateUnavailable(f"Redis unreachable ({type(exc).__name__})") from None
        self._mark(True)
        return result

    async def ping(self) -> tuple[bool, str]:
        """Whether Redis answers ``PING`` now: ``(True, "")`` or ``(False, "unreachable")``."""
        try:
            await self.command("PING")
        except StateUnavailable:
            return False, "unreachable"
        return True, ""

    def on_message(self, channel: str, handler: Callable[[str, bytes], None]) -> None:
        """Call ``handler(channel, data)`` for each message published on ``channel``."""
        self._handlers[channel] = handler

    def off_message(self, channel: str) -> None:
        """Stop handing ``channel``'s messages to its handler."""
        self._handlers.pop(channel, None)

    def listen(self, pattern: str) -> None:
        """Start (once) the task that subscribes to ``pattern`` and dispatches its messages
        to the handlers of :meth:`on_message`; it subscribes again after an outage."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.ensure_future(self._listen(pattern))

    async def _listen(self, pattern: str) -> None:
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.psubscribe(pattern)
                self.subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    channel = message["channel"].decode()
                    handler = self._handlers.get(channel)
                    if handler is not None:
                        handler(channel, message["data"])
            except (RedisError, OSError) as exc:
                self._mark(False, exc)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RELISTEN_S)

    async def aclose(self) -> None:
        """Send deferred bookkeeping, stop listening and close the pool."""
        with contextlib.suppress(StateUnavailable):
            await self._send(self._take_outbox())
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()


async def wait_any(awaitable: Awaitable[object], timeout_s: float) -> bool:
    """Await ``awaitable`` for up to ``timeout_s`` seconds (cancelled after); whether it
    finished.

    ``asyncio.timeout``, not ``asyncio.wait_for``: on Python 3.11 ``wait_for`` loses a
    cancellation that arrives as the awaited thing completes (CPython gh-86296, fixed in
    3.12), and a task that cannot be cancelled holds what it holds for ever.
    """
    try:
        async with asyncio.timeout(max(0.0, timeout_s)):
            await awaitable
    except TimeoutError:
        return False
    return True
