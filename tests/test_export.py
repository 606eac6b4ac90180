"""``geopera-gateway export``: an MBTiles 1.3 file from the cache, fetching what is missing
at seeding priority; GDAL opens it, its tile count is the dry run's, a killed export leaves
nothing that looks complete, and bad arguments are one line on stderr with exit code 2.

The command runs as a subprocess against the bundled emulator, as an operator runs it."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gateway.cli.main import main
from gateway.emulator import FAULTS_KEY, Fault
from gateway.seed.export import MBTILES_APPLICATION_ID, tms_row
from tests.clients import needs_gdal
from tests.conftest import PLANTED_KEY, config_with
from tests.test_seed import OLINDA_BBOX, SEED_TILES, count, env_for, finish, start_cli

EXPORT = ("export", "--layer", "olinda", "--bbox", OLINDA_BBOX, "--zoom", "12-13")


def tiles_of(path) -> dict[tuple[int, int, int], bytes]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles")
        return {(z, x, row): bytes(data) for z, x, row, data in rows}


def metadata_of(path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT name, value FROM metadata"))


async def cli(*args: str, env) -> tuple[int, str]:
    return await finish(await start_cli(*args, env=env))


@needs_gdal
async def test_gdal_opens_the_export_and_its_tile_count_is_the_dry_runs(emulator, tmp_path):
    config = str(config_with(tmp_path))
    env = env_for(emulator, tmp_path)
    out = tmp_path / "olinda.mbtiles"
    code, dry = await cli(*EXPORT, "--mbtiles", str(out), "--dry-run", "--config", config, env=env)
    assert code == 0, dry
    planned = count(dry, "tiles")
    assert planned == SEED_TILES
    assert "est. egress" in dry
    assert emulator.renders() == 0
    assert not out.exists()

    code, output = await cli(*EXPORT, "--mbtiles", str(out), "--config", config, env=env)
    assert code == 0, output
    assert f"written:  {planned} tiles to {out}" in output
    assert emulator.renders() == planned
    assert [p.name for p in tmp_path.glob(".olinda.mbtiles*")] == []  # no partial left

    process = await asyncio.create_subprocess_exec(
        "gdalinfo", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    info = stdout.decode()
    assert "Driver: MBTiles/MBTiles" in info
    assert re.search(r"^\s+minzoom=12$", info, re.M)
    assert re.search(r"^\s+maxzoom=13$", info, re.M)
    assert re.search(r"^\s+ZOOM_LEVEL=13$", info, re.M)  # full resolution: the highest zoom
    assert "Overviews: " in info  # zoom 12 below it
    assert "name=Olinda, Brazil: Landsat 7 true colour" in info
    assert "format=png" in info

    tiles = tiles_of(out)
    assert len(tiles) == planned  # every tile of the dry run's plan
    with sqlite3.connect(out) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == MBTILES_APPLICATION_ID
    meta = metadata_of(out)
    assert {"name", "format", "bounds", "center", "minzoom", "maxzoom", "attribution"} <= set(meta)
    assert meta["bounds"] == OLINDA_BBOX
    assert (meta["minzoom"], meta["maxzoom"]) == ("12", "13")
    lon, lat, zoom = meta["center"].split(",")
    assert -34.92 < float(lon) < -34.82
    assert -8.05 < float(lat) < -7.94
    assert zoom in ("12", "13")
    assert "U.S. Geological Survey" in meta["attribution"]
    # rows are TMS: XYZ 13/3302/4278 (a tile of Olinda) is stored at row 2^13 - 1 - 4278
    assert tms_row(13, 4278) == 3913
    image = np.asarray(Image.open(io.BytesIO(tiles[(13, 3302, 3913)])).convert("RGBA"))
    assert image.shape == (256, 256, 4)
    assert image[..., :3][image[..., 3] > 0].std() > 5
    assert (13, 3302, 4278) not in tiles

    again = tmp_path / "again.mbtiles"
    code, output = await cli(*EXPORT, "--mbtiles", str(again), "--config", config, env=env)
    assert code == 0, output
    assert count(output, "skipped") == planned  # straight from the cache
    assert emulator.renders() == planned
    assert tiles_of(again) == tiles


async def test_a_killed_export_leaves_no_file_that_looks_complete(emulator, tmp_path):
    config = str(config_with(tmp_path))
    env = env_for(emulator, tmp_path)
    out = tmp_path / "killed.mbtiles"
    emulator.app[FAULTS_KEY].add(Fault("hang", operation="cog.tile.render", seconds=120))
    args = (*EXPORT, "--mbtiles", str(out), "--concurrency", "1", "--config", config)
    process = await start_cli(*args, env=env)
    for _ in range(600):  # until the export is under way: its render is held by the emulator
        if emulator.app[FAULTS_KEY].held or process.returncode is not None:
            break
        await asyncio.sleep(0.05)
    assert process.returncode is None, "the export ended before it was killed"
    (partial,) = tmp_path.glob(".killed.mbtiles.*.partial")
    process.send_signal(signal.SIGKILL)
    code, _ = await finish(process)
    assert code == -signal.SIGKILL
    assert not out.exists()
    assert [p.name for p in tmp_path.glob("*.mbtiles")] == []
    with sqlite3.connect(partial) as db:  # not an MBTiles file: no metadata rows at all
        assert db.execute("SELECT count(*) FROM metadata").fetchone()[0] == 0
    emulator.app[FAULTS_KEY].release()

    code, output = await finish(await start_cli(*args, env=env))
    assert code == 0, output
    assert len(tiles_of(out)) == SEED_TILES
    assert not partial.exists()  # the dead export's leftovers are cleaned


async def test_an_export_with_failed_tiles_writes_nothing(emulator, tmp_path):
    config = str(
        config_with(  # fail each tile at once: no retries, no breaker pausing the rest
            tmp_path,
            ("retry_attempts = 3", "retry_attempts = 1"),
            ("breaker_failures = 5", "breaker_failures = 1000"),
        )
    )
    env = env_for(emulator, tmp_path)
    out = tmp_path / "failed.mbtiles"
    emulator.app[FAULTS_KEY].add(Fault("status", operation="cog.tile.render", status=500, count=99))
    args = (*EXPORT, "--mbtiles", str(out), "--config", config)
    code, output = await cli(*args, env=env)
    assert code == 1, output
    assert "export not written" in output
    assert not out.exists()
    assert list(tmp_path.glob(".failed.mbtiles*")) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--layer", "olinda", "--bbox", OLINDA_BBOX, "--zoom", "12"), "--mbtiles"),
        (("--layer", "nope", "--bbox", OLINDA_BBOX, "--zoom", "12", "--mbtiles", "x.mbtiles"),
         "unknown layer 'nope'"),
        (("--layer", "olinda", "--bbox", "-35,-8", "--zoom", "12", "--mbtiles", "x.mbtiles"),
         "four numbers"),
        (("--layer", "olinda", "--bbox", OLINDA_BBOX, "--zoom", "20", "--mbtiles", "x.mbtiles"),
         "outside the zoom"),
        (("--layer", "olinda", "--bbox", OLINDA_BBOX, "--zoom", "12", "--mbtiles", "x.mbtiles",
          "--format", "png,webp"), "one format"),
        (("--layer", "st-helens", "--bbox", OLINDA_BBOX, "--zoom", "12", "--mbtiles", "x.mbtiles",
          "--format", "jpg"), "serves png"),
        (("--layer", "olinda", "--bbox", OLINDA_BBOX, "--zoom", "12",
          "--mbtiles", "no/such/dir/x.mbtiles"), "existing directory"),
        (("--layer", "olinda", "--bbox", OLINDA_BBOX, "--zoom", "12", "--mbtiles", "x.mbtiles",
          "--concurrency", "0"), "--concurrency"),
    ],
)  # fmt: skip
def test_export_argument_errors_are_one_line_and_exit_2(
    args, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("GEOPERA_API_KEY", PLANTED_KEY)
    monkeypatch.setenv("GEOPERA_BASE_URL", "http://127.0.0.1:9")  # never called
    monkeypatch.setenv("GEOPERA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["export", *args, "--config", str(config_with(tmp_path))])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.mbtiles"))
    assert not list(tmp_path.glob(".*.partial"))


def test_the_seed_command_s_argument_errors_are_one_line_too():
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "seed", "--layer", "olinda"],
        capture_output=True,
        text=True,
        env={**os.environ, "GEOPERA_API_KEY": PLANTED_KEY},
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "required" in done.stderr
