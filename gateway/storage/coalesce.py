"""Request coalescing (single-flight): one upstream fetch per key, however many ask at once.

Like nginx's ``proxy_cache_lock`` or Varnish's waiting list, but with no lock timeout: every
caller that arrives while a fetch for its key is in flight waits for that fetch and gets its
result or its exception. The fetch runs as its own task, so a caller that goes away (client
disconnect, cancellation) never cancels work that others still wait on. That task's first
step runs at once, inside the call that starts it (:func:`start_eagerly`), not after every
other step the event loop has queued: a cold tile's upstream request is written before the
rest of a burst of requests for it is even looked at.

:class:`SingleFlight` joins the callers of one process; :class:`FleetFlight` joins the
replicas of a fleet through Redis (the owner's result is read by the others from Redis);
:class:`FleetFiles` does it for clip files, which are too big for Redis (the others stream
the file from the replica that has it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway import metrics
from gateway.errors import LimitExceeded
from gateway.storage.redis_link import (
    PREFIX,
    Arg,
    RedisLink,
    Script,
    StateUnavailable,
    wait_any,
)

T = TypeVar("T")


def fail_closed() -> LimitExceeded:
    """The refusal for a claim that Redis cannot take (scope ``state``, ``Retry-After`` 5 s:
    nothing is fetched while the fleet's state is unreachable), counted in
    ``gateway_limiter_rejections_total``."""
    metrics.LIMITER_REJECTIONS.labels("state").inc()
    return LimitExceeded("state", 5.0, "the fleet's limiter state (Redis) cannot be reached")


class _Started(Coroutine[Any, Any, T]):
    """A coroutine whose first step :func:`start_eagerly` ran already, for the task that
    goes on with it: the task's first ``send`` hands over what that step gave (the future
    it waits on, its result or its exception); everything after goes to the coroutine."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._first: tuple[int, Any] | None = None  # (0 yielded | 1 returned | 2 raised, it)

    def step(self) -> None:
        """Run the coroutine's first step now, keeping its outcome for the task."""
        try:
            self._first = (0, self._coro.send(None))
        except StopIteration as stop:
            self._first = (1, stop.value)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # the task raises it, as if its own step had
            self._first = (2, exc)

    def send(self, value: Any) -> Any:
        first, self._first = self._first, None
        if first is None:
            return self._coro.send(value)
        kind, outcome = first
        if kind == 1:
            raise StopIteration(outcome)
        if kind == 2:
            raise outcome
        return outcome

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        first, self._first = self._first, None
        if first is not None and first[0] != 0:  # finished already: nothing left to stop
            raise typ if val is None else val
        return self._coro.throw(typ, val, tb) if val is not None else self._coro.throw(typ)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        raise TypeError("run by the task of start_eagerly, not awaited")


def start_eagerly(
    coro: Coroutine[Any, Any, T],
    created: Callable[[asyncio.Task[T]], object] | None = None,
    context: contextvars.Context | None = None,
) -> asyncio.Task[T]:
    """A task for ``coro`` whose first step (everything up to its first real wait) runs
    now, inside this call, as that task (``asyncio.current_task()`` is the new task, in its
    own copy of the context), instead of after every other step the event loop has queued
    meanwhile; the rest runs as any task's. Tasks created during that first step start the
    same way (aiohttp, for one, writes a request's body from a task of its own, eagerly
    only on Python 3.12+). Python 3.12 calls these eager tasks (``eager_start``); this does
    the same on 3.11, with asyncio's ``_enter_task`` and ``_leave_task`` (the functions
    every task step uses to say which task runs) and a task factory set for the first
    step only.

    Args:
        created: called with the task before its first step runs (to register it where
            that step, or anything it starts, may look for it).
        context: the task's context (default: a copy of the current one).
    """
    loop = asyncio.get_running_loop()
    started = _Started(coro)
    context = contextvars.copy_context() if context is None else context
    task: asyncio.Task[T] = asyncio.Task(started, loop=loop, context=context)
    if created is not None:
        created(task)
    factory = loop.get_task_factory()
    loop.set_task_factory(_eager_task)
    outer = asyncio.current_task(loop)
    if outer is not None:
        asyncio.tasks._leave_task(loop, outer)
    asyncio.tasks._enter_task(loop, task)
    try:
        context.run(started.step)
    finally:
        asyncio.tasks._leave_task(loop, task)
        if outer is not None:
            asyncio.tasks._enter_task(loop, outer)
        loop.set_task_factory(factory)
    return task


