"""The clip operations (Geopera "Clipping" guide and "Clipping operations" reference).

Implemented: ``clip.create_from_item``, ``clip.jobs.list``, ``clip.job.get``,
``clip.job.downloads``, ``clip.job.download`` and ``clip.job.tile_info``. Rules and where they
come from:

- **Asynchronous job** (Clipping guide, "Lifecycle"): ``clip.create_from_item`` "creates a
  ``cog_clip`` job, dispatches the GDAL warp, and returns immediately with the job already
  marked ``running``"; the answer is ``{"job": {"id", "status", "job_type",
  "organization_id"}, "assets_to_clip", "asset_keys"}`` ("Creating a clip job"). Here the
  warp is a real :func:`rasterio.mask.mask` of the sample COG, run in a worker thread
  (:func:`asyncio.to_thread`) started by the create call.
- **Request body** (Clipping guide, "Request body"): ``source_item_id``, ``project_id`` and
  ``aoi_geometry`` (GeoJSON Polygon/MultiPolygon, lon/lat) are required; ``asset_keys``,
  ``aoi_name``, ``output_name``, ``target_collection_id`` are optional. Malformed input is a
  422 ``HTTPValidationError`` (Errors guide, via :mod:`.protocol`).
- **Idempotency-Key is mandatory** (Clipping guide, "Edge cases": ``clip.create_from_item``
  is ``external_spend``): no key is a 400 problem. "A retried request with the same key never
  reserves credits or dispatches a duplicate warp": the same key with the same body (compared
  as canonical JSON) replays the first answer, same job id. "Sending the same key with a
  different body is a conflict" (Python recipes: "409 Conflict — usually an Idempotency-Key
  reused with a different body"): 409 ``idempotency-conflict``. Keys are per emulator app.
- **Cross-org access -> 403** (Clipping guide, "Edge cases"): the projects the demo
  organisation (:data:`DEMO_ORGANIZATION_ID`) owns are :data:`DEMO_PROJECTS`
  (:data:`DEMO_PROJECT_ID` and :data:`SURVEY_PROJECT_ID`; our choice); any other is 403.
- **No raster assets resolved -> 400** (Clipping guide, "Edge cases"): each item has one
  raster asset, ``data``; ``asset_keys`` without ``"data"`` is a 400 ``no-raster-assets``.
  An AOI that does not intersect the item's bounds is a 400 ``aoi-outside-item`` (the
  emulator's own rule: the warp would have nothing to clip).
- **Polling** (Clipping guide, "Polling the job"): ``clip.job.get`` answers ``running`` until
  the clip is done *and* ``clip_delay_s`` seconds have passed since creation, then
  ``completed`` with ``output_artifacts.clips`` (or ``failed`` if the clip raised). Every job
  answer also carries ``project_id`` and ``output_name`` as the create call gave them (our
  choice: the guide's example shows neither, but both are fields of the create request).
- **Descriptors** (Clipping guide, "Retrieving the result"): ``clip.job.downloads`` lists
  ``{"mosaic_type", "filename", "size_bytes", "gcs_path"}`` per output file, ``filename`` =
  ``<output_name>_<mosaic_type>.tif``, ``gcs_path`` = ``clips/<job_id>/<filename>``.
- **Download** (Clipping guide, "Retrieving the result"): ``clip.job.download`` "streams the
  COG bytes with ``Content-Type: image/tiff`` and a ``Content-Disposition`` filename" (here
  with ``Content-Length``, in :data:`CHUNK_SIZE` chunks) and "is egress-enforced: per-asset
  rate limits and a circuit breaker apply, so a throttled request returns 429": the limits of
  :mod:`.egress` apply with the asset = ``job_id``, after validation, and every byte streamed
  is charged to the bandwidth breaker.
- **Not completed -> 400** (Clipping guide: "Calling ``clip.job.downloads`` or
  ``clip.job.download`` before the job is ``completed`` returns ``400``"; "``clip.job.tile_info``
  require[s] ``status == "completed"``"): 400 ``job-not-completed``, the detail names the
  current status.
- **Listing** (Clipping guide: "use ``clip.jobs.list`` with the ``organization_id`` and an
  optional ``status`` filter. It is paginated with ``limit`` (default 50) and ``offset``"):
  the answer ``{"jobs": [...], "total", "limit", "offset"}`` (newest first, each job as
  ``clip.job.get`` answers it) is our choice, as are ``limit`` 1..1000 and 422 outside.
- **Tile info** (operations reference: "Tile rendering params for a completed clip job"; the
  shape is our choice): ``{"job_id", "tiles": [{"mosaic_type", "operation", "url",
  "bounds", "minzoom", "maxzoom", "render"}]}``, one entry per output file: the operation
  to call (``cog.tile.render``, or ``cog.tile.terrain`` for a DEM), the clip COG's ``url``
  (which this emulator's tile operations render), its WGS84 ``bounds`` ``[west, south, east,
  north]``, its native zoom range and the render parameters (``bands``, and ``rescale`` from
  the clip's 2nd-98th percentiles). Synthetic jobs have no imagery: 400 ``no-tile-info``.
- **Organisations** (Clipping guide, "Cross-org access → 403"): every token belongs to
  ``demo-org`` (our choice). Job :data:`FOREIGN_JOB_ID` exists in every emulator and belongs
  to :data:`FOREIGN_ORGANIZATION_ID`: every job operation on it, and ``clip.jobs.list`` for
  another organisation, is 403 ``cross-organization``.
- **A failing item** (our choice): ``olinda-corrupt`` accepts the olinda AOIs, and its job
  ends ``failed`` with the reason :data:`CORRUPT_REASON` in ``error``.

Items (one per packaged COG, clippable into either project of organisation ``demo-org``) and their
mosaic types are :data:`ITEMS`. ``source_item_id="synthetic-<N>"`` (1 <= N <=
:data:`MAX_SYNTHETIC_BYTES`) is a benchmark item: one mosaic type ``data`` whose file is N
deterministic pseudo-random bytes (:func:`synthetic_bytes`), generated while streaming, never
held in memory. A ``truncate`` fault (:mod:`.faults`) cuts a download short.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import json
import logging
import math
import re
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from . import egress
from .catalog import CATALOG_KEY, DEMO_COG_BASE_URL
from .defaults import DEFAULT_CLIP_DELAY_S
from .faults import stall_point, truncate_limit, without_filename
from .protocol import OperationHandler, ProblemError, RequestValidationError, field_error
from .schema import Field, validate_body

log = logging.getLogger(__name__)

DEMO_PROJECT_ID = "demo"
"""The demo organisation's first project."""

