"""Seeding and purging: the ``seed`` and ``purge`` commands, ``POST /admin/purge``, and purge
consistency across processes' memory tiers. Real emulator, real caches in temporary
directories; CLI behaviour runs the command as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import mercantile
import pytest

from gateway.cli.main import main
from gateway.emulator import FAULTS_KEY, Fault
from gateway.seed.area import parse_bbox
from gateway.seed.plan import SeedPlan
from gateway.seed.purge import purge_tiles
from gateway.seed.runner import Seeder
from gateway.services.stack import open_tile_stack
from gateway.storage.tiles import PURGE_CHECK_S
from tests.conftest import PLANTED_KEY, TOKENS, config_with

OLINDA_BBOX = "-34.916589,-8.040927,-34.825966,-7.949822"
SEED = ("seed", "--layer", "olinda", "--bbox", OLINDA_BBOX, "--zoom", "12-13")
SEED_TILES = 13  # olinda's bounds cover 4 tiles at z12 and 9 at z13
TILE = "/tiles/olinda/13/3302/4278.png"


def inside(z: int, x: int, y: int) -> str:
    """A ``W,S,E,N`` box strictly inside tile z/x/y (it overlaps that tile only, at z)."""
    b = mercantile.bounds(x, y, z)
    pad = (b.east - b.west) / 10
    return f"{b.west + pad},{b.south + pad},{b.east - pad},{b.north - pad}"


def env_for(emulator, tmp_path: Path) -> dict[str, str]:
    return {
        "GEOPERA_BASE_URL": emulator.url,
        "GEOPERA_API_KEY": PLANTED_KEY,
        "GEOPERA_CACHE_DIR": str(tmp_path / "cache"),
        "GEOPERA_LOG_LEVEL": "INFO",
    }


async def start_cli(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str]:
    """Exit code and stdout; stderr must not hold the key either."""
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert PLANTED_KEY not in out.decode() + err.decode()
    return process.returncode, out.decode() + err.decode()


async def cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    return await finish(await start_cli(*args, env=env))


def count(output: str, name: str) -> int:
    """The number after ``name:`` in a summary or dry-run line."""
    found = re.search(rf"^\s+{name}:\s+(\d+)", output, re.MULTILINE)
    assert found, f"no {name!r} in:\n{output}"
    return int(found[1])


def renders(emulator) -> list[tuple[int, int, int]]:
    """z/x/y of every tile render the emulator answered."""
    return [
        (body["z"], body["x"], body["y"])
        for operation, body, _status in emulator.stats.log
        if operation == "cog.tile.render" and body is not None
    ]


async def test_dry_run_predicts_the_seed_and_a_second_seed_fetches_nothing(
    emulator, tmp_path, gateway_for
):
    config = str(config_with(tmp_path))
    env = env_for(emulator, tmp_path)

    code, dry = await cli(*SEED, "--dry-run", "--config", config, env=env)
    assert code == 0, dry
    assert count(dry, "tiles") == SEED_TILES
    assert count(dry, "not fresh") == SEED_TILES
    assert "40,000 bytes/tile (default for png)" in dry
    assert emulator.renders() == 0  # a dry run spends nothing

    code, first = await cli(*SEED, "--config", config, env=env)
    assert code == 0, first
    assert "seed complete" in first
    assert count(first, "fetched") + count(first, "empty") == count(dry, "not fresh")
    assert count(first, "failed") == 0
    assert count(first, "bytes") > 0
    assert sorted(renders(emulator)) == sorted(
        {(t.z, t.x, t.y) for t in mercantile.tiles(*parse_bbox(OLINDA_BBOX), [12, 13])}
    )
    assert not list((tmp_path / "cache-state").glob("seed-*.json"))  # completed: no state

    code, second = await cli(*SEED, "--config", config, env=env)
    assert code == 0, second
    assert count(second, "skipped") == SEED_TILES
    assert count(second, "fetched") == 0
    assert emulator.renders() == SEED_TILES

    code, dry = await cli(*SEED, "--dry-run", "--config", config, env=env)
    assert count(dry, "not fresh") == 0
    assert "average of 13 cached png tiles" in dry

    gateway = await gateway_for(emulator)  # the gateway finds the seeded tiles
    response = await gateway.get(TILE)
    assert (response.status, response.headers["X-Cache"]) == (200, "HIT")


async def test_an_interrupted_seed_resumes_without_fetching_a_tile_twice(start_upstream, tmp_path):
    slow = await start_upstream(delay_ms=250)
    config = str(config_with(tmp_path))
    env = env_for(slow, tmp_path)
    args = (*SEED, "--concurrency", "2", "--config", config)

    process = await start_cli(*args, env=env)
    async with asyncio.timeout(30):
        await slow.stats.wait_until(lambda _: slow.renders() >= 3)
    process.send_signal(signal.SIGINT)
    code, first = await finish(process)
    assert code == 130, first
    assert "seed interrupted" in first
    assert "resume:" in first
    (state,) = (tmp_path / "cache-state").glob("seed-olinda-*.json")
    assert 0 < json.loads(state.read_text())["next_index"] < SEED_TILES

    code, second = await cli(*args, env=env)
    assert code == 0, second
    assert "resuming at tile" in second
    assert "seed complete" in second
    assert count(first, "fetched") + count(second, "fetched") == SEED_TILES
    fetched = renders(slow)
    assert len(fetched) == SEED_TILES
    assert len(set(fetched)) == SEED_TILES
    assert not state.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--layer", "nope", "--bbox", OLINDA_BBOX, "--zoom", "12"), "unknown layer 'nope'"),
        (("--layer", "olinda", "--bbox", "-35,-8,-34", "--zoom", "12"), "four numbers"),
        (("--layer", "olinda", "--bbox", "-34,-8,-35,-7", "--zoom", "12"), "W < E"),
        (("--layer", "olinda", "--bbox", "10,10,11,11", "--zoom", "12"), "does not overlap"),
        (("--layer", "olinda", "--bbox", OLINDA_BBOX, "--zoom", "17-18"), "outside the zoom"),
        (("--layer", "olinda", "--bbox", OLINDA_BBOX, "--zoom", "13-12"), "A <= B"),
        (("--layer", "st-helens", "--bbox", OLINDA_BBOX, "--zoom", "12"), "does not overlap"),
        (
            ("--layer", "olinda", "--bbox", OLINDA_BBOX, "--zoom", "12", "--formats", "gif"),
            "serves png, jpg, webp",
        ),
    ],
)
def test_seed_rejects_bad_arguments_with_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEOPERA_API_KEY", PLANTED_KEY)
    monkeypatch.setenv("GEOPERA_BASE_URL", "http://127.0.0.1:9")  # never called
    monkeypatch.setenv("GEOPERA_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["seed", *args, "--config", str(config_with(tmp_path))]) == 2
    assert message in capsys.readouterr().err


def test_seed_refuses_a_state_file_of_another_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEOPERA_API_KEY", PLANTED_KEY)
    monkeypatch.setenv("GEOPERA_CACHE_DIR", str(tmp_path / "cache"))
    state = tmp_path / "other.json"
    state.write_text(json.dumps({"version": 1, "params": {"layer": "x"}, "next_index": 3}))
    args = [*SEED, "--state", str(state), "--config", str(config_with(tmp_path))]
    assert main(args) == 2
    assert "other parameters" in capsys.readouterr().err


async def test_seeding_is_paced_by_the_host_limiter_and_map_users_go_first(
    emulator, tmp_path, settings_for, gateway_for
):
    rps, burst = 4.0, 2
    config = config_with(
        tmp_path,
        ("asset_rps = 10.0", f"asset_rps = {rps}"),
        ("asset_burst = 20", "asset_burst = 2"),
    )
    settings = settings_for(emulator, config=config)
    map_user = await gateway_for(emulator, config=config)  # same cache and limiter state
    stack = open_tile_stack(settings)
    plan = SeedPlan.for_layer(
        settings.layers["olinda"], parse_bbox(OLINDA_BBOX), (12, 13), ("png",)
    )
    seeder = Seeder(stack.service, plan, concurrency=4)

    async def map_request() -> float:
        await asyncio.sleep(1.0)  # while seeding holds the bucket empty
        started = time.monotonic()
        response = await map_user.get("/tiles/olinda/14/6603/8556.png")
        assert (response.status, response.headers["X-Cache"]) == (200, "MISS")
        return time.monotonic() - started

    started = time.monotonic()
    try:
        summary, waited = await asyncio.gather(seeder.run(plan.count()), map_request())
    finally:
        await stack.aclose()
    elapsed = time.monotonic() - started
    assert summary.fetched + summary.empty == SEED_TILES
    assert summary.failed == 0
    # one more upstream call (the map user's) went through the same asset bucket
    assert elapsed >= (SEED_TILES + 1 - burst) / rps - 0.25
    assert waited < 1.5  # the map user reserved ahead instead of queueing behind the seed
    assert emulator.stats.throttled == 0


async def test_a_throttled_tile_waits_retry_after_and_succeeds(emulator, settings_for):
    emulator.app[FAULTS_KEY].add(Fault("status", status=429, retry_after="1"))
    settings = settings_for(emulator)
    stack = open_tile_stack(settings)
    plan = SeedPlan.for_layer(
        settings.layers["olinda"], parse_bbox(inside(13, 3302, 4278)), (13, 13), ("png",)
    )
    started = time.monotonic()
    try:
        summary = await Seeder(stack.service, plan, concurrency=1).run(plan.count())
    finally:
        await stack.aclose()
    assert (summary.fetched, summary.failed) == (1, 0)
    assert time.monotonic() - started >= 1.0
    assert emulator.stats.statuses[("cog.tile.render", 429)] == 1


async def test_a_failing_tile_is_counted_and_the_exit_code_is_1(emulator, tmp_path):
    emulator.app[FAULTS_KEY].add(Fault("status", status=500, count=3))  # every attempt fails
    args = ("seed", "--layer", "olinda", "--bbox", inside(13, 3302, 4278), "--zoom", "13")
    code, output = await cli(
        *args, "--config", str(config_with(tmp_path)), env=env_for(emulator, tmp_path)
    )
    assert code == 1, output
    assert (count(output, "failed"), count(output, "fetched")) == (1, 0)
    assert "UpstreamServerError" in output  # logged with the domain error it was


async def test_seeding_at_scale_2_fetches_the_four_children(emulator, settings_for):
    settings = settings_for(emulator)
    stack = open_tile_stack(settings)
    plan = SeedPlan.for_layer(
        settings.layers["olinda"], parse_bbox(inside(13, 3302, 4278)), (13, 13), ("webp",), 2
    )
    try:
        summary = await Seeder(stack.service, plan).run(plan.count())
        stored = stack.cache.get(settings.layers["olinda"].cache_key(13, 3302, 4278, 2, "webp"))
    finally:
        await stack.aclose()
    assert summary.fetched == 1
    assert emulator.renders() == 4
    assert stored is not None
    assert stored.media_type == "image/webp"


async def test_purge_command_removes_by_zoom_and_box_and_spares_other_layers(
    emulator, tmp_path, settings_for
):
    settings = settings_for(emulator)
    stack = open_tile_stack(settings)
    bbox = parse_bbox(OLINDA_BBOX)
    try:
        for name, formats in (("olinda", ("png", "webp")), ("olinda-ndvi", ("png",))):
            plan = SeedPlan.for_layer(settings.layers[name], bbox, (12, 13), formats)
            summary = await Seeder(stack.service, plan).run(plan.count())
            assert summary.fetched == plan.count()
        # in-process: a box inside one z13 tile, zoom 13 only → that tile's two formats
        assert purge_tiles(stack.cache, "olinda", parse_bbox(inside(13, 3302, 4278)), (13, 13)) == 2
    finally:
        await stack.aclose()

    env = env_for(emulator, tmp_path)
    config = str(config_with(tmp_path))
    code, output = await cli(
        "purge", "--layer", "olinda", "--zoom", "13", "--config", config, env=env
    )
    assert code == 0, output
    assert "removed 16 cached tiles of layer olinda" in output  # 9 tiles x 2 formats, less 2
    code, output = await cli("purge", "--layer", "olinda", "--config", config, env=env)
    assert "removed 8 cached tiles of layer olinda" in output  # the z12 ones
    code, output = await cli("purge", "--layer", "olinda", "--bbox", "1,2,3", env=env)
    assert code == 2
    assert "four numbers" in output

    stack = open_tile_stack(settings)
    try:
        assert not list(stack.cache.keys("tile/olinda/"))
        assert len(list(stack.cache.keys("tile/olinda-ndvi/"))) == SEED_TILES
    finally:
        await stack.aclose()


async def test_admin_purge_endpoint(emulator, gateway_for):
    client = await gateway_for(emulator)

    def bearer(scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[scope]}"}

    assert (await client.get(TILE)).headers["X-Cache"] == "MISS"
    assert (await client.get(TILE)).headers["X-Cache"] == "HIT"
    renders_before = emulator.renders()

    response = await client.post("/admin/purge", json={"layer": "olinda"})
    assert response.status == 401
    assert response.headers["Content-Type"] == "application/problem+json"
    response = await client.post("/admin/purge", json={"layer": "olinda"}, headers=bearer("tiles"))
    assert response.status == 403
    assert response.headers["Content-Type"] == "application/problem+json"

    admin = bearer("admin")
    for bad in (
        {},
        {"layer": "nope"},
        {"layer": "olinda", "bbox": "1,2,3"},
        {"layer": "olinda", "bbox": "10,10,5,5"},
        {"layer": "olinda", "zoom": "a-b"},
        {"layer": "olinda", "zoom": "14-12"},
        {"layer": "olinda", "zoom": ["12"]},
    ):
        response = await client.post("/admin/purge", json=bad, headers=admin)
        assert response.status == 400, bad
        assert response.headers["Content-Type"] == "application/problem+json"
    response = await client.post("/admin/purge", data="[1]", headers=admin)
    assert response.status == 400
    for nested in ("[" * 100_000, '{"layer": ' * 50_000):  # deeper than json's recursion
        response = await client.post("/admin/purge", data=nested, headers=admin)
        assert response.status == 400
        assert (await response.json())["type"].endswith("/malformed-body")

    response = await client.post("/admin/purge?layer=olinda&zoom=12", headers=admin)
    assert (response.status, await response.json()) == (200, {"layer": "olinda", "removed": 0})
    response = await client.post(
        "/admin/purge", json={"layer": "olinda", "zoom": "13", "bbox": OLINDA_BBOX}, headers=admin
    )
    assert (response.status, await response.json()) == (200, {"layer": "olinda", "removed": 1})
    assert emulator.renders() == renders_before  # purging never calls the upstream

    response = await client.get(TILE)
    assert response.headers["X-Cache"] == "MISS"


async def test_a_purge_in_one_process_reaches_another_process_memory_tier(emulator, gateway_for):
    worker_a = await gateway_for(emulator)  # two apps, two caches, one cache directory
    worker_b = await gateway_for(emulator, token="admin")
    assert (await worker_a.get(TILE)).headers["X-Cache"] == "MISS"
    assert (await worker_a.get(TILE)).headers["X-Cache"] == "HIT"  # now in A's memory tier

    response = await worker_b.post("/admin/purge", json={"layer": "olinda"})
    assert (response.status, await response.json()) == (200, {"layer": "olinda", "removed": 1})

    await asyncio.sleep(PURGE_CHECK_S + 0.1)
    response = await worker_a.get(TILE)
    assert (response.status, response.headers["X-Cache"]) == (200, "MISS")
    assert emulator.renders() == 2
    assert (await worker_a.get(TILE)).headers["X-Cache"] == "HIT"  # cached again as usual


async def test_purge_and_dry_run_need_no_key_and_find_the_cache_from_anywhere(emulator, tmp_path):
    """The config's relative cache directory is the one next to the config file, whatever
    directory each command runs from; only a real seed needs the Geopera key."""
    conf = tmp_path / "etc"
    conf.mkdir()
    config = conf / "gateway.toml"
    text = config_with(tmp_path).read_text()
    config.write_text(text.replace('directory = ".cache/geopera-gateway/tiles"', 'directory = "c"'))
    bare = {k: v for k, v in os.environ.items() if not k.startswith("GEOPERA_")}
    runs = []
    for cwd, key, args in [
        ("a", True, (*SEED, "--config", str(config))),
        ("b", False, (*SEED, "--config", str(config), "--dry-run")),
        ("c", False, ("purge", "--layer", "olinda", "--config", str(config))),
    ]:
        (tmp_path / cwd).mkdir()
        env = {**bare, "GEOPERA_BASE_URL": emulator.url}
        if key:
            env["GEOPERA_API_KEY"] = PLANTED_KEY
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=tmp_path / cwd,
        )
        runs.append(await finish(process))
    (seeded, seed_out), (dry, dry_out), (purged, purge_out) = runs
    assert seeded == 0, seed_out
    assert count(seed_out, "fetched") == SEED_TILES, seed_out
    assert dry == 0, dry_out
    assert count(dry_out, "not fresh") == 0  # it read the seeded cache
    assert purged == 0, purge_out
    assert f"removed {SEED_TILES} cached tiles" in purge_out
    assert (conf / "c").is_dir()
    for cwd in "abc":  # no cache created where the commands ran
        assert list((tmp_path / cwd).iterdir()) == []
