"""What one seed walks: a layer's tiles over a box and zoom range, in a fixed order.

The order is zoom by zoom, then mercantile's column-major order within a zoom, then the
formats in the order given. It depends only on the plan's parameters, so a tile's index in
it is stable across runs and a resume state can record just the next index.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mercantile

from gateway.layers import Bounds, Layer
from gateway.seed.area import clip_to_layer
from gateway.services.tiles import TileAddress


@dataclass(frozen=True, slots=True)
class SeedPlan:
    """The tiles of ``layer`` overlapping ``bbox`` at zoom ``zooms[0]..zooms[1]``, each in
    every format of ``formats``, at ``scale`` (1: 256 px, 2: 512 px ``@2x``).

    Build it with :meth:`for_layer`, which clips the box and zooms to the layer; tiles
    outside the layer's bounds are never part of a plan.
    """

    layer: Layer
    bbox: Bounds
    zooms: tuple[int, int]
    formats: tuple[str, ...]
    scale: int

    @classmethod
    def for_layer(
        cls,
        layer: Layer,
        bbox: Bounds,
        zooms: tuple[int, int],
        formats: tuple[str, ...],
        scale: int = 1,
    ) -> SeedPlan:
        """A plan with ``bbox`` and ``zooms`` clipped to the layer.

        Raises:
            AreaError: no overlap with the layer's bounds or zoom range.
            ValueError: ``scale`` not 1 or 2, or no formats.
        """
        if scale not in (1, 2):
            raise ValueError(f"scale must be 1 or 2, got {scale}")
        if not formats:
            raise ValueError("no formats")
        clipped, zoom_range = clip_to_layer(layer, bbox, zooms)
        return cls(layer, clipped, zoom_range, tuple(formats), scale)

    def tiles(self) -> Iterator[mercantile.Tile]:
        """The plan's tiles (each once, whatever the formats), in plan order."""
        west, south, east, north = self.bbox
        zooms = range(self.zooms[0], self.zooms[1] + 1)
        for tile in mercantile.tiles(west, south, east, north, zooms):
            if self.layer.covers(tile):
                yield tile

    def addresses(self, start: int = 0) -> Iterator[tuple[int, TileAddress]]:
        """``(index, address)`` for every tile and format, from index ``start`` on."""
        pairs = (
            TileAddress(self.layer, t.z, t.x, t.y, self.scale, fmt)
            for t in self.tiles()
            for fmt in self.formats
        )
        return itertools.islice(enumerate(pairs), start, None)

    def count(self) -> int:
        """How many addresses the plan holds (walks the tiles once)."""
        return sum(1 for _ in self.tiles()) * len(self.formats)

    def params(self) -> dict[str, Any]:
        """The parameters that define the tile order (JSON-ready); equal plans, equal
        params. The layer fingerprint is included, so new render parameters start over."""
        return {
            "layer": self.layer.name,
            "fingerprint": self.layer.fingerprint,
            "bbox": [round(v, 9) for v in self.bbox],
            "zooms": list(self.zooms),
            "formats": list(self.formats),
            "scale": self.scale,
        }

    def digest(self) -> str:
        """16 hex digits identifying :meth:`params` (SHA-256 of canonical JSON)."""
        text = json.dumps(self.params(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line for people: layer, zooms, formats, scale, box."""
        bbox = ",".join(f"{v:.6f}".rstrip("0").rstrip(".") for v in self.bbox)
        return (
            f"layer {self.layer.name}, zoom {self.zooms[0]}-{self.zooms[1]}, "
            f"{'+'.join(self.formats)} @{self.scale}x, bbox {bbox}"
        )