def _eager_task(
    loop: asyncio.AbstractEventLoop, coro: Any, *, name: str | None = None, **kwargs: Any
) -> asyncio.Task[Any]:
    """The task factory of an eager first step (:func:`start_eagerly`)."""
    task = start_eagerly(coro, context=kwargs.get("context"))
    if name is not None:
        task.set_name(name)
    return task


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

    async def run(self, key: str, fetch: Callable[[], Coroutine[Any, Any, T]]) -> tuple[T, bool]:
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
        return await asyncio.shield(self.start(key, fetch)), False

    def start(self, key: str, fetch: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Future[T]:
        """Start ``fetch()`` for ``key`` now and return its task, for the caller on whose
        behalf it runs to await (shielded); callers of :meth:`run` join it meanwhile. For
        code that starts a fetch from a callback.

        The fetch's first step runs inside this call (:func:`start_eagerly`), with the
        fetch already in flight for ``key``.

        Raises:
            RuntimeError: a fetch for ``key`` is in flight already.
        """
        if key in self._inflight:
            raise RuntimeError("a fetch for this key is in flight already")

        def created(task: asyncio.Task[T]) -> None:
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finish(key, done))

        return start_eagerly(fetch(), created)

    def _finish(self, key: str, done: asyncio.Future[T]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so an error nobody waited for is not warned about


# --- cross-replica single-flight (issue 13) ---

RESULT_TTL_S = 30.0
"""How long a fetched result stays in Redis for the waiters of other replicas, seconds."""

SUBSCRIBE_WAIT_S = 1.0
"""Longest a first claim waits for the process's pub/sub subscription, seconds."""

CLAIM_PREFIX = PREFIX + "claim:"
RESULT_PREFIX = PREFIX + "result:"
DONE_PREFIX = PREFIX + "done:"

CLAIM = Script(
    """
-- KEYS: claim, result; ARGV: owner token, lease ms, 1 to drop a stored result first.
-- {'result', bytes} | {'claimed'} | {'held', ms left on the holder's claim}
if ARGV[3] == '1' then redis.call('DEL', KEYS[2]) else
  local r = redis.call('GET', KEYS[2])
  if r then return {'result', r} end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'claimed'} end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'claimed'}
end
return {'held', tostring(redis.call('PTTL', KEYS[1]))}
"""
)

FINISH = Script(
    """
-- KEYS: claim, result; ARGV: owner token, result bytes, result ttl ms, channel
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[4], 'done')
return 1
"""
)

GIVE_UP = Script(
    """
-- KEYS: claim; ARGV: owner token, channel. The fetch failed: free the claim, wake waiters.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'failed')
end
return 1
"""
)

RENEW_CLAIM = Script(
    """
-- KEYS: claim; ARGV: owner token, lease ms. 1 while this owner still holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
)


class FleetFlight:
    """Single-flight across replicas: one fetch per key in the whole fleet, through Redis.

    Within a process, :class:`SingleFlight` already joins concurrent callers; this joins the
    processes. The first replica to claim a key (``SET NX`` with an owner token and an
    expiry of ``lease_s``, renewed every ``lease_s / 3`` while its fetch runs) fetches; the
    others wait on pub/sub (one pattern subscription per process), not by polling, and then
    read the result from Redis.

    Why the result goes through Redis: each replica has its own local cache, so a waiter on
    another replica cannot read the owner's. The owner stores the result (a few tens of KiB
    for a tile) under a key that expires after :data:`RESULT_TTL_S` and publishes a short
    notice; each waiting replica reads it once (its own callers are joined locally) and
    stores it in its local cache. The bytes are not sent in the notice itself, since every
    replica's subscription receives every notice; nor kept longer, since Redis is not a
    second tile cache (a consistent-hash load balancer sends each tile's later requests to
    one replica anyway).

    A claim whose owner died expires within ``lease_s``: a waiter wakes when the claim's
    remaining time (``PTTL``) has passed and claims it itself. A fetch that fails frees the
    claim and wakes the waiters, one of which claims it next.

    Args:
        link: the process's Redis link.
        lease_s: claim lifetime without renewal, seconds.
        owner: names this process in its claims (``host:pid``).
    """

    def __init__(self, link: RedisLink, lease_s: float, owner: str) -> None:
        self.link = link
        self.lease_s = lease_s
        self.owner = owner
        self._waiting: dict[str, asyncio.Future[str]] = {}

    def _notice(self, channel: str, data: bytes) -> None:
        waiter = self._waiting.get(channel)
        if waiter is not None and not waiter.done():
            waiter.set_result(data.decode(errors="replace"))

    async def run(
        self,
        key: str,
        fetch: Callable[[], Awaitable[bytes]],
        timeout_s: float,
        accept: Callable[[bytes], bool] = lambda _: True,
    ) -> tuple[bytes, bool]:
        """``fetch()``'s result for ``key``, fetched once in the fleet.

        Args:
            fetch: produces the result's bytes (and stores it locally); runs on the replica
                holding the claim.
            timeout_s: longest wait for another replica's fetch, seconds.
            accept: whether a stored result is still good (else it is fetched again).

        Returns:
            ``(result, coalesced)``: ``coalesced`` is True when another replica fetched it.

        Raises:
            LimitExceeded: Redis cannot be reached (scope ``state``: fail closed, nothing is
                fetched), or the holder's fetch outlasted ``timeout_s`` (scope ``claim``).
            Whatever ``fetch()`` raised, on the replica that ran it.
        """
        token = f"{self.owner}:{uuid.uuid4().hex[:12]}"
        claim, result, channel = CLAIM_PREFIX + key, RESULT_PREFIX + key, DONE_PREFIX + key
        lease_ms = max(1, int(self.lease_s * 1000))
        deadline = time.monotonic() + timeout_s
        drop = 0
        self.link.listen(DONE_PREFIX + "*")
        if not self.link.subscribed.is_set():  # at start: so no notice is missed
            await wait_any(self.link.subscribed.wait(), SUBSCRIBE_WAIT_S)
        try:
            while True:
                waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                self._waiting[channel] = waiter
                self.link.on_message(channel, self._notice)
                (answer,) = await self.link.call((CLAIM, [claim, result], [token, lease_ms, drop]))
                verdict = answer[0].decode()
                if verdict == "result":
                    if accept(answer[1]):
                        return answer[1], True
                    drop = 1
                    continue
                if verdict == "claimed":
                    break
                left = time.monotonic() - deadline
                if left >= 0:
                    raise LimitExceeded(
                        "claim", 1.0, "another replica's fetch of this item is taking too long"
                    )
                holder_ms = max(0, int(answer[1]))
                await wait_any(waiter, min(-left, holder_ms / 1000 + 0.02))
        except StateUnavailable:
            raise fail_closed() from None
        finally:
            self._waiting.pop(channel, None)
            self.link.off_message(channel)
        return await self._fetch_as_owner(key, fetch, token), False

    async def _fetch_as_owner(
        self, key: str, fetch: Callable[[], Awaitable[bytes]], token: str
    ) -> bytes:
        claim, result, channel = CLAIM_PREFIX + key, RESULT_PREFIX + key, DONE_PREFIX + key
        with self.link.holding():  # the fetch's bookkeeping rides with the result
            try:
                async with renewing(self.link, claim, token, self.lease_s):
                    payload = await fetch()
            except BaseException:
                self.link.defer(GIVE_UP, [claim], [token, channel])
                raise
            # if Redis fails now, the waiters take the claim over once it expires
            with contextlib.suppress(StateUnavailable):
                await self.link.call(
                    (FINISH, [claim, result], [token, payload, int(RESULT_TTL_S * 1000), channel])
                )
        return payload


@contextlib.asynccontextmanager
async def renewing(link: RedisLink, claim: str, token: str, lease_s: float) -> AsyncIterator[None]:
    """Renew ``claim`` (held with ``token``) every ``lease_s / 3`` seconds while the block
    runs, each time for ``lease_s``.

    The renewer is stopped by an event it checks between renewals, not by cancellation: a
    cancel that lands inside a Redis command can be lost (redis-py 8.0 and 8.1 swallow it in
    pipelines, which is why the dependency is pinned below 8; ``test_redis_state`` checks
    it), and an owner that waited for a renewer which never ended would hold its claim, and
    every request waiting on it, for ever. The block never waits for a renewal in flight; one
    that lands after the claim was released renews nothing (the owner token no longer
    matches).
    """
    lease_ms = max(1, int(lease_s * 1000))
    stop = asyncio.Event()

    async def renew() -> None:
        while not await wait_any(stop.wait(), lease_s / 3):
            with contextlib.suppress(StateUnavailable):  # retried next round
                await link.call((RENEW_CLAIM, [claim], [token, lease_ms]))

    task = asyncio.get_running_loop().create_task(renew(), name=f"renew {claim}")
    try:
        yield
    finally:
        stop.set()
        _running_renewers.add(task)
        task.add_done_callback(_running_renewers.discard)


_running_renewers: set[asyncio.Task[None]] = set()
"""Renewers told to stop whose last renewal is still in flight (kept referenced until they
end)."""


# --- cross-replica single-flight of clip files (issue 13) ---

HOLDERS_TTL_S = 7 * 86400.0
"""How long a file's list of holding replicas lasts after its last addition, seconds (a
replica that evicted the file answers 404 and is dropped from the list before then)."""

FILE_CLAIM_PREFIX = PREFIX + "file-claim:"
FILE_HOLDERS_PREFIX = PREFIX + "file-holders:"

FILE_CLAIM = Script(
    """
