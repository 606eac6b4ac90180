"""The fleet's upstream state in Redis: every replica shares one budget, one set of breakers,
one set of token buckets and one concurrency cap.

Each operation is one Lua script, atomic in Redis and timed by Redis ``TIME``, so replica
clocks do not matter. The rules are those of the local backend
(:mod:`gateway.upstream.buckets`, :mod:`gateway.upstream.breakers`):

- **Token buckets** are GCRA (as in redis-cell): each bucket stores its theoretical arrival
  time ``tat`` (Unix seconds); its level at ``now`` is ``burst - (tat - now) * rate``. An
  admission reserves every bucket of the call at once, even into a deficit, and returns the
  wait until the deficit has refilled, so callers are served in arrival order without
  polling; a wait over ``max_wait_s`` reserves nothing and is refused with the wait as its
  Retry-After; seeding never reserves into a deficit. Bytes are charged after the call.
- **An empty Redis lets no burst through.** The first script to run in an empty Redis stores
  its birth time (``ggw:born``); a bucket never seen since then starts empty at that time and
  refills at its rate. A Redis that restarts empty therefore admits no more than the
  configured rates, however drained the buckets were before.
- **Breakers** are hashes ``{v: 1, open_until, probe_until, open_s, failures}``; an entry of
  another version counts as closed. A half-open breaker lets exactly one probe through for
  the whole fleet: the admission that finds it half-open stamps ``probe_until`` in the same
  script that decides.
- **The daily egress budget** is a hash of bytes per UTC day (the Redis clock's day).
- **Concurrency leases** are members of one sorted set scored by their expiry; a replica
  renews its own every ``lease_s / 3`` while it holds them, so a replica that dies loses its
  slots within ``lease_s``.

Bookkeeping after a call (the lease given back, breakers closed, bytes counted) is deferred
(:meth:`gateway.storage.redis_link.RedisLink.defer`) and rides with the next pipeline. When
Redis cannot be reached every method raises
:class:`~gateway.storage.redis_link.StateUnavailable` and the guard refuses the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Sequence

from gateway.config.settings import LimitSettings
from gateway.errors import BreakerOpen, LimitExceeded
from gateway.storage.redis_link import PREFIX, Arg, RedisLink, Script, StateUnavailable
from gateway.upstream.breakers import BREAKER_PREFIX, PROBE_TIMEOUT_S, BreakerStatus, Scope
from gateway.upstream.buckets import Bucket, Priority
from gateway.upstream.local import bytes_bucket
from gateway.upstream.state import Admitted, StateReport, UpstreamState

log = logging.getLogger("gateway.fleet")

EGRESS_KEY = PREFIX + "egress"
LEASES_KEY = PREFIX + "leases"
BORN_KEY = PREFIX + "born"
BUCKET_PREFIX = PREFIX + "bucket:"
FLEET_BREAKER_PREFIX = PREFIX + BREAKER_PREFIX

LEASE_POLL_S = 0.02
"""How often a caller looks for a free concurrency lease while every one is taken, seconds."""

_NOW = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(v) return string.format('%.6f', v) end
local function born(now)
  local b = tonumber(redis.call('GET', KEYS[BORN] or '') or '')
  if not b then
    redis.call('SET', KEYS[BORN], num(now))
    return now
  end
  return b
end
local function tat_of(key, now, b, rate, burst)
  local tat = tonumber(redis.call('GET', key) or '')
  if not tat then tat = b + burst / rate end
  if tat < now then tat = now end
  return tat
end
local function store_tat(key, tat, now)
  redis.call('SET', key, num(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
end
local function count_bytes(key, now, n)
  local day = math.floor(now / 86400)
  redis.call('HINCRBY', key, tostring(day), n)
  redis.call('HDEL', key, tostring(day - 3))
end
"""

