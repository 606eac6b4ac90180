"""Offline export: a layer's tiles over a box and zoom range as one MBTiles 1.3 file.

MBTiles 1.3 (https://github.com/mapbox/mbtiles-spec/blob/master/1.3/spec.md) is one SQLite
database: a ``metadata`` table of ``name``/``value`` text rows and a ``tiles`` table of
``zoom_level``, ``tile_column``, ``tile_row``, ``tile_data``, where rows follow the Tile Map
Service scheme (TMS: ``tile_row = 2^z - 1 - y`` for the XYZ row ``y`` counted from the
north; the spec's example: XYZ 11/327/791 is stored as row 1256). Written here:

- ``metadata``: the required ``name`` (the layer's title) and ``format`` (``png``, ``jpg``
  or ``webp``), the suggested ``bounds`` (the exported box, ``west,south,east,north``),
  ``center`` (``lon,lat,zoom``, as TileJSON's) , ``minzoom``, ``maxzoom``, and
  ``attribution``, ``description``, ``type`` (``overlay``), ``version`` (``1``) and
  ``scheme`` (``tms``); with the spec's unique indexes on both tables and SQLite's
  assigned ``application_id`` for MBTiles (``0x4D504258``, "MPBX").
- ``tiles``: every tile of the plan (:class:`~gateway.seed.plan.SeedPlan`), so the file
  holds as many tiles as the dry run counts; a tile the upstream reported empty is stored as
  the gateway's blank tile (transparent PNG/WEBP, black JPEG, sea-level Terrain-RGB).

The tiles come from the tile cache, and what it lacks is fetched by the seeder
(:class:`~gateway.seed.runner.Seeder`) through the gateway's own tile path at seeding
priority: each tile is written as soon as it is done, so the cache never has to hold the
whole export. The file is built under a temporary name beside the output
(``.<name>.<process>.partial``) and its metadata written last; only a complete export is
renamed into place (after ``fsync``). A killed export leaves at most that partial file,
which has no metadata and no ``.mbtiles`` name, and the next export of the same output
removes it once its process is gone. Only the standard library's :mod:`sqlite3` is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from gateway.discovery.tilejson import center
from gateway.seed.plan import SeedPlan
from gateway.seed.runner import Outcome
from gateway.services.tiles import TileAddress
from gateway.storage.claims import owner_alive, process_tag
from gateway.storage.tiles import TileCache

MBTILES_APPLICATION_ID = 0x4D504258
"""SQLite ``PRAGMA application_id`` assigned to MBTiles (SQLite's ``magic.txt``: "MPBX")."""

SCHEMA = (
    "CREATE TABLE metadata (name text, value text)",
    "CREATE UNIQUE INDEX name ON metadata (name)",
    "CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, "
    "tile_data blob)",
    "CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)",
)
"""The MBTiles 1.3 tables and the indexes the spec calls common."""

COMMIT_EVERY = 1000
"""Tiles per SQLite transaction while the file is built."""

PARTIAL_SUFFIX = ".partial"


def tms_row(z: int, y: int) -> int:
    """The TMS ``tile_row`` of XYZ row ``y`` at zoom ``z`` (rows counted from the south)."""
    return (1 << z) - 1 - y


def mbtiles_metadata(plan: SeedPlan) -> dict[str, str]:
    """The ``metadata`` rows for an export of ``plan`` (one format: ``plan.formats[0]``)."""
    layer = plan.layer
    view = dataclasses.replace(
        layer, bounds=plan.bbox, minzoom=plan.zooms[0], maxzoom=plan.zooms[1]
    )
    lon, lat, zoom = center(view)
    return {
        "name": layer.title,
        "format": plan.formats[0],
        "bounds": ",".join(f"{v:.6f}" for v in plan.bbox),
        "center": f"{lon:.6f},{lat:.6f},{zoom}",
        "minzoom": str(plan.zooms[0]),
        "maxzoom": str(plan.zooms[1]),
        "attribution": layer.attribution,
        "description": f"{layer.title}: layer {layer.name} exported by geopera-gateway",
        "type": "overlay",
        "version": "1",
        "scheme": "tms",
    }


def remove_abandoned(output: Path) -> int:
    """Delete partial files of ``output`` left by export processes that no longer run;
    returns how many."""
    removed = 0
    for partial in output.parent.glob(f".{output.name}.*{PARTIAL_SUFFIX}"):
        owner = partial.name[len(output.name) + 2 : -len(PARTIAL_SUFFIX)]
        if not owner_alive(owner):
            partial.unlink(missing_ok=True)
            removed += 1
    return removed


class MBTilesWriter:
    """An MBTiles 1.3 file being built at a temporary name, renamed to ``output`` by
    :meth:`commit`.

    Args:
        output: where the finished file goes (an existing file there is replaced then).
        metadata: the ``metadata`` rows, written at :meth:`commit`.

    Raises:
        OSError, sqlite3.Error: the temporary file cannot be created.
    """

    def __init__(self, output: Path, metadata: Mapping[str, str]) -> None:
        self.output = output
        self.metadata = dict(metadata)
        remove_abandoned(output)
        self.partial = output.with_name(f".{output.name}.{process_tag()}{PARTIAL_SUFFIX}")
        self.partial.unlink(missing_ok=True)
        self.count = 0
        self._db = sqlite3.connect(self.partial)
        self._db.execute(f"PRAGMA application_id = {MBTILES_APPLICATION_ID}")
        self._db.execute("PRAGMA journal_mode = OFF")  # a partial file is thrown away anyway
        self._db.execute("PRAGMA synchronous = OFF")  # one fsync at the end
        for statement in SCHEMA:
            self._db.execute(statement)

    def add(self, z: int, x: int, y: int, data: bytes) -> None:
        """Store the tile at XYZ ``z/x/y`` (its row is converted to TMS)."""
        self._db.execute(
            "INSERT OR REPLACE INTO tiles (zoom_level, tile_column, tile_row, tile_data) "
            "VALUES (?, ?, ?, ?)",
            (z, x, tms_row(z, y), sqlite3.Binary(data)),
        )
        self.count += 1
        if self.count % COMMIT_EVERY == 0:
            self._db.commit()

    def commit(self) -> int:
        """Write the metadata, flush the file to disk and rename it to ``output``; returns
        the number of tiles in it.

        Raises:
            OSError, sqlite3.Error: the file could not be finished (it is removed).
        """
        try:
            self._db.executemany(
                "INSERT INTO metadata (name, value) VALUES (?, ?)", self.metadata.items()
            )
            self._db.commit()
            count = int(self._db.execute("SELECT count(*) FROM tiles").fetchone()[0])
            self._db.close()
            with open(self.partial, "rb+") as file:
                os.fsync(file.fileno())
            os.replace(self.partial, self.output)
        except BaseException:
            self.discard()
            raise
        with contextlib.suppress(OSError):  # the rename itself, on file systems that need it
            directory = os.open(self.output.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return count

    def discard(self) -> None:
        """Close and delete the partial file (an interrupted or failed export)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self.partial.unlink(missing_ok=True)


@dataclasses.dataclass(slots=True)
class Exporter:
    """Puts each tile the seeder has finished into the file.

    Attributes:
        writer: the file being built.
        failed: tiles the seeder could not fetch.
        missing: tiles done but no longer in the cache when read (evicted at once: a cache
            far smaller than the tiles in flight).
    """

    writer: MBTilesWriter
    failed: int = 0
    missing: int = 0
    error: str | None = None

    def add(self, cache: TileCache, address: TileAddress, outcome: Outcome) -> None:
        """Write ``address``'s tile from ``cache`` unless the seeder reported it failed.
        A write that fails (a full disk) is recorded in :attr:`error`, and later tiles are
        no longer written (the seed goes on filling the cache for the next run)."""
        if outcome == "failed":
            self.failed += 1
            return
        if self.error is not None:
            return
        tile = cache.get(address.key, from_disk=True)
        if tile is None:
            self.missing += 1
            return
        try:
            self.writer.add(address.z, address.x, address.y, tile.body)
        except (OSError, sqlite3.Error) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def complete(self) -> bool:
        """Whether every tile done so far is in the file."""
        return not self.failed and not self.missing and self.error is None