-- KEYS: claim, holders; ARGV: owner token ('<peer url> <random>'), lease ms, own peer url.
-- {'holders', url...} | {'claimed'} | {'held', holder's token, ms left on its claim}
local others = {}
for _, url in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if url ~= ARGV[3] then others[#others + 1] = url end
end
if #others > 0 then return {'holders', unpack(others)} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'claimed'} end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'claimed'}
end
if not holder then return {'held', '', '0'} end
return {'held', holder, tostring(redis.call('PTTL', KEYS[1]))}
"""
)

FILE_STORED = Script(
    """
-- KEYS: claim, holders; ARGV: owner token (or ''), own peer url, holders ttl ms
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
)

FILE_GIVE_UP = Script(
    """
-- KEYS: claim; ARGV: owner token. The fetch failed: free the claim for the next replica.
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
)

FILE_FORGET = Script(
    """
-- KEYS: holders; ARGV: a peer url that no longer holds the file
redis.call('SREM', KEYS[1], ARGV[1])
return 1
"""
)


@dataclass(frozen=True, slots=True)
class FileSource:
    """Where a replica gets a clip file from, by :meth:`FleetFiles.claim`.

    Attributes:
        claimed: this replica holds the fleet's claim: it fetches the file from the upstream.
        holders: peer URLs of replicas that hold the stored file (``claimed`` False).
        fetcher: the peer URL of the replica fetching it now, or "" (``claimed`` False and
            no holders).
        fetcher_left_s: how long the fetcher's claim lasts unless renewed, seconds.
    """

    claimed: bool
    holders: tuple[str, ...] = ()
    fetcher: str = ""
    fetcher_left_s: float = 0.0


class FleetFiles:
    """Single-flight of clip files across replicas: one upstream transfer per file for the
    whole fleet, through Redis.

    Files are far too big to pass through Redis, so Redis only says who has them: a claim per
    file (``SET NX`` with an owner token that carries the owner's peer URL, expiring after
    ``lease_s`` unless renewed while the transfer runs) and, once stored, the set of replicas
    that hold the file. A replica that does not hold the claim streams the file from a
    holder, or from the fetcher while its transfer runs (the fetcher's peer route passes on
    bytes as they arrive): it needs no wakeup, since the bytes themselves are the signal. A
    fetcher that died leaves a claim that expires within ``lease_s``; the next replica then
    claims it and fetches from the upstream.

    Args:
        link: the process's Redis link.
        lease_s: claim lifetime without renewal, seconds.
        peer_url: this replica's own address as the others reach it (``state.peer_url``).
    """

    def __init__(self, link: RedisLink, lease_s: float, peer_url: str) -> None:
        self.link = link
        self.lease_s = lease_s
        self.peer_url = peer_url

    def token(self) -> str:
        """A new owner token for one transfer: this replica's peer URL and a random part."""
        return f"{self.peer_url} {uuid.uuid4().hex[:12]}"

    async def claim(self, key: str, token: str) -> FileSource:
        """Claim ``key`` for this replica, unless other replicas hold the file or fetch it.

        Raises:
            LimitExceeded: Redis cannot be reached (scope ``state``: fail closed).
        """
        lease_ms = max(1, int(self.lease_s * 1000))
        keys = [FILE_CLAIM_PREFIX + key, FILE_HOLDERS_PREFIX + key]
        try:
            (answer,) = await self.link.call((FILE_CLAIM, keys, [token, lease_ms, self.peer_url]))
        except StateUnavailable:
            raise fail_closed() from None
        verdict = answer[0].decode()
        if verdict == "claimed":
            return FileSource(claimed=True)
        if verdict == "holders":
            return FileSource(claimed=False, holders=tuple(u.decode() for u in answer[1:]))
        fetcher = answer[1].decode().rsplit(" ", 1)[0]
        return FileSource(claimed=False, fetcher=fetcher, fetcher_left_s=int(answer[2]) / 1000)

    @contextlib.asynccontextmanager
    async def holding(self, key: str, token: str) -> AsyncIterator[None]:
        """Keep the claim on ``key`` renewed while the block (the upstream transfer) runs;
        when the block raises, the claim is freed for the next replica."""
        claim = FILE_CLAIM_PREFIX + key
        try:
            async with renewing(self.link, claim, token, self.lease_s):
                yield
        except BaseException:
            self.link.defer(FILE_GIVE_UP, [claim], [token])
            raise

    async def stored(self, key: str, token: str = "") -> None:
        """Record that this replica holds the stored file (and free the claim ``token``
        held, if any). A Redis failure is logged by the link and ignored: the claim then
        expires, and others fetch the file themselves."""
        keys = [FILE_CLAIM_PREFIX + key, FILE_HOLDERS_PREFIX + key]
        args: list[Arg] = [token, self.peer_url, int(HOLDERS_TTL_S * 1000)]
        with contextlib.suppress(StateUnavailable):
            await self.link.call((FILE_STORED, keys, args))

    def forget(self, key: str, peer_url: str) -> None:
        """Drop ``peer_url`` from the holders of ``key`` (it answered that it has no such
        file, or could not be reached); sent with the next Redis exchange."""
        self.link.defer(FILE_FORGET, [FILE_HOLDERS_PREFIX + key], [peer_url])
