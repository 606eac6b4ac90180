"""Clip layers: a completed clip job's files as tile layers.

``clip.job.tile_info`` (operations reference, seeds ``000``: "Tile rendering params for a
completed clip job"; the Clipping guide, seeds ``001``: it requires ``status ==
"completed"``) says how to render each output. Its shape is not documented; the gateway
reads (the emulator's choice) ``{"job_id", "tiles": [{"mosaic_type", "operation", "url",
"bounds", "minzoom", "maxzoom", "render"}]}``: the tile operation (``cog.tile.render`` or
``cog.tile.terrain``), the clip COG's ``url``, its WGS84 bounds, zoom range and render
parameters. Each entry becomes a :class:`~gateway.layers.Layer` named
``clips/<job_id>/<mosaic_type>``, so its tiles go through the tile service like any layer's:
the same cache, coalescing, cross-worker claims and upstream limits. Clients choose a job and
a mosaic type; the COG URL and the render parameters only ever come from the upstream
(parameters the layer kind does not know are dropped).

The job is first checked to be completed (``clip.job.get``, through the download service),
so a 400 from ``clip.job.tile_info`` means "no tile parameters" (a file that is not imagery),
never "not ready". The answer is kept in the download store's index for an hour and the
layers in each worker's memory, so a tile request costs no extra upstream call.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from gateway.errors import (
    JobFailed,
    JobNotCompleted,
    NoTileLayer,
    UpstreamRejected,
)
from gateway.layers import (
    MAX_ZOOM,
    OPERATIONS,
    RENDER_PARAMS,
    WEB_MERCATOR_MAX_LAT,
    Bounds,
    Layer,
    layer_fingerprint,
)
from gateway.services.downloads import FINAL_FAILURES, MOSAIC_TYPE, DownloadService
from gateway.storage.coalesce import SingleFlight
from gateway.storage.downloads import DESCRIPTORS_TTL_S

log = logging.getLogger("gateway.clips")

CLIP_FORMATS = {"raster": ("png", "webp"), "terrain": ("png",)}
"""Tile formats of clip layers by kind (Terrain-RGB is PNG only)."""

CLIP_TILE_TTL_S = 7 * 86400
"""How long a rendered clip tile stays fresh, seconds: a completed clip never changes."""

MAX_CACHED_JOBS = 512
"""Jobs whose layers each worker keeps in memory, at most."""

MAX_URL_CHARS = 2048

WORLD: Bounds = (-180.0, -WEB_MERCATOR_MAX_LAT, 180.0, WEB_MERCATOR_MAX_LAT)

_KINDS = {operation: kind for kind, operation in OPERATIONS.items()}


def layer_name(job_id: str, mosaic_type: str) -> str:
    """The tile layer name of one clip file: ``clips/<job_id>/<mosaic_type>`` (its tile
    URLs are ``/tiles/<name>/{z}/{x}/{y}.png``)."""
    return f"clips/{job_id}/{mosaic_type}"


def clip_layer(job_id: str, entry: Mapping[str, Any], title: str | None = None) -> Layer | None:
    """The layer for one ``clip.job.tile_info`` entry, or None when it cannot be rendered
    (unknown operation, no URL, a bad mosaic type).

    Bounds outside WGS84 (or not four numbers) become the whole Web Mercator world; a zoom
    range outside 0..:data:`~gateway.layers.MAX_ZOOM` becomes 0-18.
    """
    mosaic = entry.get("mosaic_type")
    kind = _KINDS.get(entry.get("operation"))  # type: ignore[arg-type]
    url = entry.get("url")
    if not isinstance(mosaic, str) or not MOSAIC_TYPE.fullmatch(mosaic) or kind is None:
        return None
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        return None
    raw_render = entry.get("render")
    render: dict[str, Any] = {}
    if isinstance(raw_render, dict):
        for key, expected in RENDER_PARAMS[kind].items():
            value = raw_render.get(key)
            if isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
                render[key] = value
    minzoom, maxzoom = entry.get("minzoom"), entry.get("maxzoom")
    if not (type(minzoom) is int and type(maxzoom) is int and 0 <= minzoom <= maxzoom <= MAX_ZOOM):
        minzoom, maxzoom = 0, 18
    return Layer(
        name=layer_name(job_id, mosaic),
        title=title or f"Clip {job_id} ({mosaic})",
        kind=kind,  # type: ignore[arg-type]
        url=url,
        render=MappingProxyType(render),
        minzoom=minzoom,
        maxzoom=maxzoom,
        bounds=_bounds(entry.get("bounds")),
        formats=CLIP_FORMATS[kind],
        ttl_s=CLIP_TILE_TTL_S,
        stale_while_revalidate_s=0,
        stale_if_error_s=CLIP_TILE_TTL_S,
        attribution="",
        fingerprint=layer_fingerprint(kind, url, render),
        public=False,
    )


def _bounds(value: Any) -> Bounds:
    if not isinstance(value, list | tuple) or len(value) != 4:
        return WORLD
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return WORLD
    west, south, east, north = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (west, south, east, north)):
        return WORLD
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        return WORLD
    return west, south, east, north


class ClipLayers:
    """The tile layers of completed clip jobs.

    Args:
        downloads: the download service (job states, the store's index, upstream calls).
        clock: monotonic time source, seconds.
    """

    def __init__(
        self, downloads: DownloadService, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.downloads = downloads
        self.clock = clock
        self._layers: OrderedDict[str, tuple[float, dict[str, Layer]]] = OrderedDict()
        self._flights: SingleFlight[dict[str, Layer]] = SingleFlight()

    async def layer(self, job_id: str, mosaic_type: str) -> Layer:
        """The tile layer of one file of a completed job.

        Raises:
            NoTileLayer: the job has no tile parameters for ``mosaic_type``;
            JobNotCompleted, JobFailed, JobNotFound, JobForbidden, UpstreamError, HeldBack:
            from the job's state or ``clip.job.tile_info``.
        """
        layer = (await self.layers(job_id)).get(mosaic_type)
        if layer is None:
            raise NoTileLayer(job_id, "the clip job gives no tile parameters for this file")
        return layer

    async def layers(self, job_id: str) -> dict[str, Layer]:
        """Every tile layer of a completed job, by mosaic type (empty when it has none).

        Raises:
            as :meth:`layer`, but never NoTileLayer.
        """
        cached = self._layers.get(job_id)
        if cached is not None and cached[0] > self.clock():
            self._layers.move_to_end(job_id)
            return cached[1]
        layers, _ = await self._flights.run(job_id, lambda: self._load(job_id))
        self._layers[job_id] = (self.clock() + DESCRIPTORS_TTL_S, layers)
        while len(self._layers) > MAX_CACHED_JOBS:
            self._layers.popitem(last=False)
        return layers

    async def _load(self, job_id: str) -> dict[str, Layer]:
        store = self.downloads.store
        info = store.tile_info(job_id)
        state = await self.downloads.job(job_id)
        status = state["status"]
        if status in FINAL_FAILURES:
            raise JobFailed(job_id, status, state.get("reason") or "none given")
        if status != "completed":
            raise JobNotCompleted(job_id, status)
        if info is None:
            try:
                answer = await self.downloads.upstream_json(
                    "clip.job.tile_info", {"job_id": job_id}, job_id
                )
            except UpstreamRejected:  # a 400 for a completed job: no tile parameters
                answer = {"tiles": []}
            info = answer if isinstance(answer, dict) else {"tiles": []}
            try:
                store.remember_tile_info(job_id, info)
            except (OSError, sqlite3.Error) as exc:  # a full disk: answer, just uncached
                log.warning("could not cache a job's tile info: %s", type(exc).__name__)
        titles = {f["mosaic_type"]: f.get("filename") for f in state["files"]}
        layers: dict[str, Layer] = {}
        entries = info.get("tiles")
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict):
                layer = clip_layer(job_id, entry, titles.get(entry.get("mosaic_type")))
                if layer is not None:
                    layers.setdefault(layer.name.rsplit("/", 1)[1], layer)
        return layers
