"""Purging a layer's cached tiles: all of them, or those in a box and zoom range.

Cache keys are ``tile/<layer>/<fingerprint>/<z>/<x>/<y>@<scale>x.<fmt>``
(:meth:`gateway.layers.Layer.cache_key`); a purge matches every fingerprint (old renders
too), scale and format. An ``@2x`` tile at zoom z is composed from the ``@1x`` PNG tiles at
z+1, which a purge of zoom z alone leaves in place: include z+1 to re-render those as well.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import mercantile

from gateway.layers import Bounds
from gateway.seed.area import tile_overlaps
from gateway.storage.tiles import TileCache

_KEY = re.compile(r"tile/[^/]+/[^/]+/(?P<z>\d+)/(?P<x>\d+)/(?P<y>\d+)@[12]x\.[a-z0-9]+")


def key_matches(key: str, bbox: Bounds | None, zooms: tuple[int, int] | None) -> bool:
    """Whether a tile cache key lies in ``zooms`` (inclusive) and overlaps ``bbox``.

    A key of another shape matches only when neither filter is given.
    """
    if bbox is None and zooms is None:
        return True
    found = _KEY.fullmatch(key)
    if found is None:
        return False
    z, x, y = int(found["z"]), int(found["x"]), int(found["y"])
    if zooms is not None and not zooms[0] <= z <= zooms[1]:
        return False
    return bbox is None or tile_overlaps(mercantile.Tile(x, y, z), bbox)


def purge_tiles(
    cache: TileCache,
    layer: str,
    bbox: Bounds | None = None,
    zooms: tuple[int, int] | None = None,
) -> int:
    """Remove ``layer``'s cached tiles (all, or those overlapping ``bbox`` within ``zooms``)
    and mark the layer purged so every worker's memory tier drops its copies within about a
    second. Never calls the upstream. Blocking (scans every cache key): from async code use
    :func:`purge_tiles_async`.

    Returns:
        How many cache entries were removed.
    """
    return cache.purge(layer, _matcher(bbox, zooms))


async def purge_tiles_async(
    cache: TileCache,
    layer: str,
    bbox: Bounds | None = None,
    zooms: tuple[int, int] | None = None,
) -> int:
    """:func:`purge_tiles` for a serving process: the disk scan runs in a thread, the
    memory tier is updated on the event loop's thread (it is not thread-safe)."""
    match = _matcher(bbox, zooms)
    removed, purged_at = await asyncio.to_thread(cache.purge_disk, layer, match)
    cache.forget(layer, match, purged_at)
    return removed


def _matcher(bbox: Bounds | None, zooms: tuple[int, int] | None) -> Callable[[str], bool] | None:
    if bbox is None and zooms is None:
        return None
    return lambda key: key_matches(key, bbox, zooms)
