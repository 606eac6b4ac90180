"""Purges for a fleet of replicas: a purge on one replica reaches every replica's cache.

Each replica keeps its own tile cache (``[state] redis_url``: README "Running several
replicas"), so a purge run on one (``POST /admin/purge``, ``geopera-gateway purge``) must run
on the others too. The purging side appends an entry (layer, box, zoom range, origin) to one
Redis stream, ``ggw:purges``, which keeps the newest :data:`KEPT_ENTRIES`. Every replica reads
the stream in the background once per :data:`FOLLOW_S` and purges its own cache the same way
(:func:`gateway.seed.purge.purge_tiles_async`): the disk scan in a thread, its memory tier on
the event loop. Cache hits never read Redis; a purge reaches every replica within about
:data:`FOLLOW_S` plus its own scan.

Each replica notes in its own cache the last entry it applied (:meth:`TileCache.write_note`),
so one that was stopped during a purge applies it when it starts again (while the entry is
among the kept ones); a replica whose cache is new starts from the stream's end, having
nothing to purge. A tile fetched on another replica between a purge and its arrival there is
purged too: at most one more upstream call for it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence

from gateway.layers import Bounds, Layer
from gateway.seed.area import AreaError, parse_bbox, parse_zoom
from gateway.seed.purge import purge_tiles_async
from gateway.storage.coalesce import RESULT_PREFIX
from gateway.storage.redis_link import PREFIX, RedisLink, StateUnavailable
from gateway.storage.tiles import TileCache

log = logging.getLogger("gateway.purge")

STREAM = PREFIX + "purges"
"""The Redis stream of the fleet's purges."""

KEPT_ENTRIES = 1000
"""Purges the stream keeps (``XADD ... MAXLEN ~``): how far back a returning replica can
catch up."""

FOLLOW_S = 1.0
"""How often each replica reads new purges, seconds."""

NOTE = "fleet-purges-applied"
"""Name of the note (in each replica's tile cache) holding the last stream entry applied."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FleetPurges:
    """Announces this replica's purges to the fleet and applies the others'.

    Args:
        link: the process's link to the fleet's Redis.
        cache: this replica's tile cache.
        layers: the configured layers by name (an entry for an unknown layer is skipped).
    """

    def __init__(self, link: RedisLink, cache: TileCache, layers: dict[str, Layer]) -> None:
        self.link, self.cache, self.layers = link, cache, layers
        self.origin = uuid.uuid4().hex
        """This process's name on its own entries (it has applied them already)."""
        self._last: str | None = None

    async def announce(
        self, layer: str, bbox: Bounds | None, zooms: tuple[int, int] | None
    ) -> None:
        """Tell the other replicas to purge ``layer`` (in ``bbox`` within ``zooms``).

        Raises:
            StateUnavailable: Redis cannot be reached (the purge stays on this replica).
        """
        fields = {
            "layer": layer,
            "bbox": "" if bbox is None else ",".join(repr(v) for v in bbox),
            "zoom": "" if zooms is None else f"{zooms[0]}-{zooms[1]}",
            "origin": self.origin,
        }
        flat = [item for pair in fields.items() for item in pair]
        await self._drop_handoffs(layer)
        await self.link.command("XADD", STREAM, "MAXLEN", "~", KEPT_ENTRIES, "*", *flat)

    async def _drop_handoffs(self, layer: str) -> None:
        """Delete the layer's tiles that fetches left in Redis for their waiters (kept
        :data:`~gateway.storage.coalesce.RESULT_TTL_S`): a replica fetching a purged tile
        must not take the copy from before the purge."""
        cursor: object = 0
        while True:
            cursor, keys = await self.link.command(
                "SCAN", cursor, "MATCH", f"{RESULT_PREFIX}tile/{layer}/*", "COUNT", 500
            )
            if keys:
                await self.link.command("DEL", *keys)
            if int(_text(cursor)) == 0:
                return

    async def follow(self) -> None:
        """Apply new purges once per :data:`FOLLOW_S`, until cancelled; a Redis that cannot
        be reached is tried again next round."""
        while True:
            try:
                await self.apply_new()
            except StateUnavailable:
                pass  # reported by the link; tried again next round
            except Exception:  # a bug must not stop the follower for good
                log.exception("applying the fleet's purges failed; trying again")
            await asyncio.sleep(FOLLOW_S)

    async def apply_new(self) -> int:
        """Apply every purge announced since the last one applied; returns how many.

        Raises:
            StateUnavailable: Redis cannot be reached.
        """
        if self._last is None:
            noted = await asyncio.to_thread(self.cache.read_note, NOTE)
            self._last = noted or await self._stream_end()
        applied = 0
        while True:
            answer = await self.link.command(
                "XREAD", "COUNT", 100, "STREAMS", STREAM, self._last, background=True
            )
            entries: Sequence[tuple[object, Mapping[object, object]]] = (
                answer[0][1] if answer else []
            )  # redis-py parses each entry into (id, {field: value})
            if not entries:
                return applied
            for entry_id, raw in entries:
                fields = {_text(k): _text(v) for k, v in raw.items()}
                if fields.get("origin") != self.origin:
                    applied += await self._apply(fields)
                self._last = _text(entry_id)
            await asyncio.to_thread(self.cache.write_note, NOTE, self._last)

    async def _stream_end(self) -> str:
        newest = await self.link.command("XREVRANGE", STREAM, "+", "-", "COUNT", 1, background=True)
        return _text(newest[0][0]) if newest else "0-0"

    async def _apply(self, fields: Mapping[str, str]) -> int:
        layer = self.layers.get(fields.get("layer", ""))
        if layer is None:
            return 0
        try:
            bbox = parse_bbox(fields["bbox"]) if fields.get("bbox") else None
            zooms = parse_zoom(fields["zoom"]) if fields.get("zoom") else None
        except AreaError:
            log.warning("skipped a fleet purge of layer %s with an unreadable area", layer.name)
            return 0
        removed = await purge_tiles_async(self.cache, layer.name, bbox, zooms)
        log.info("applied a fleet purge of layer %s: %d tiles removed", layer.name, removed)
        return 1
