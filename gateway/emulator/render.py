"""Tile rendering with rio-tiler (blocking; call from a worker thread).

Each call opens its own :class:`rio_tiler.io.Reader` because rasterio datasets are not
thread-safe. Tiles are 256x256 pixels in the WebMercatorQuad (XYZ) grid. Both renderers return
``None`` for an *empty* tile: one outside the COG's bounds (``TileOutsideBounds``) or whose
pixels are all masked.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rio_tiler.colormap import apply_cmap, cmap
from rio_tiler.errors import InvalidExpression, TileOutsideBounds
from rio_tiler.io import Reader
from rio_tiler.utils import render

TILE_SIZE = 256
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
"""Request ``format`` value -> GDAL driver name."""

_BAND_REF = re.compile(r"\bb(\d+)\b", re.IGNORECASE)


class RenderInputError(ValueError):
    """A request value that only turns out invalid once the COG is open (HTTP 422).

    ``field`` names the request field at fault (``bands``, ``expression``, ``rescale`` or
    ``colormap``).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _valid_pixels(array: np.ma.MaskedArray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(data_float64, valid)``: ``valid`` is (H, W), True where any band is usable."""
    data = np.asarray(array.data, dtype=np.float64)
    band_ok = ~np.ma.getmaskarray(array) & np.isfinite(data)
    valid = np.asarray(band_ok.any(axis=0))
    return np.where(band_ok, data, 0.0), valid


def _default_range(
    dtype: np.dtype, source_dtype: np.dtype, data: np.ndarray, valid: np.ndarray
) -> tuple[float, float]:
    """Stretch used without ``rescale``: integer output uses the full range of the COG's
    integer dtype (else of its own dtype); float output the tile's own valid min..max."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(source_dtype if np.issubdtype(source_dtype, np.integer) else dtype)
        return float(info.min), float(info.max)
    values = data[:, valid]
    low, high = float(values.min()), float(values.max())
    return low, (high if high > low else low + 1.0)


def _stretch(data: np.ndarray, ranges: Sequence[tuple[float, float]]) -> np.ndarray:
    """Linear ``min..max -> 0..255`` per band (clipped, truncated like rio-tiler), to uint8."""
    if len(ranges) == 1:
        ranges = list(ranges) * data.shape[0]
    low = np.array([r[0] for r in ranges], dtype=np.float64)[:, None, None]
    high = np.array([r[1] for r in ranges], dtype=np.float64)[:, None, None]
    scaled = (np.clip(data, low, high) - low) / (high - low) * 255.0
    stretched: np.ndarray = scaled.astype(np.uint8)
    return stretched


def _check_band_refs(count: int, bands: Sequence[int] | None, expression: str | None) -> None:
    if bands is not None:
        bad = [b for b in bands if not 1 <= b <= count]
        if bad:
            raise RenderInputError("bands", f"band index {bad[0]} not in 1..{count}")
    if expression is not None:
        refs = [int(m) for m in _BAND_REF.findall(expression)]
        if not refs:
            raise RenderInputError("expression", "expression must reference a band (b1, b2, ...)")
        bad = [b for b in refs if not 1 <= b <= count]
        if bad:
            raise RenderInputError("expression", f"band b{bad[0]} not in b1..b{count}")


def render_tile(
    path: Path,
    z: int,
    x: int,
    y: int,
    *,
    img_format: str,
    bands: Sequence[int] | None = None,
    expression: str | None = None,
    rescale: Sequence[tuple[float, float]] | None = None,
    colormap: str | None = None,
    quality: int | None = None,
) -> bytes | None:
    """Render XYZ tile ``z/x/y`` of the COG at ``path`` as image bytes, or ``None`` if empty.

    Implements ``cog.tile.render`` (Geopera COG & tiles operations):

    - ``img_format``: a key of :data:`IMAGE_FORMATS`. PNG and WEBP carry the mask as alpha;
      JPEG has no alpha and masked pixels are black.
    - ``bands``: 1-based band indexes; ``expression``: rio-tiler band math such as
      ``"(b4-b3)/(b4+b3)"``. Default: all bands. The output must have 1 or 3 bands.
    - ``rescale``: one ``(min, max)`` for all bands or one per output band, mapped to 0..255.
      Without it, integer output is stretched over the full range of the COG's integer dtype
      (so uint8 data is unchanged) and float output over the tile's own valid min..max.
    - ``colormap``: a rio-tiler colormap name, applied to a single-band output.
    - ``quality``: 1..100, JPEG/WEBP only (ignored for PNG).

    Raises :class:`RenderInputError` when bands/expression/rescale/colormap do not fit the COG.
    """
    with Reader(str(path)) as src:
        _check_band_refs(src.dataset.count, bands, expression)
        source_dtype = np.dtype(src.dataset.dtypes[0])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = src.tile(x, y, z, tilesize=TILE_SIZE, indexes=bands, expression=expression)
        except TileOutsideBounds:
            return None
        except (InvalidExpression, SyntaxError, KeyError, ZeroDivisionError) as exc:
            raise RenderInputError("expression", f"invalid expression: {exc}") from exc

    data, valid = _valid_pixels(image.array)
    if not valid.any():
        return None
    count = data.shape[0]
    if count not in (1, 3):
        field = "expression" if expression is not None else "bands"
        message = f"output has {count} bands; select 1 or 3 with bands or expression"
        raise RenderInputError(field, message)
    if rescale is not None and len(rescale) not in (1, count):
        raise RenderInputError("rescale", f"give 1 or {count} min,max pairs, not {len(rescale)}")

    ranges = rescale or [_default_range(image.array.dtype, source_dtype, data, valid)]
    pixels = _stretch(data, ranges)
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    if colormap is not None:
        if count != 1:
            raise RenderInputError("colormap", "a colormap needs a single-band output")
        pixels, cmap_alpha = apply_cmap(pixels, cmap.get(colormap))
        alpha = np.where(valid, cmap_alpha, 0).astype(np.uint8)

    driver = IMAGE_FORMATS[img_format]
    options: dict[str, Any] = {}
    if quality is not None and driver != "PNG":
        options["quality"] = str(quality)
    if driver == "JPEG":
        pixels = np.where(valid, pixels, 0).astype(np.uint8)
        return render(pixels, None, img_format=driver, **options)
    return render(pixels, alpha, img_format=driver, **options)


def encode_terrain_rgb(heights: np.ndarray) -> np.ndarray:
    """Encode heights in metres (any shape) as Mapbox Terrain-RGB, shape ``(3, *heights.shape)``.

    Mapbox Terrain-RGB: ``v = round((h + 10000) * 10)``, ``R = v >> 16``,
    ``G = (v >> 8) & 255``, ``B = v & 255``; decode with ``h = -10000 + (R*65536 + G*256 + B)/10``.
    ``v`` is clipped to 0..2**24-1 (heights -10000 m .. 1667721.5 m). Not rio-tiler's
    ``mapzen_elevation_rgb``, which is the Terrarium encoding.
    """
    value = np.clip(np.rint((np.asarray(heights, np.float64) + 10000.0) * 10.0), 0, 2**24 - 1)
    v = value.astype(np.int64)
    return np.stack([v >> 16, (v >> 8) & 255, v & 255]).astype(np.uint8)


def terrain_tile(path: Path, z: int, x: int, y: int, *, invert: bool = False) -> bytes | None:
    """Render XYZ tile ``z/x/y`` of band 1 of the elevation COG at ``path`` as Terrain-RGB.

    Implements ``cog.tile.terrain`` (Geopera COG & tiles operations): a 256x256 RGBA PNG,
    bilinear reprojection, heights in metres (negated when ``invert``, for depth data),
    masked/nodata pixels fully transparent (RGBA 0,0,0,0). Returns ``None`` for an empty tile.
    """
    with Reader(str(path)) as src:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = src.tile(
                    x, y, z, tilesize=TILE_SIZE, indexes=1, reproject_method="bilinear"
                )
        except TileOutsideBounds:
            return None
    data, valid = _valid_pixels(image.array)
    if not valid.any():
        return None
    heights = -data[0] if invert else data[0]
    rgb = np.where(valid, encode_terrain_rgb(heights), 0).astype(np.uint8)
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    return render(rgb, alpha, img_format="PNG")


def thumbnail(path: Path, width: int | None = None, height: int | None = None) -> bytes:
    """A JPEG thumbnail of the COG at ``path`` from its smallest overview (``cog.thumbnail``,
    Geopera COG & tiles operations: "Generate a JPEG thumbnail from the smallest COG
    overview").

    ``width`` and ``height`` are pixels; with one of them the other keeps the aspect ratio,
    with neither the longer side is 256 (our choice). The first three bands (or band 1) are
    stretched from their 2nd to 98th percentile; masked pixels are black.
    """
    with Reader(str(path)) as src:
        count = src.dataset.count
        indexes = (1, 2, 3) if count >= 3 else (1,)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if width and height:
                image = src.preview(indexes=indexes, width=width, height=height)
            else:
                image = src.preview(indexes=indexes, max_size=width or height or 256)
    data, valid = _valid_pixels(image.array)
    if valid.any():
        ranges = []
        for band in data:
            low, high = np.percentile(band[valid], (2, 98))
            ranges.append((float(low), float(high) if high > low else float(low) + 1.0))
    else:
        ranges = [(0.0, 1.0)] * data.shape[0]
    pixels = np.where(valid, _stretch(data, ranges), 0).astype(np.uint8)
    return render(pixels, None, img_format="JPEG")
