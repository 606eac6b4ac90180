"""Areas for seeding and purging: a ``W,S,E,N`` box in degrees and an ``A-B`` zoom range."""

from __future__ import annotations

import math
import re

import mercantile

from gateway.layers import MAX_ZOOM, Bounds, Layer


class AreaError(ValueError):
    """A box, zoom range or format list that cannot be used; the message says why."""


_ZOOM = re.compile(r"(?P<low>0|[1-9][0-9]?)(?:-(?P<high>0|[1-9][0-9]?))?")
_NUMBER = re.compile(r"-?[0-9]{1,3}(?:\.[0-9]{1,15})?")
"""Plain decimal degrees: no exponents, signs other than ``-``, ``nan`` or ``inf``."""


def parse_bbox(text: str) -> Bounds:
    """``"W,S,E,N"`` (degrees, EPSG:4326) as ``(west, south, east, north)``.

    Raises:
        AreaError: not four finite numbers, or not -180 <= W < E <= 180 and
            -90 <= S < N <= 90.
    """
    parts = [p.strip() for p in str(text).split(",")]
    values = [float(p) for p in parts if _NUMBER.fullmatch(p)]
    if len(values) != len(parts):
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise AreaError(
            f"bbox must be four numbers W,S,E,N in degrees, e.g. -34.92,-8.04,-34.83,-7.95; "
            f"got {str(text)[:80]!r}"
        )
    west, south, east, north = values
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise AreaError(
            "bbox needs -180 <= W < E <= 180 and -90 <= S < N <= 90 (W,S,E,N order); "
            f"got {str(text)[:80]!r}"
        )
    return west, south, east, north


def parse_zoom(text: str) -> tuple[int, int]:
    """``"A-B"`` (or ``"A"``) as the inclusive range ``(A, B)``.

    Raises:
        AreaError: not one or two integers, A > B, or outside 0..:data:`MAX_ZOOM`.
    """
    match = _ZOOM.fullmatch(str(text).strip())
    if match is None:
        raise AreaError(f"zoom must be A-B or A, e.g. 12-14; got {str(text)[:40]!r}")
    first = int(match["low"])
    last = int(match["high"]) if match["high"] is not None else first
    if not 0 <= first <= last <= MAX_ZOOM:
        raise AreaError(f"zoom needs 0 <= A <= B <= {MAX_ZOOM}; got {str(text)[:40]!r}")
    return first, last


def intersect(a: Bounds, b: Bounds) -> Bounds | None:
    """The overlap of two boxes, or None when they share no area."""
    west, south = max(a[0], b[0]), max(a[1], b[1])
    east, north = min(a[2], b[2]), min(a[3], b[3])
    if west >= east or south >= north:
        return None
    return west, south, east, north


def tile_overlaps(tile: mercantile.Tile, bbox: Bounds) -> bool:
    """Whether ``tile`` overlaps ``bbox`` by more than an edge (as :meth:`Layer.covers`)."""
    w, s, e, n = mercantile.bounds(tile)
    west, south, east, north = bbox
    return bool(w < east and e > west and s < north and n > south)


def clip_to_layer(
    layer: Layer, bbox: Bounds, zooms: tuple[int, int]
) -> tuple[Bounds, tuple[int, int]]:
    """``bbox`` and ``zooms`` clipped to the layer's bounds and zoom range.

    Raises:
        AreaError: the box does not overlap the layer's bounds, or the zoom range lies
            entirely outside the layer's.
    """
    clipped = intersect(bbox, layer.bounds)
    if clipped is None:
        bounds = ",".join(f"{v:g}" for v in layer.bounds)
        raise AreaError(f"bbox does not overlap layer {layer.name!r}, whose bounds are {bounds}")
    first, last = max(zooms[0], layer.minzoom), min(zooms[1], layer.maxzoom)
    if first > last:
        raise AreaError(
            f"zoom {zooms[0]}-{zooms[1]} is outside the zoom range of layer {layer.name!r}, "
            f"{layer.minzoom}-{layer.maxzoom}"
        )
    return clipped, (first, last)


def parse_formats(layer: Layer, text: str | None) -> tuple[str, ...]:
    """``"png,webp"`` as a tuple of the layer's formats; None → the layer's first format.

    Raises:
        AreaError: empty, or a format the layer does not serve.
    """
    if text is None:
        return layer.formats[:1]
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in layer.formats]
    if not formats or unknown:
        raise AreaError(
            f"layer {layer.name!r} serves {', '.join(layer.formats)}; got formats {text[:40]!r}"
        )
    return formats