ADMIT = Script(
    "local BORN = 3\n"
    + _NOW
    + """
-- KEYS: egress, leases, born, breakers (ARGV[9] of them), buckets
-- ARGV: budget, max_wait_s, seeding, lease_limit (0: no lease), lease id, lease_s,
--       probe_timeout_s, max_open_s, breaker count, then rate, burst, cost per bucket
local now = clock()
local budget = tonumber(ARGV[1])
if budget > 0 then
  local spent = tonumber(redis.call('HGET', KEYS[1], tostring(math.floor(now / 86400))) or '0')
  if spent >= budget then return {'budget', '0', num(86400 - now % 86400)} end
end
local nb = tonumber(ARGV[9])
local max_open = tonumber(ARGV[8])
local probes = {}
for i = 1, nb do
  local s = redis.call('HMGET', KEYS[3 + i], 'v', 'open_until', 'probe_until')
  if s[1] == '1' then
    local open_until = math.min(tonumber(s[2]) or 0, now + max_open)
    local probe_until = tonumber(s[3]) or 0
    if open_until > now then return {'open', tostring(i), num(open_until - now)} end
    if open_until > 0 and probe_until > now then
      return {'half-open', tostring(i), num(probe_until - now)}
    end
    if open_until > 0 then probes[#probes + 1] = i end
  end
end
local b = born(now)
local first = 4 + nb
local worst, worst_i = 0, 0
local tats = {}
for j = first, #KEYS do
  local a = 10 + (j - first) * 3
  local rate, burst, cost = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local tat = tat_of(KEYS[j], now, b, rate, burst) + cost / rate
  local wait = tat - now - burst / rate
  if wait > worst then worst, worst_i = wait, j - first + 1 end
  tats[j] = tat
end
if ARGV[3] == '1' and worst > 0 then return {'seeding', tostring(worst_i), num(worst)} end
if worst > tonumber(ARGV[2]) then return {'limit', tostring(worst_i), num(worst)} end
for j = first, #KEYS do store_tat(KEYS[j], tats[j], now) end
for _, i in ipairs(probes) do
  redis.call('HSET', KEYS[3 + i], 'probe_until', num(now + tonumber(ARGV[7])))
end
local lease = ''
local limit = tonumber(ARGV[4])
if limit > 0 and worst <= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) < limit then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
    redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[6]) * 1000) + 1000)
    lease = ARGV[5]
  end
end
local probed = {}
for _, i in ipairs(probes) do probed[#probed + 1] = tostring(i) end
return {'ok', num(math.max(worst, 0)), table.concat(probed, ','), lease}
"""
)

LEASE = Script(
    """
-- KEYS: leases; ARGV: limit, lease id, lease_s. 1 when taken, 0 when every slot is busy.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000) + 1000)
return 1
"""
)

RENEW = Script(
    """
-- KEYS: leases; ARGV: lease_s, lease ids. Extends the leases still held (a lapsed one is not
-- taken back: its slot may be another's by now).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
return 1
"""
)

RELEASE = Script(
    """
-- KEYS: leases; ARGV: lease ids
for i = 1, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
return 1
"""
)

ACCOUNT = Script(
    "local BORN = 2\n"
    + _NOW
    + """
-- KEYS: egress, born, [bytes bucket], then breakers to close (ARGV[4] tells whether the
-- bucket is there). ARGV: nbytes, rate, burst, has bucket. Returns the bucket's level.
local now = clock()
local n = tonumber(ARGV[1])
local level = 0
local first = 3
if ARGV[4] == '1' then first = 4 end
if n > 0 then
  count_bytes(KEYS[1], now, n)
  if ARGV[4] == '1' then
    local rate, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
    local tat = tat_of(KEYS[3], now, born(now), rate, burst) + n / rate
    store_tat(KEYS[3], tat, now)
    level = burst - (tat - now) * rate
  end
end
for j = first, #KEYS do redis.call('DEL', KEYS[j]) end
return num(level)
"""
)