SURVEY_PROJECT_ID = "survey"
"""The demo organisation's second project (our choice: two projects, so that per-project
access can be tried)."""

DEMO_PROJECTS = frozenset({DEMO_PROJECT_ID, SURVEY_PROJECT_ID})
"""The projects the demo organisation owns: clips must target one of them (else 403)."""

DEMO_ORGANIZATION_ID = "demo-org"
"""The organisation every emulator principal belongs to (``job.organization_id``)."""

FOREIGN_ORGANIZATION_ID = "other-org"
FOREIGN_JOB_ID = "0f0e0d0c-0b0a-4908-8706-050403020100"
"""A completed job of another organisation, in every emulator: 403 for every job operation."""

CORRUPT_REASON = (
    "The source scene is corrupt: GDAL could not read block 3 of 12 of asset 'data' "
    "(TIFFReadEncodedTile failed)."
)
"""Why ``olinda-corrupt`` jobs fail (``error`` of ``clip.job.get``)."""

CLIP_COG_BASE_URL = "https://demo.geopera.invalid/clips/"
"""Prefix of the clip COG URLs ``clip.job.tile_info`` gives (rendered by the tile ops)."""

MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 50


CHUNK_SIZE = 256 * 1024
"""Bytes per write when streaming a clip file (256 KiB)."""

MAX_SYNTHETIC_BYTES = 64 * 1024**3
"""Largest ``synthetic-<N>`` item: 64 GiB."""

MAX_JOBS = 1000
"""Jobs kept per app; beyond this the oldest finished ones (and their keys) are forgotten."""

MAX_IDEMPOTENCY_KEY_LENGTH = 255
"""Longest accepted ``Idempotency-Key`` header value, in characters."""

JOB_TYPE = "cog_clip"
ASSET_KEY = "data"
SYNTHETIC_MOSAIC = "data"
TIFF_CONTENT_TYPE = "image/tiff"


@dataclass(frozen=True, slots=True)
class ClipItem:
    """A clippable item: its COG (file name in the demo catalog), mosaic types -> bands, the
    bands of each output to render (``None``: a DEM, rendered with ``cog.tile.terrain``) and,
    for a failing item, why its clips fail."""

    cog: str
    mosaics: Mapping[str, tuple[int, ...]]
    render_bands: Mapping[str, str | None]
    fails: str | None = None


_OLINDA = "landsat7_olinda_6band_cog.tif"
ITEMS: dict[str, ClipItem] = {
    "olinda": ClipItem(
        _OLINDA,
        {"rgb": (3, 2, 1), "multispectral": (1, 2, 3, 4, 5, 6)},
        {"rgb": "1,2,3", "multispectral": "3,2,1"},
    ),
    "olinda-corrupt": ClipItem(_OLINDA, {"rgb": (3, 2, 1)}, {"rgb": "1,2,3"}, CORRUPT_REASON),
    "bahamas": ClipItem("landsat7_bahamas_rgb_cog.tif", {"rgb": (1, 2, 3)}, {"rgb": "1,2,3"}),
    "st-helens": ClipItem("dem_mount_st_helens_cog.tif", {"dem": (1,)}, {"dem": None}),
}
"""``source_item_id`` -> item. Mosaic types are clipped with these 1-based band indexes."""

_SYNTHETIC = re.compile(r"^synthetic-([0-9]{1,12})$")
_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

