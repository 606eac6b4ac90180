"""The source check: does the upstream know each layer's COG at all?

A tile request cannot tell: a TiTiler-style API answers 404 both for a tile outside its COG
and, often, for a COG it cannot open, and the gateway serves every tile 404 as an empty
tile. So at start (``upstream.check_sources``, on by default) the gateway asks once per
distinct COG URL with ``cog.thumbnail`` (seeds ``003`` "COG & tiles operations": "Generate a
JPEG thumbnail from the smallest COG overview", scope ``tiles:read``; the cheapest
documented read that names a COG): 2xx means known; 404 means unknown, which raises the
``source-unknown`` alert of every layer on that URL (one WARNING line, ``/readyz``
``unknown_sources``, the ``gateway_upstream_alert`` metric). Any other failure (a refused
key, a 402, a 429, the upstream down) leaves the layer unchecked; the guard reports those.
Layers not known to be fine are checked again every :data:`RECHECK_S` seconds.

Checks run at seeding priority (they never take a token a map user is waiting for) and are
shared by every worker of the host: a URL checked by another worker in the last
:data:`RESULT_TTL_S` seconds is not asked again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from gateway.errors import GatewayError, UpstreamNotFound
from gateway.layers import Layer
from gateway.upstream.alerts import SOURCE_UNKNOWN
from gateway.upstream.buckets import Priority, SharedState
from gateway.upstream.guard import UpstreamGuard

log = logging.getLogger("gateway.sources")

PROBE_OPERATION = "cog.thumbnail"
PROBE_SIZE_PX = 64
"""Width and height asked of the probe's thumbnail, pixels."""

RECHECK_S = 600.0
"""How often layers not known to be fine are checked again, seconds."""

RESULT_TTL_S = 60.0
"""How long one worker's check result spares the others asking again, seconds."""

KNOWN, UNKNOWN, UNCHECKED = "known", "unknown", "unchecked"


class SourceCheck:
    """Checks the layers' COGs with the upstream (see the module docstring).

    Args:
        guard: the protected upstream client (its alerts report unknown sources).
        state: the host's shared state (check results shared between workers).
        layers: the layers to check.
    """

    def __init__(self, guard: UpstreamGuard, state: SharedState, layers: Iterable[Layer]) -> None:
        self.guard = guard
        self._cache = state.cache
        self.layers = list(layers)

    async def run(self) -> None:
        """Check every layer now, then the ones not known to be fine every
        :data:`RECHECK_S` seconds, until cancelled."""
        pending = self.layers
        while pending:
            results = await self.check(pending)
            pending = [layer for layer in pending if results[layer.url] != KNOWN]
            if pending:
                await asyncio.sleep(RECHECK_S)

    async def check(self, layers: Iterable[Layer]) -> dict[str, str]:
        """Check ``layers`` once (one call per distinct URL); returns URL -> ``known``,
        ``unknown`` or ``unchecked``, and raises or resolves their alerts."""
        by_url: dict[str, list[Layer]] = {}
        for layer in layers:
            by_url.setdefault(layer.url, []).append(layer)
        results = {}
        for url, group in by_url.items():
            results[url] = result = await self._probe(url)
            for layer in group:
                if result == UNKNOWN:
                    self.guard.alerts.raise_alert(
                        SOURCE_UNKNOWN,
                        layer.name,
                        f"layer {layer.name!r}: the upstream does not know its source "
                        f"({PROBE_OPERATION} answered 404 for its url); its tiles are served "
                        "blank until the url in the config is fixed",
                        logging.WARNING,
                    )
                elif result == KNOWN:
                    self.guard.alerts.resolve(
                        SOURCE_UNKNOWN, layer.name, f"resolved: layer {layer.name!r} has a source"
                    )
        return results

    async def _probe(self, url: str) -> str:
        key = ("source-check", url)
        shared = self._cache.get(key)
        if shared is not None:
            return str(shared)  # diskcache values are untyped: a verdict string
        body = {"url": url, "width": PROBE_SIZE_PX, "height": PROBE_SIZE_PX}
        try:
            await self.guard.call(PROBE_OPERATION, body, asset=url, priority=Priority.SEEDING)
            result = KNOWN
        except UpstreamNotFound:
            result = UNKNOWN
        except GatewayError as exc:
            log.info("source check of a layer postponed: %s", type(exc).__name__)
            return UNCHECKED
        self._cache.set(key, result, expire=RESULT_TTL_S)
        return result