_BREAKER_WRITE = """
local function keep(open_until, now, window, open_s)
  return math.ceil((math.max(open_until - now, 0) + math.max(window, open_s) * 4) * 1000)
end
local function write(key, open_until, probe_until, open_s, failures, now, window, cfg_open)
  redis.call('HSET', key, 'v', '1', 'open_until', num(open_until),
    'probe_until', num(probe_until), 'open_s', num(open_s), 'failures', failures)
  redis.call('PEXPIRE', key, keep(open_until, now, window, cfg_open))
end
"""

FAILURE = Script(
    "local BORN = 0\n"
    + _NOW
    + _BREAKER_WRITE
    + """
-- KEYS: breakers; ARGV: threshold, window_s, open_s, then 1/0 per key (operation scope)
local now = clock()
local threshold, window, cfg_open = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
  local operation = ARGV[3 + i] == '1'
  local s = redis.call('HMGET', key, 'v', 'open_until', 'probe_until', 'open_s', 'failures')
  local known = s[1] == '1'
  if known or operation then
    local open_until = known and (tonumber(s[2]) or 0) or 0
    local open_s = known and (tonumber(s[4]) or 0) or 0
    local failures = {}
    if known and s[5] and s[5] ~= '' then
      for t in string.gmatch(s[5], '[^,]+') do
        if tonumber(t) > now - window then failures[#failures + 1] = t end
      end
    end
    if open_until > 0 and open_until <= now then
      if open_s <= 0 then open_s = cfg_open end
      write(key, now + open_s, 0, open_s, table.concat(failures, ','), now, window, cfg_open)
    elseif operation then
      failures[#failures + 1] = num(now)
      if #failures >= threshold then
        write(key, now + cfg_open, 0, cfg_open, '', now, window, cfg_open)
      else
        write(key, open_until, 0, open_s, table.concat(failures, ','), now, window, cfg_open)
      end
    end
  end
end
return 1
"""
)

OPEN_FOR = Script(
    "local BORN = 0\n"
    + _NOW
    + _BREAKER_WRITE
    + """
-- KEYS: the breaker; ARGV: seconds (already capped), max_open_s, window_s, open_s.
-- Never shortens an open time.
local now = clock()
local seconds, max_open = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'v', 'open_until', 'failures')
local open_until = 0
local failures = ''
if s[1] == '1' then open_until = tonumber(s[2]) or 0; failures = s[3] or '' end
open_until = math.min(math.max(open_until, now + seconds), now + max_open)
write(KEYS[1], open_until, 0, math.min(seconds, max_open), failures, now,
  tonumber(ARGV[3]), tonumber(ARGV[4]))
return 1
"""
)

ABANDON = Script(
    """
-- KEYS: breakers whose probe never reached the upstream: the next call may probe at once
for _, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'v') == '1' then redis.call('HSET', key, 'probe_until', '0') end
end
return 1
"""
)

READ = Script(
    """
-- KEYS: egress, then breakers. Returns now, today's bytes, then per breaker open_until and
-- probe_until (empty for one of another version).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {string.format('%.6f', now),
  redis.call('HGET', KEYS[1], tostring(math.floor(now / 86400))) or '0'}
for i = 2, #KEYS do
  local s = redis.call('HMGET', KEYS[i], 'v', 'open_until', 'probe_until')
  if s[1] == '1' then
    out[#out + 1] = s[2] or '0'; out[#out + 1] = s[3] or '0'
  else
    out[#out + 1] = ''; out[#out + 1] = ''
  end
end
return out
"""
)

SCRIPTS = (ADMIT, LEASE, RENEW, RELEASE, ACCOUNT, FAILURE, OPEN_FOR, ABANDON, READ)


def _breaker_key(scope: Scope) -> str:
    return PREFIX + scope.key


def _bucket_key(bucket: Bucket) -> str:
    return BUCKET_PREFIX + bucket.key