_CREATE_FIELDS = (
    Field("source_item_id", str, required=True),
    Field("project_id", str, required=True),
    Field("aoi_name", str),
    Field("output_name", str),
    Field("target_collection_id", str),
)
_JOB_FIELDS = (Field("job_id", str, required=True),)
_LIST_FIELDS = (
    Field("organization_id", str, required=True),
    Field("status", str),
    Field("limit", int, ge=1, le=MAX_LIST_LIMIT),
    Field("offset", int, ge=0),
)
_DOWNLOAD_FIELDS = (
    *_JOB_FIELDS,
    Field("mosaic_type", str, required=True),
    Field("user_agent", str),
    Field("requester_ip", str),
)


# --- synthetic files ---------------------------------------------------------------------

SYNTHETIC_BLOCK = 1024 * 1024
"""Synthetic files are made of 1 MiB blocks, each a rotation of one pseudo-random block."""

_SYNTHETIC_SEED = b"geopera-emulator synthetic v1"


@functools.cache
def _synthetic_base() -> bytes:
    return hashlib.shake_256(_SYNTHETIC_SEED).digest(SYNTHETIC_BLOCK)


@functools.lru_cache(maxsize=4096)
def _block_rotation(index: int) -> int:
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, key=_SYNTHETIC_SEED)
    return int.from_bytes(digest.digest(), "little") % SYNTHETIC_BLOCK


def synthetic_range(offset: int, length: int) -> bytes:
    """Bytes ``offset .. offset+length-1`` of the synthetic byte stream.

    The stream is deterministic and the same for every ``synthetic-<N>`` item (an item of N
    bytes is its first N bytes): 1 MiB block ``i`` is a fixed SHAKE-256 block rotated by a
    BLAKE2b-derived offset of ``i``, so no two blocks (likely) line up and a misplaced
    resume offset changes the SHA-256. Both arguments are in bytes, >= 0. Costs O(length).
    """
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be >= 0")
    base = _synthetic_base()
    parts: list[bytes] = []
    end = offset + length
    while offset < end:
        index, start = divmod(offset, SYNTHETIC_BLOCK)
        take = min(end - offset, SYNTHETIC_BLOCK - start)
        pos = (_block_rotation(index) + start) % SYNTHETIC_BLOCK
        first = min(take, SYNTHETIC_BLOCK - pos)
        parts.append(base[pos : pos + first])
        if first < take:
            parts.append(base[: take - first])
        offset += take
    return parts[0] if len(parts) == 1 else b"".join(parts)


