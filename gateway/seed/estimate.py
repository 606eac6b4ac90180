"""The dry run of a seed: how many tiles, how many not fresh now, and the egress estimate.

Reads the cache only; never calls the upstream. The bytes per tile are the average size of
this layer's non-empty tiles of that format already in the cache (render parameters as
now, up to :data:`SAMPLE_TILES` of them), else :data:`DEFAULT_TILE_BYTES`. An ``@2x`` tile
costs its four z+1 PNG children upstream, so it is estimated at four PNG tiles (an upper
bound: children already cached are not fetched again).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.layers import Layer
from gateway.seed.plan import SeedPlan
from gateway.storage.tiles import TileCache

DEFAULT_TILE_BYTES = {"png": 40_000, "jpg": 15_000, "webp": 12_000}
"""Assumed upstream bytes of one 256 px tile by format, when the cache holds no sample."""

SAMPLE_TILES = 200
"""Cached tiles read, at most, per format for the average size."""


@dataclass(slots=True)
class DryRun:
    """What a seed would do now.

    Attributes:
        total: addresses in the plan (tiles x formats).
        not_fresh: addresses with no fresh cache entry: what the seed would fetch.
        not_fresh_by_format: the same, per format.
        tile_bytes: bytes per upstream tile by format, and where the figure comes from.
        upstream_calls: upstream calls the seed would make, at most.
        egress_bytes: estimated upstream bytes.
    """

    total: int = 0
    not_fresh: int = 0
    not_fresh_by_format: dict[str, int] = field(default_factory=dict)
    tile_bytes: dict[str, tuple[int, str]] = field(default_factory=dict)
    upstream_calls: int = 0
    egress_bytes: int = 0


def average_tile_bytes(cache: TileCache, layer: Layer, fmt: str) -> tuple[int | None, int]:
    """Average size of ``layer``'s cached non-empty 256 px ``fmt`` tiles, and the sample count
    (None, 0 when there are none)."""
    prefix = f"tile/{layer.name}/{layer.fingerprint}/"
    suffix = f"@1x.{fmt}"
    sizes: list[int] = []
    for key in cache.keys(prefix):
        if not key.endswith(suffix):
            continue
        tile = cache.get(key, from_disk=True)
        if tile is not None and not tile.empty:
            sizes.append(len(tile.body))
            if len(sizes) >= SAMPLE_TILES:
                break
    if not sizes:
        return None, 0
    return round(sum(sizes) / len(sizes)), len(sizes)


def dry_run(cache: TileCache, plan: SeedPlan) -> DryRun:
    """Count ``plan``'s addresses and those not fresh in ``cache``, and estimate the egress.

    Blocking (one disk read per address).
    """
    result = DryRun(not_fresh_by_format=dict.fromkeys(plan.formats, 0))
    for _, address in plan.addresses():
        result.total += 1
        tile = cache.get(address.key, from_disk=True)
        if tile is None or not tile.is_fresh():
            result.not_fresh += 1
            result.not_fresh_by_format[address.fmt] += 1
    # formats whose size matters upstream: @2x fetches PNG children whatever the format
    for fmt in ("png",) if plan.scale == 2 else plan.formats:
        average, samples = average_tile_bytes(cache, plan.layer, fmt)
        if average is None:
            result.tile_bytes[fmt] = (DEFAULT_TILE_BYTES[fmt], f"default for {fmt}")
        else:
            result.tile_bytes[fmt] = (average, f"average of {samples} cached {fmt} tiles")
    per_tile_calls = 4 if plan.scale == 2 else 1
    result.upstream_calls = result.not_fresh * per_tile_calls
    for fmt, count in result.not_fresh_by_format.items():
        upstream_fmt = "png" if plan.scale == 2 else fmt
        result.egress_bytes += count * per_tile_calls * result.tile_bytes[upstream_fmt][0]
    return result