class RedisUpstreamState(UpstreamState):
    """The fleet's upstream state in Redis (see the module docstring).

    Args:
        link: the process's Redis link.
        settings: the limits (the same on every replica).
        lease_s: how long a lease outlives a replica that stops renewing it, seconds.
    """

    kind = "redis"
    errors = (StateUnavailable,)

    def __init__(self, link: RedisLink, settings: LimitSettings, lease_s: float = 5.0) -> None:
        self.link = link
        self.settings = settings
        self.lease_s = lease_s
        self.health = _Reachability()
        self._bytes = bytes_bucket(settings)
        self._prefix = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._held: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None

    def _lease_limit(self, priority: Priority) -> int:
        limit = self.settings.max_concurrent
        return limit if priority is Priority.INTERACTIVE else max(1, limit * 3 // 4)

    async def admit(
        self,
        buckets: Sequence[Bucket],
        costs: Sequence[float],
        scopes: Sequence[Scope],
        priority: Priority,
        max_wait_s: float,
        want_lease: bool,
        *,
        prompt: bool = False,  # a Redis round trip cannot be waited for on the loop
    ) -> Admitted:
        s = self.settings
        lease = self._prefix + uuid.uuid4().hex[:8]
        keys = [EGRESS_KEY, LEASES_KEY, BORN_KEY]
        keys += [_breaker_key(scope) for scope in scopes]
        keys += [_bucket_key(bucket) for bucket in buckets]
        args: list[Arg] = [
            s.daily_egress_bytes,
            max(0.0, max_wait_s),
            1 if priority is Priority.SEEDING else 0,
            self._lease_limit(priority) if want_lease else 0,
            lease,
            self.lease_s,
            PROBE_TIMEOUT_S,
            s.max_retry_after_s,
            len(scopes),
        ]
        for bucket, cost in zip(buckets, costs, strict=True):
            args += [bucket.rate, bucket.burst, cost]
        (answer,) = await self.link.call((ADMIT, keys, args))
        verdict = answer[0].decode()
        if verdict == "ok":
            probed = answer[2].decode()
            probes = [scopes[int(i) - 1] for i in probed.split(",")] if probed else []
            taken = answer[3].decode() or None
            if taken is not None:
                self._hold(taken)
            return Admitted(probes, float(answer[1]), taken)
        index, seconds = int(answer[1]), float(answer[2])
        if verdict == "budget":
            raise LimitExceeded("budget", seconds, "the daily upstream egress budget is spent")
        if verdict in ("open", "half-open"):
            raise BreakerOpen(scopes[index - 1], seconds)
        scope = buckets[index - 1].scope
        if verdict == "seeding":
            raise LimitExceeded(scope, seconds, f"{scope} limit: no tokens for seeding now")
        raise LimitExceeded(scope, seconds, f"{scope} limit: the queue is {seconds:.1f} s long")

    async def acquire_lease(self, max_wait_s: float, priority: Priority) -> str:
        deadline = time.monotonic() + max_wait_s
        while True:
            lease = self._prefix + uuid.uuid4().hex[:8]
            (taken,) = await self.link.call(
                (LEASE, [LEASES_KEY], [self._lease_limit(priority), lease, self.lease_s])
            )
            if int(taken):
                self._hold(lease)
                return lease
            if time.monotonic() >= deadline:
                raise LimitExceeded(
                    "concurrency", 1.0, "concurrency limit: every upstream slot is busy"
                )
            await asyncio.sleep(LEASE_POLL_S)

    def _hold(self, lease: str) -> None:
        self._held.add(lease)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew_while_held())

    async def _renew_while_held(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_s / 3)
            if self._held:
                self.link.defer(RENEW, [LEASES_KEY], [self.lease_s, *self._held])

    def release(self, lease: str) -> None:
        self._held.discard(lease)
        self.link.defer(RELEASE, [LEASES_KEY], [lease])

    def abandon(self, probes: Sequence[Scope]) -> None:
        if probes:
            self.link.defer(ABANDON, [_breaker_key(scope) for scope in probes], [])

    def _account_call(
        self, nbytes: int, close: Sequence[Scope]
    ) -> tuple[Script, list[str], list[Arg]]:
        bucket = self._bytes
        keys = [EGRESS_KEY, BORN_KEY]
        args: list[Arg] = [max(0, nbytes), 0, 0, 0]
        if bucket is not None:
            keys.append(_bucket_key(bucket))
            args = [max(0, nbytes), bucket.rate, bucket.burst, 1]
        keys += [_breaker_key(scope) for scope in close]
        return ACCOUNT, keys, args

    def succeeded(self, scopes: Sequence[Scope], nbytes: int) -> None:
        self.link.defer(*self._account_call(nbytes, scopes))

    async def account(self, nbytes: int) -> float:
        if nbytes <= 0:
            return 0.0
        (level,) = await self.link.call(self._account_call(nbytes, ()))
        return float(level)

    async def record_success(self, scopes: Sequence[Scope]) -> None:
        await self.link.call(self._account_call(0, scopes))

    async def record_failure(self, scopes: Sequence[Scope], at: float) -> None:
        s = self.settings
        flags = [1 if scope.asset is None else 0 for scope in scopes]
        await self.link.call(
            (
                FAILURE,
                [_breaker_key(scope) for scope in scopes],
                [s.failure_threshold, s.failure_window_s, s.open_s, *flags],
            )
        )

    async def open_for(self, scope: Scope, seconds: float, at: float) -> None:
        s = self.settings
        seconds = min(max(seconds, 0.0), s.max_retry_after_s)
        await self.link.call(
            (
                OPEN_FOR,
                [_breaker_key(scope)],
                [seconds, s.max_retry_after_s, s.failure_window_s, s.open_s],
            )
        )

    async def report(self) -> StateReport:
        keys: list[str] = []
        cursor: object = 0
        while True:
            cursor, found = await self.link.command(
                "SCAN", cursor, "MATCH", FLEET_BREAKER_PREFIX + "*", "COUNT", 500
            )
            keys += [k.decode() for k in found]
            if int(cursor) == 0:  # type: ignore[call-overload]
                break
        (answer,) = await self.link.call((READ, [EGRESS_KEY, *keys], []))
        now, spent = float(answer[0]), int(answer[1])
        statuses = []
        for n, key in enumerate(keys):
            open_raw, probe_raw = answer[2 + 2 * n], answer[3 + 2 * n]
            if not open_raw:
                continue
            open_until = min(float(open_raw), now + self.settings.max_retry_after_s)
            probe_until = float(probe_raw)
            operation, _, asset = key.removeprefix(FLEET_BREAKER_PREFIX).partition("/")
            scope = Scope(operation, asset or None)
            if open_until > now:
                statuses.append(BreakerStatus(scope, "open", open_until - now))
            elif open_until and probe_until > now:
                statuses.append(BreakerStatus(scope, "half-open", probe_until - now))
        budget = self.settings.daily_egress_bytes
        return StateReport(statuses, max(0, budget - spent) if budget else None)

    async def probe(self) -> tuple[bool, str]:
        return await self.link.ping()

    def in_flight(self) -> int:
        """Leases this process holds now."""
        return len(self._held)

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._held:
            with contextlib.suppress(StateUnavailable):
                await self.link.call((RELEASE, [LEASES_KEY], list(self._held)))
            self._held.clear()


class _Reachability:
    """:class:`~gateway.upstream.state.StateHealth` for Redis: one log line per change is
    written by the link itself (:class:`~gateway.storage.redis_link.RedisLink`)."""

    def failed(self, exc: BaseException, consequence: str) -> str:
        return "unreachable"

    def succeeded(self) -> None:
        return None