def synthetic_bytes(n: int, chunk: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The ``synthetic-<n>`` file, ``n`` bytes, as consecutive chunks of ``chunk`` bytes.

    The last chunk may be shorter; nothing is yielded for ``n == 0``. Memory use is
    O(``chunk``), so tests and benchmarks can hash huge files, e.g.
    ``h = hashlib.sha256(); [h.update(c) for c in synthetic_bytes(n, 1 << 20)]``.
    The content does not depend on ``chunk``.
    """
    if n < 0 or chunk <= 0:
        raise ValueError("n must be >= 0 and chunk > 0")
    for offset in range(0, n, chunk):
        yield synthetic_range(offset, min(chunk, n - offset))


def synthetic_sha256(n: int) -> str:
    """Hex SHA-256 of the ``synthetic-<n>`` file (``n`` bytes; O(n) time, O(1 MiB) memory)."""
    digest = hashlib.sha256()
    for part in synthetic_bytes(n, SYNTHETIC_BLOCK):
        digest.update(part)
    return digest.hexdigest()


# --- geometry ------------------------------------------------------------------------------


def _aoi_error(msg: str) -> dict[str, Any]:
    return field_error("aoi_geometry", f"Value error, {msg}", "value_error")


def _check_position(pos: Any) -> str | None:
    if not isinstance(pos, list) or not 2 <= len(pos) <= 3:
        return "each position must be [lon, lat] or [lon, lat, z]"
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pos):
        return "position coordinates must be numbers"
    if not all(math.isfinite(v) for v in pos):
        return "position coordinates must be finite"
    if not (-180 <= pos[0] <= 180 and -90 <= pos[1] <= 90):
        return "positions must be lon/lat in degrees (lon -180..180, lat -90..90)"
    return None


def _check_polygon(rings: Any) -> str | None:
    if not isinstance(rings, list) or not rings:
        return "a Polygon's coordinates must be a non-empty list of linear rings"
    for ring in rings:
        if not isinstance(ring, list) or len(ring) < 4:
            return "a linear ring must be a list of at least 4 positions"
        for pos in ring:
            problem = _check_position(pos)
            if problem:
                return problem
        if ring[0][:2] != ring[-1][:2]:
            return "a linear ring must be closed (first position == last position)"
    return None


def validate_aoi(geometry: Any) -> list[dict[str, Any]]:
    """422 error entries for a GeoJSON ``Polygon``/``MultiPolygon`` in lon/lat (degrees).

    An empty list means the geometry is acceptable.
    """
    if not isinstance(geometry, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        return [field_error("aoi_geometry", msg, "model_attributes_type")]
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        problem = _check_polygon(coords)
    elif kind == "MultiPolygon":
        if not isinstance(coords, list) or not coords:
            problem = "a MultiPolygon's coordinates must be a non-empty list of polygons"
        else:
            problem = next(filter(None, map(_check_polygon, coords)), None)
    else:
        problem = "aoi_geometry must be a GeoJSON Polygon or MultiPolygon"
    return [_aoi_error(problem)] if problem else []


def _polygons(geometry: Mapping[str, Any]) -> list[list[list[Sequence[float]]]]:
    coords = geometry["coordinates"]
    return [coords] if geometry["type"] == "Polygon" else list(coords)


def _segment_hits_box(
    p: Sequence[float], q: Sequence[float], box: tuple[float, float, float, float]
) -> bool:
    """Liang-Barsky: does segment p-q meet the closed box (left, bottom, right, top)?"""
    t0, t1 = 0.0, 1.0
    dx, dy = q[0] - p[0], q[1] - p[1]
    for d, lo, hi, v in ((dx, box[0], box[2], p[0]), (dy, box[1], box[3], p[1])):
        if d == 0:
            if v < lo or v > hi:
                return False
            continue
        a, b = (lo - v) / d, (hi - v) / d
        if a > b:
            a, b = b, a
        t0, t1 = max(t0, a), min(t1, b)
        if t0 > t1:
            return False
    return True


def _inside(x: float, y: float, rings: Sequence[Sequence[Sequence[float]]]) -> bool:
    """Even-odd rule over all rings (so holes are outside)."""
    inside = False
    for ring in rings:
        for p, q in itertools.pairwise(ring):
            (x1, y1), (x2, y2) = p[:2], q[:2]
            if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
                inside = not inside
    return inside


def geometry_intersects_box(
    geometry: Mapping[str, Any], box: tuple[float, float, float, float]
) -> bool:
    """Does a (Multi)Polygon meet the box ``(left, bottom, right, top)`` (same CRS units)?"""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    for rings in _polygons(geometry):
        if not all(math.isfinite(v) for ring in rings for pos in ring for v in pos[:2]):
            continue
        for ring in rings:
            if any(_segment_hits_box(p, q, box) for p, q in itertools.pairwise(ring)):
                return True
        if _inside(cx, cy, rings):
            return True
    return False


@functools.lru_cache(maxsize=16)
def _cog_footprint(path: Path) -> tuple[Any, tuple[float, float, float, float]]:
    import rasterio

    with rasterio.open(path) as src:
        return src.crs, tuple(src.bounds)


def aoi_in_cog_crs(path: Path, aoi: Mapping[str, Any]) -> dict[str, Any] | None:
    """The lon/lat ``aoi`` reprojected to the COG's CRS, or None if it misses the COG's bounds.

    Blocking (opens the file once per path, then cached): call it in a worker thread.
    """
    from rasterio.warp import transform_geom

    crs, box = _cog_footprint(path)
    try:
        native = transform_geom("EPSG:4326", crs, aoi)
    except Exception:  # PROJ failure: the AOI cannot be located in the COG's CRS at all
        return None
    return native if geometry_intersects_box(native, box) else None


def clip_cog(
    path: Path, geometry: Mapping[str, Any], mosaics: Mapping[str, tuple[int, ...]]
) -> dict[str, bytes]:
    """Clip the COG at ``path`` to ``geometry`` (in the COG's CRS) once per mosaic type.

    Returns mosaic type -> GeoTIFF bytes written with GDAL's COG driver (256 x 256 tiles,
    DEFLATE with predictor 2, average overviews when larger than a tile), cropped to the
    AOI's window with pixels outside it masked (nodata for a COG with a nodata value, an
    internal mask otherwise). Blocking and CPU-bound: call it in a worker thread.
    """
    import numpy as np
    import rasterio
    from rasterio.io import MemoryFile
    from rasterio.mask import mask

    outputs: dict[str, bytes] = {}
    with rasterio.open(path) as src:
        for mosaic_type, bands in mosaics.items():
            data, transform = mask(src, [geometry], crop=True, filled=False, indexes=list(bands))
            nodata = src.nodata
            profile = {
                "driver": "COG",
                "width": data.shape[2],
                "height": data.shape[1],
                "count": data.shape[0],
                "dtype": data.dtype,
                "crs": src.crs,
                "transform": transform,
                "nodata": nodata,
                "compress": "DEFLATE",
                "predictor": 2,
                "blocksize": 256,
                "overview_resampling": "average",
            }
            with MemoryFile() as memfile:
                with memfile.open(**profile) as dst:
                    dst.write(data.filled(0 if nodata is None else nodata))
                    if nodata is None:
                        dst.write_mask(~np.ma.getmaskarray(data).all(axis=0))
                    for index, band in enumerate(bands, start=1):
                        description = src.descriptions[band - 1]
                        if description:
                            dst.set_band_description(index, description)
                outputs[mosaic_type] = memfile.read()
    return outputs


# --- jobs ----------------------------------------------------------------------------------


@dataclass(slots=True)
class ClipOutput:
    """One output file of a job: in-memory GeoTIFF bytes, or ``data=None`` for synthetic."""

    mosaic_type: str
    filename: str
    size_bytes: int
    data: bytes | None = None
    tile_info: dict[str, Any] | None = None

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes | memoryview]:
        """The file's bytes in chunks of ``size`` bytes (synthetic ones generated lazily)."""
        if self.data is None:
            yield from synthetic_bytes(self.size_bytes, size)
            return
        view = memoryview(self.data)
        for offset in range(0, len(view), size):
            yield view[offset : offset + size]


