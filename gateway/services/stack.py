"""The tile path of one process, wired as the gateway wires it: tile cache, shared limiter
state, Geopera client, upstream guard and tile service.

The app builds it at start (:mod:`gateway.app`) and ``geopera-gateway seed`` builds the same,
so seeding shares the gateway's cache, host-wide limits, breakers and coalescing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gateway import __version__
from gateway.clock import Clock, system_clock
from gateway.config.settings import Settings
from gateway.services.tiles import TileService
from gateway.storage.coalesce import FleetFlight
from gateway.storage.redis_link import RedisLink
from gateway.storage.tiles import TileCache
from gateway.upstream.buckets import SharedState
from gateway.upstream.client import GeoperaClient
from gateway.upstream.fleet import RedisUpstreamState
from gateway.upstream.guard import UpstreamGuard
from gateway.upstream.state import UpstreamState

USER_AGENT = f"geopera-gateway/{__version__}"
"""The ``User-Agent`` of the gateway's upstream calls."""


@dataclass(slots=True)
class TileStack:
    """The tile path of one process: the tile cache, the host's shared limiter state, the
    Geopera client, the upstream guard and the tile service, built as the gateway builds them.

    Used by the app (:mod:`gateway.app`) and by ``geopera-gateway seed``, so seeding shares the
    gateway's cache, host-wide limits, breakers and coalescing.
    """

    cache: TileCache
    state: SharedState
    client: GeoperaClient
    guard: UpstreamGuard
    service: TileService
    redis: RedisLink | None = None
    """The fleet's Redis (``[state] redis_url``), or None on one host."""

    async def aclose(self) -> None:
        """Cancel background refreshes, give back concurrency leases, then close the client,
        the Redis link, the state and the cache."""
        await self.service.aclose()
        await self.guard.limiter.aclose()
        await self.client.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        self.state.close()
        self.cache.close()


def open_tile_stack(settings: Settings, clock: Clock = system_clock) -> TileStack:
    """Build the tile path for ``settings`` (cache, shared state, client, guard, tile
    service), as the gateway and the seeder use it; close it with :meth:`TileStack.aclose`.
    ``clock`` (Unix seconds, :mod:`gateway.clock`) is what tile freshness is measured with.

    Raises:
        OSError: the cache or state directory cannot be created or opened.
    """
    cache = TileCache(
        settings.cache.directory,
        settings.cache.size_limit_bytes,
        settings.cache.memory_bytes,
        clock=clock,
    )
    state = SharedState(settings.cache.state_directory)
    up = settings.upstream
    client = GeoperaClient(
        up.base_url,
        up.api_key,
        connect_timeout_s=up.connect_timeout_s,
        read_timeout_s=up.read_timeout_s,
        max_connections=up.max_connections,
        user_agent=USER_AGENT,
        problem_types=up.problem_types,
    )
    # the fleet's Redis, when configured: upstream state and cross-replica single-flight
    link: RedisLink | None = None
    limiter: UpstreamState | None = None
    fleet: FleetFlight | None = None
    fleet_settings = settings.state
    if fleet_settings.redis_url is not None:
        link = RedisLink(fleet_settings.redis_url, fleet_settings.password)
        limiter = RedisUpstreamState(link, settings.limits, lease_s=fleet_settings.lease_s)
        owner = f"{os.uname().nodename}:{os.getpid()}"
        fleet = FleetFlight(link, fleet_settings.lease_s, owner)
    guard = UpstreamGuard(client, state, settings.limits, limiter, clock=clock)
    lim = settings.limits
    longest_fetch = lim.max_wait_s + lim.retry_attempts * (up.read_timeout_s + lim.retry_max_s)
    service = TileService(
        cache,
        guard,
        settings.cache.empty_ttl_s,
        claim_s=longest_fetch + 5,
        fleet=fleet,
        clock=clock,
    )
    return TileStack(cache, state, client, guard, service, link)