@dataclass(slots=True)
class ClipJob:
    """A ``cog_clip`` job. ``outputs``/``error`` stay None while the clip runs."""

    id: str
    created_at: str
    started: float
    output_name: str
    idempotency_key: str
    project_id: str = DEMO_PROJECT_ID
    outputs: dict[str, ClipOutput] | None = None
    error: str | None = None
    organization_id: str = DEMO_ORGANIZATION_ID
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        """The clip work finished (successfully or not)."""
        return self.outputs is not None or self.error is not None

    def descriptor(self, output: ClipOutput) -> dict[str, Any]:
        """``{"mosaic_type", "filename", "size_bytes", "gcs_path"}`` for one output."""
        return {
            "mosaic_type": output.mosaic_type,
            "filename": output.filename,
            "size_bytes": output.size_bytes,
            "gcs_path": f"clips/{self.id}/{output.filename}",
        }


class ClipStore:
    """Per-app clip jobs and Idempotency-Key records (``app[CLIPS_KEY]``).

    Args:
        delay_s: minimum seconds a job reports ``running`` after creation (>= 0, finite).
        clock: monotonic time source in seconds.
        catalog: the app's COG catalog (URL -> file); completed clips are added to it so the
            tile operations render the URLs ``clip.job.tile_info`` gives. None: not added.
    """

    def __init__(
        self,
        delay_s: float = DEFAULT_CLIP_DELAY_S,
        clock: Any = time.monotonic,
        catalog: dict[str, Path] | None = None,
    ):
        if isinstance(delay_s, bool) or not math.isfinite(delay_s) or delay_s < 0:
            raise ValueError("clip_delay_s must be a finite number >= 0")
        self.delay_s = float(delay_s)
        self.clock = clock
        self.catalog = catalog
        self.jobs: OrderedDict[str, ClipJob] = OrderedDict()
        self.keys: dict[str, tuple[str, dict[str, Any]]] = {}
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        foreign = ClipJob(
            FOREIGN_JOB_ID,
            "2026-01-01T00:00:00.000Z",
            float("-inf"),
            "foreign",
            "",
            project_id="foreign-project",
            outputs={"data": ClipOutput("data", "foreign_data.tif", 1024)},
            organization_id=FOREIGN_ORGANIZATION_ID,
        )
        self.foreign = {foreign.id: foreign}

    @property
    def directory(self) -> Path:
        """Where clip COGs are written for rendering (a temporary directory of this store)."""
        if self._directory is None:
            self._directory = tempfile.TemporaryDirectory(prefix="geopera-emulator-clips-")
        return Path(self._directory.name)

    def status(self, job: ClipJob) -> str:
        """``running`` until the work is done and ``delay_s`` passed, then the outcome.

        The outcome is ``completed``, or ``failed`` if the clip raised (``job.error`` says why).
        """
        if not job.done or self.clock() - job.started < self.delay_s:
            return "running"
        return "failed" if job.error is not None else "completed"

    def get(self, job_id: str) -> ClipJob:
        """The job ``job_id``; 404 problem if unknown, 403 if another organisation's."""
        job = self.jobs.get(job_id) or self.foreign.get(job_id)
        if job is None:
            raise ProblemError(
                404, "clip-job-not-found", "Not Found", "No clip job with this job_id exists."
            )
        if job.organization_id != DEMO_ORGANIZATION_ID:
            raise _CROSS_ORGANIZATION
        return job

    def replay(self, key: str, canonical: str) -> dict[str, Any] | None:
        """The stored answer for ``key`` if it was used with the same body; 409 if another."""
        record = self.keys.get(key)
        if record is None:
            return None
        if record[0] != canonical:
            raise ProblemError(
                409,
                "idempotency-conflict",
                "Conflict",
                "This Idempotency-Key was already used with a different request body: reuse "
                "the original body or pick a new key.",
            )
        return record[1]

    def add(self, job: ClipJob, canonical: str, answer: dict[str, Any]) -> None:
        """Register a new job and its key's answer, forgetting the oldest finished jobs."""
        self.jobs[job.id] = job
        self.keys[job.idempotency_key] = (canonical, answer)
        while len(self.jobs) > MAX_JOBS:
            old = next((j for j in self.jobs.values() if j.done), None)
            if old is None:
                break
            del self.jobs[old.id]
            self.keys.pop(old.idempotency_key, None)
            self._forget_files(old)

    def publish(self, job: ClipJob) -> None:
        """Write ``job``'s image outputs into :attr:`directory` and add their URLs to the
        catalog, with their tile info. Blocking: call it in a worker thread."""
        if self.catalog is None:
            return
        for output in (job.outputs or {}).values():
            if output.data is None or output.tile_info is None:
                continue
            path = self.directory / f"{job.id}_{output.mosaic_type}.tif"
            path.write_bytes(output.data)
            self.catalog[output.tile_info["url"]] = path

    def _forget_files(self, job: ClipJob) -> None:
        for output in (job.outputs or {}).values():
            if output.tile_info is not None and self.catalog is not None:
                path = self.catalog.pop(output.tile_info["url"], None)
                if path is not None:
                    path.unlink(missing_ok=True)

    async def close(self) -> None:
        """Cancel clips still running (app shutdown)."""
        tasks = [job.task for job in self.jobs.values() if job.task and not job.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._directory is not None:
            self._directory.cleanup()


CLIPS_KEY: web.AppKey[ClipStore] = web.AppKey("geopera_emulator_clips", ClipStore)


def setup_clips(app: web.Application, clip_delay_s: float = DEFAULT_CLIP_DELAY_S) -> None:
    """Give ``app`` a :class:`ClipStore` (``clip_delay_s`` in seconds; ValueError if < 0)."""
    catalog = app.get(CATALOG_KEY)
    store = ClipStore(clip_delay_s, catalog=catalog if isinstance(catalog, dict) else None)
    app[CLIPS_KEY] = store

    async def close(_app: web.Application) -> None:
        await store.close()

    app.on_cleanup.append(close)


# --- operations ----------------------------------------------------------------------------


def _idempotency_key(request: web.Request) -> str:
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key:
        raise ProblemError(
            400,
            "idempotency-key-required",
            "Bad Request",
            "clip.create_from_item is an external_spend operation: it requires an "
            "Idempotency-Key header.",
        )
    if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise ProblemError(
            400,
            "invalid-idempotency-key",
            "Bad Request",
            f"The Idempotency-Key header is longer than {MAX_IDEMPOTENCY_KEY_LENGTH} characters.",
        )
    return key


def _validate_create(body: dict[str, Any]) -> dict[str, Any]:
    errors: list[dict[str, Any]] = []
    try:
        values = validate_body(body, _CREATE_FIELDS)
    except RequestValidationError as exc:
        values, errors = {}, list(exc.errors)
    if body.get("aoi_geometry") is None:
        errors.append(field_error("aoi_geometry", "Field required", "missing"))
    else:
        errors.extend(validate_aoi(body["aoi_geometry"]))
    asset_keys = body.get("asset_keys")
    if asset_keys is not None and not (
        isinstance(asset_keys, list) and all(isinstance(k, str) for k in asset_keys)
    ):
        errors.append(field_error("asset_keys", "Input should be a valid list", "list_type"))
    name = body.get("output_name")
    if isinstance(name, str) and not _OUTPUT_NAME.match(name):
        errors.append(
            field_error(
                "output_name",
                "Value error, output_name must be 1-100 characters of A-Z a-z 0-9 . _ - "
                "starting with a letter or digit",
                "value_error",
            )
        )
    if errors:
        raise RequestValidationError(errors)
    values["aoi_geometry"] = body["aoi_geometry"]
    values["asset_keys"] = asset_keys
    return values


def _synthetic_size(item_id: str) -> int | None:
    match = _SYNTHETIC.match(item_id)
    if match is None:
        return None
    size = int(match[1])
    return size if 1 <= size <= MAX_SYNTHETIC_BYTES else None


def _item_path(request: web.Request, item: ClipItem) -> Path | None:
    return request.app[CATALOG_KEY].get(DEMO_COG_BASE_URL + item.cog)


_CROSS_ORGANIZATION = ProblemError(
    403,
    "cross-organization",
    "Forbidden",
    "This belongs to another organization than the token's.",
)

_ITEM_NOT_FOUND = ProblemError(
    404,
    "item-not-found",
    "Not Found",
    f"No item with this source_item_id exists. Items: {', '.join(ITEMS)}, or "
    f"synthetic-<N> with 1 <= N <= {MAX_SYNTHETIC_BYTES} bytes.",
)


async def _run_clip(
    store: ClipStore, job: ClipJob, item: ClipItem, path: Path, geometry: dict[str, Any]
) -> None:
    if item.fails is not None:
        job.error = item.fails
        return
    try:
        files = await asyncio.to_thread(clip_cog, path, geometry, item.mosaics)
        infos = await asyncio.to_thread(_tile_infos, job.id, job.output_name, files, item)
    except Exception as exc:
        log.warning("clip job %s failed: %s", job.id, exc)
        job.error = f"The clip failed: {type(exc).__name__}: {exc}"
        return
    job.outputs = {
        mosaic: ClipOutput(
            mosaic, f"{job.output_name}_{mosaic}.tif", len(data), data, infos.get(mosaic)
        )
        for mosaic, data in files.items()
    }
    await asyncio.to_thread(store.publish, job)


def _tile_infos(
    job_id: str, output_name: str, files: Mapping[str, bytes], item: ClipItem
) -> dict[str, dict[str, Any]]:
    """``clip.job.tile_info`` entries per mosaic type (see the module docstring). Blocking."""
    import numpy as np
    from rasterio.io import MemoryFile
    from rio_tiler.io import Reader

    infos: dict[str, dict[str, Any]] = {}
    for mosaic, data in files.items():
        bands = item.render_bands.get(mosaic)
        with MemoryFile(data) as memfile, Reader(memfile.name) as src:
            bounds = [round(v, 6) for v in src.get_geographic_bounds("EPSG:4326")]
            info: dict[str, Any] = {
                "mosaic_type": mosaic,
                "operation": "cog.tile.terrain" if bands is None else "cog.tile.render",
                "url": f"{CLIP_COG_BASE_URL}{job_id}/{output_name}_{mosaic}.tif",
                "bounds": bounds,
                "minzoom": src.minzoom,
                "maxzoom": src.maxzoom,
                "render": {},
            }
            if bands is not None:
                indexes = [int(b) for b in bands.split(",")]
                pixels = src.dataset.read(indexes, masked=True)
                ranges = []
                for band in pixels:
                    valid = band.compressed()
                    low, high = np.percentile(valid, (2, 98)) if valid.size else (0, 255)
                    ranges.append(f"{float(low):g},{max(float(high), float(low) + 1):g}")
                info["render"] = {"bands": bands, "rescale": ";".join(ranges)}
        infos[mosaic] = info
    return infos


async def create_from_item_operation(
    request: web.Request, body: dict[str, Any]
) -> web.StreamResponse:
    """``clip.create_from_item``: validate, create a ``running`` ``cog_clip`` job, start it.

    Answer (200): ``{"job": {"id", "status": "running", "job_type": "cog_clip",
    "organization_id": "demo-org"}, "assets_to_clip": 1, "asset_keys": ["data"]}``.
    """
    store = request.app[CLIPS_KEY]
    key = _idempotency_key(request)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    answer = store.replay(key, canonical)
    if answer is not None:
        return web.json_response(answer)

    values = _validate_create(body)
    if values["project_id"] not in DEMO_PROJECTS:
        raise ProblemError(
            403,
            "forbidden",
            "Forbidden",
            "Your organization does not own this project_id: clips can only be written to "
            "projects of your organization.",
        )
    item_id = values["source_item_id"]
    synthetic_size = _synthetic_size(item_id)
    item = ITEMS.get(item_id)
    path = _item_path(request, item) if item is not None else None
    if synthetic_size is None and path is None:
        raise _ITEM_NOT_FOUND
    asset_keys = values["asset_keys"]
    if asset_keys is not None and ASSET_KEY not in asset_keys:
        raise ProblemError(
            400,
            "no-raster-assets",
            "Bad Request",
            f"No raster assets of the item match asset_keys; its raster asset is '{ASSET_KEY}'.",
        )
    native: dict[str, Any] | None = None
    if path is not None:
        native = await asyncio.to_thread(aoi_in_cog_crs, path, values["aoi_geometry"])
        if native is None:
            raise ProblemError(
                400, "aoi-outside-item", "Bad Request", "AOI does not intersect the item."
            )
        answer = store.replay(key, canonical)  # the same key may have been used meanwhile
        if answer is not None:
            return web.json_response(answer)

    output_name = values.get("output_name", "clip")
    job = ClipJob(
        id=str(uuid.uuid4()),
        created_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        started=store.clock(),
        output_name=output_name,
        idempotency_key=key,
        project_id=values["project_id"],
    )
    if synthetic_size is not None:
        filename = f"{output_name}_{SYNTHETIC_MOSAIC}.tif"
        job.outputs = {SYNTHETIC_MOSAIC: ClipOutput(SYNTHETIC_MOSAIC, filename, synthetic_size)}
    else:
        assert item is not None
        assert path is not None
        assert native is not None
        job.task = asyncio.get_running_loop().create_task(_run_clip(store, job, item, path, native))
    answer = {
        "job": {
            "id": job.id,
            "status": "running",
            "job_type": JOB_TYPE,
            "organization_id": DEMO_ORGANIZATION_ID,
        },
        "assets_to_clip": 1,
        "asset_keys": [ASSET_KEY],
    }
    store.add(job, canonical, answer)
    return web.json_response(answer)


async def job_get_operation(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """``clip.job.get``: ``{"id", "status", "job_type", "organization_id", "project_id",
    "output_name", "created_at"}``.

    Plus ``output_artifacts: {"clips": [descriptors]}`` once ``completed`` and ``error``
    (a message) once ``failed``.
    """
    values = validate_body(body, _JOB_FIELDS)
    store = request.app[CLIPS_KEY]
    return web.json_response(_job_answer(store, store.get(values["job_id"])))


def _job_answer(store: ClipStore, job: ClipJob) -> dict[str, Any]:
    """A job as ``clip.job.get`` answers it."""
    status = store.status(job)
    answer: dict[str, Any] = {
        "id": job.id,
        "status": status,
        "job_type": JOB_TYPE,
        "organization_id": job.organization_id,
        "project_id": job.project_id,
        "output_name": job.output_name,
        "created_at": job.created_at,
    }
    if status == "completed" and job.outputs is not None:
        answer["output_artifacts"] = {
            "clips": [job.descriptor(out) for out in job.outputs.values()]
        }
    elif status == "failed":
        answer["error"] = job.error
    return answer


async def jobs_list_operation(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """``clip.jobs.list``: ``{"jobs": [...], "total", "limit", "offset"}``, newest first,
    filtered by ``status``; 403 for another ``organization_id``."""
    values = validate_body(body, _LIST_FIELDS)
    if values["organization_id"] != DEMO_ORGANIZATION_ID:
        raise _CROSS_ORGANIZATION
    store = request.app[CLIPS_KEY]
    jobs = [_job_answer(store, job) for job in reversed(store.jobs.values())]
    if "status" in values:
        jobs = [job for job in jobs if job["status"] == values["status"]]
    limit = values.get("limit", DEFAULT_LIST_LIMIT)
    offset = values.get("offset", 0)
    return web.json_response(
        {
            "jobs": jobs[offset : offset + limit],
            "total": len(jobs),
            "limit": limit,
            "offset": offset,
        }
    )


async def job_tile_info_operation(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """``clip.job.tile_info``: how to render each output of a completed job (see the module
    docstring); 400 before completion or for a synthetic job."""
    values = validate_body(body, _JOB_FIELDS)
    job, outputs = _completed_job(request, values["job_id"])
    tiles = [out.tile_info for out in outputs.values() if out.tile_info is not None]
    if not tiles:
        raise ProblemError(
            400, "no-tile-info", "Bad Request", "This job's outputs are not imagery."
        )
    return web.json_response({"job_id": job.id, "tiles": tiles})


def _completed_job(request: web.Request, job_id: str) -> tuple[ClipJob, dict[str, ClipOutput]]:
    store = request.app[CLIPS_KEY]
    job = store.get(job_id)
    status = store.status(job)
    if status != "completed" or job.outputs is None:
        raise ProblemError(
            400,
            "job-not-completed",
            "Bad Request",
            f"The clip job is '{status}': downloads are available once it is 'completed'.",
        )
    return job, job.outputs


async def job_downloads_operation(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """``clip.job.downloads``: ``[{"mosaic_type", "filename", "size_bytes", "gcs_path"}]``."""
    values = validate_body(body, _JOB_FIELDS)
    job, outputs = _completed_job(request, values["job_id"])
    return web.json_response([job.descriptor(out) for out in outputs.values()])


async def job_download_operation(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """``clip.job.download``: stream one output file (``image/tiff``), egress-limited by job.

    ``user_agent`` and ``requester_ip`` are accepted (strings) and kept in the stats log with
    the rest of the body. Order of checks: 422, unknown job 404, not completed 400, unknown
    ``mosaic_type`` 404, then the egress limits (429). Bytes are charged to the bandwidth
    breaker as they are written, in :data:`CHUNK_SIZE` chunks.
    """
    values = validate_body(body, _DOWNLOAD_FIELDS)
    _job, outputs = _completed_job(request, values["job_id"])
    output = outputs.get(values["mosaic_type"])
    if output is None:
        raise ProblemError(
            404,
            "mosaic-not-found",
            "Not Found",
            f"This job has no output for that mosaic_type; it has: {', '.join(outputs)}.",
        )
    egress.admit(request, values)

    disposition = {"Content-Disposition": f'attachment; filename="{output.filename}"'}
    response = web.StreamResponse(headers=None if without_filename(request) else disposition)
    response.content_type = TIFF_CONTENT_TYPE
    response.content_length = output.size_bytes
    limit = truncate_limit(request)
    if limit is not None and limit >= output.size_bytes:
        limit = None
    stall = stall_point(request)
    await response.prepare(request)
    sent = 0
    try:
        for chunk in output.chunks(CHUNK_SIZE):
            if stall is not None and sent + len(chunk) > stall.after_bytes:
                head = chunk[: stall.after_bytes - sent]
                if head:
                    await response.write(head)
                    egress.account(request, len(head))
                    sent += len(head)
                log.info("stall fault: holding %s after %d bytes", output.filename, sent)
                await stall.wait()
                stall, chunk = None, chunk[len(head) :]
            if limit is not None and sent + len(chunk) > limit:
                chunk = chunk[: limit - sent]
            if chunk:
                await response.write(chunk)
                egress.account(request, len(chunk))
                sent += len(chunk)
            if limit is not None and sent >= limit:
                break
        if limit is not None:
            log.info(
                "truncate fault: closing %s after %d of %d bytes",
                output.filename,
                sent,
                output.size_bytes,
            )
            response.force_close()
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
    except ConnectionError:
        log.debug("client went away after %d of %d bytes", sent, output.size_bytes)
    return response


CLIP_OPERATIONS: dict[str, OperationHandler] = {
    "clip.create_from_item": create_from_item_operation,
    "clip.jobs.list": jobs_list_operation,
    "clip.job.get": job_get_operation,
    "clip.job.tile_info": job_tile_info_operation,
    "clip.job.downloads": job_downloads_operation,
    "clip.job.download": job_download_operation,
}
