"""Faults in the gateway's own state and in what the upstream sends: hostile tile answers,
encoded echoes of the key, breakers, concurrency leases, damaged and full caches.

Everything runs against real things: the emulator as an HTTP server (its fault injection
stands in for a hostile upstream), real diskcache directories, real subprocesses, and a real
full disk (a small tmpfs; those tests skip when it cannot be mounted).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import aiohttp
import diskcache
import pytest

from gateway.emulator import FAULTS_KEY, Fault
from gateway.http.keys import LAYERS, TILE_SERVICE
from gateway.http.params import parse_tile
from gateway.services.tiles import TileAddress
from gateway.storage.tiles import (
    ENTRY_FORMAT,
    EntryFormatError,
    decode_entry,
    encode_entry,
    make_tile,
)
from gateway.upstream.breakers import BreakerOpen, Breakers, Scope
from gateway.upstream.buckets import ConcurrencyCap, LimitExceeded, Priority, SharedState
from tests.conftest import PLANTED_KEY, config_with, fill_disk
from tests.test_cli import serving_workers

OLINDA = "/tiles/olinda/13/3302/4278.png"  # an 82 kB PNG
OLINDA_Z14 = "/tiles/olinda/14/6603/8555.png"  # a 23 kB PNG
ATTEMPTS = 3  # retry_attempts in the demo config


async def problem(response) -> dict:
    assert response.headers["Content-Type"] == "application/problem+json"
    return await response.json(content_type=None)


def tile_key(client, path: str) -> str:
    """The cache key of a ``/tiles/{layer}/{z}/{x}/{y}.{fmt}`` path."""
    _, _, layer, z, x, tail = path.split("/")
    return parse_tile(client.server.app[LAYERS][layer], z, x, tail).key


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)


# --------------------------------------------------------------------------- redaction


def encoded_forms(key: str) -> list[str]:
    """The key and ``Bearer <key>`` in every encoding an upstream might echo them in."""
    forms = []
    for text in (key, f"Bearer {key}"):
        raw = text.encode()
        std = base64.b64encode(raw).decode()
        url = base64.urlsafe_b64encode(raw).decode()
        forms += [std, std.rstrip("="), url, url.rstrip("="), raw.hex(), raw.hex().upper()]
        forms += ["".join(f"%{b:02X}" for b in raw), "".join(f"%{b:02x}" for b in raw)]
    return forms


@pytest.mark.parametrize("encoding", ["base64", "base64url", "hex", "percent"])
async def test_an_encoded_echo_of_the_key_never_reaches_the_log(
    gateway, emulator, caplog, encoding
):
    emulator.app[FAULTS_KEY].add(Fault("echo-key", encoding=encoding, count=ATTEMPTS))
    response = await gateway.get(OLINDA)
    assert response.status == 502
    text = log_text(caplog)
    echoes = [line for line in text.splitlines() if "backend failed for" in line]
    assert echoes
    assert all("***" in line for line in echoes)
    for form in encoded_forms(PLANTED_KEY):
        assert form not in text


def test_redaction_finds_the_key_inside_longer_encoded_text():
    from gateway.secrets import Secret, redact

    secret = Secret("gpra_another-planted-key-0123456789")
    for prefix in ("", "x", "xy", "user=admin&auth=Bearer "):
        raw = (prefix + secret.reveal() + " trailing").encode()
        for encoded in (
            base64.b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode().rstrip("="),
            raw.hex(),
        ):
            cleaned = redact(f"detail: {encoded}")
            assert "***" in cleaned
            for form in encoded_forms(secret.reveal()):
                assert form not in cleaned
    assert redact("nothing secret here") == "nothing secret here"


# --------------------------------------------------------------------------- hostile tiles


@pytest.mark.parametrize("kind", ["huge-png", "corrupt-png"])
async def test_a_hostile_png_is_502_and_never_cached(gateway, emulator, caplog, kind):
    emulator.app[FAULTS_KEY].add(Fault(kind))
    response = await gateway.get(OLINDA)
    assert response.status == 502
    assert (await problem(response))["type"].endswith("upstream-bad-response")
    assert "Traceback" not in log_text(caplog)
    again = await gateway.get(OLINDA)  # nothing was cached: the upstream is asked again
    assert again.status == 200
    assert again.headers["X-Cache"] == "MISS"
    assert emulator.renders() == 2


# --------------------------------------------------------------------------- breakers


async def wait_for_fault_taken(emulator) -> None:
    """Until the emulator has taken every queued fault (the call reached it)."""
    async with asyncio.timeout(10):
        await emulator.app[FAULTS_KEY].drained()


async def test_a_probe_answered_4xx_closes_the_breaker(gateway_for, emulator, clock):
    gateway = await gateway_for(emulator, clock=clock)
    emulator.app[FAULTS_KEY].add(
        Fault("status", status=429, retry_after="1", type="asset-rate-limited"),
        Fault("status", status=422),
    )
    assert (await gateway.get(OLINDA)).status == 503  # 429: the asset's breaker opens for 1 s
    clock.advance(1.1)  # past the Retry-After: half-open
    probe = await gateway.get(OLINDA)  # the probe is refused (422), but the upstream is alive
    assert probe.status == 502
    assert (await (await gateway.get("/readyz")).json())["checks"]["open_breakers"] == []
    after = await gateway.get(OLINDA)  # so the breaker closed, and the guard agrees
    assert after.status == 200
    assert after.headers["X-Cache"] == "MISS"
    assert emulator.renders() == 3


async def test_readyz_shows_a_half_open_breaker_while_it_refuses(gateway_for, emulator, clock):
    gateway = await gateway_for(emulator, clock=clock)
    emulator.app[FAULTS_KEY].add(
        Fault("status", status=429, retry_after="1", type="asset-rate-limited"),
        Fault("hang", seconds=3.0),
    )
    assert (await gateway.get(OLINDA)).status == 503
    clock.advance(1.1)
    probe = asyncio.ensure_future(gateway.get(OLINDA))  # the probe hangs upstream for 3 s
    await wait_for_fault_taken(emulator)
    refused = await gateway.get("/tiles/olinda/13/3303/4278.png")  # same asset: refused
    assert refused.status == 503
    assert (await problem(refused))["type"].endswith("upstream-circuit-open")
    ready = await (await gateway.get("/readyz")).json()
    assert ready["checks"]["open_breakers"] == ["cog.tile.render (asset, half-open)"]
    assert (await probe).status == 200  # the probe succeeded: closed
    assert (await (await gateway.get("/readyz")).json())["checks"]["open_breakers"] == []


async def test_an_asset_probe_failing_5xx_reopens_it_for_its_retry_after(
    gateway_for, emulator, clock
):
    gateway = await gateway_for(emulator, clock=clock)
    emulator.app[FAULTS_KEY].add(
        Fault("status", status=429, retry_after="1", type="asset-rate-limited")
    )
    assert (await gateway.get(OLINDA)).status == 503
    clock.advance(1.1)
    emulator.app[FAULTS_KEY].add(Fault("status", status=500))
    held = await gateway.get(OLINDA)  # the probe fails; its retry meets the reopened breaker
    assert held.status == 503
    assert int(held.headers["Retry-After"]) == 1  # the upstream's Retry-After, not 30 s
    clock.advance(1.1)
    again = await gateway.get(OLINDA)
    assert again.status == 200
    assert again.headers["X-Cache"] == "MISS"


async def test_a_huge_retry_after_is_capped_across_restarts(gateway_for, emulator, tmp_path, clock):
    first = await gateway_for(emulator, clock=clock)
    emulator.app[FAULTS_KEY].add(
        Fault("status", status=429, retry_after="999999", type="asset-rate-limited")
    )
    throttled = await first.get(OLINDA)
    assert throttled.status == 503
    assert int(throttled.headers["Retry-After"]) == 3600
    held = await first.get(OLINDA)
    assert held.status == 503
    assert int(held.headers["Retry-After"]) <= 3600
    # a restart with a lower cap: the stored breaker is held to it as well
    config = config_with(tmp_path, ("max_retry_after_s = 3600.0", "max_retry_after_s = 1"))
    second = await gateway_for(emulator, config=config, clock=clock)
    capped = await second.get(OLINDA)
    assert capped.status == 503
    assert int(capped.headers["Retry-After"]) == 1
    clock.advance(1.1)
    recovered = await second.get(OLINDA)
    assert recovered.status == 200, await recovered.text()


def test_a_stored_breaker_beyond_the_cap_is_held_to_it(tmp_path):
    from gateway.upstream.breakers import BreakerState

    state = SharedState(tmp_path / "state")
    scope = Scope("cog.tile.render", "https://example.invalid/a.tif")
    # stored with a higher cap (an older configuration)
    state.cache.set(scope.key, BreakerState(open_until=time.time() + 999_999).dump())
    breakers = Breakers(state, 5, 30, 30, max_open_s=60)
    with pytest.raises(BreakerOpen) as refused:
        breakers.check([scope])
    assert refused.value.retry_after_s <= 60
    assert [b.scope for b in breakers.statuses()] == [scope]


# --------------------------------------------------------------------------- concurrency leases

LEASE_HOLDER = """
import asyncio, pathlib, sys
from gateway.upstream.buckets import ConcurrencyCap, Priority, SharedState

async def main():
    cap = ConcurrencyCap(SharedState(pathlib.Path(sys.argv[1])), 2, 6 * 3600)
    for _ in range(2):
        await cap.acquire(0, Priority.INTERACTIVE)
    print("held", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_leases_of_a_killed_process_come_back_at_once(tmp_path):
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LEASE_HOLDER, str(tmp_path / "state"), stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(30):
            assert (await holder.stdout.readline()).strip() == b"held"
        cap = ConcurrencyCap(SharedState(tmp_path / "state"), 2, 60)
        with pytest.raises(LimitExceeded):  # the holder is alive: its two leases count
            await cap.acquire(0, Priority.INTERACTIVE)
    finally:
        holder.kill()
        await holder.wait()
    leases = [await cap.acquire(0, Priority.INTERACTIVE) for _ in range(2)]
    assert cap.in_flight() == 2
    for lease in leases:
        cap.release(lease)
    assert cap.in_flight() == 0


def test_a_held_lease_is_renewed_and_an_abandoned_one_expires(tmp_path):
    clock = [1000.0]
    state = SharedState(tmp_path / "state")
    mine = ConcurrencyCap(state, 1, lease_s=10, clock=lambda: clock[0])
    other = ConcurrencyCap(state, 1, lease_s=10, clock=lambda: clock[0])
    lease = mine.try_acquire(Priority.INTERACTIVE)
    assert lease is not None
    for _ in range(5):  # 50 s in use: renewed every 5 s, so it never lapses
        clock[0] += 5
        mine.renew()
        assert other.try_acquire(Priority.INTERACTIVE) is None
    clock[0] += 10.1  # no renewal (a hung process): the slot comes back
    assert other.try_acquire(Priority.INTERACTIVE) is not None


async def test_a_gateway_killed_mid_call_leaves_no_slot_taken(gateway_for, emulator, tmp_path):
    config = config_with(
        tmp_path,
        ("max_concurrent = 16", "max_concurrent = 2"),
        ("max_wait_s = 10.0", "max_wait_s = 1.0"),
    )
    emulator.app[FAULTS_KEY].add(Fault("hang", seconds=3.0, count=2))
    gateway = serving_workers(emulator, config, tmp_path / "cache", workers=1)
    async with gateway as (base, process), aiohttp.ClientSession() as session:
        calls = [
            asyncio.ensure_future(session.get(base + path))
            for path in ("/tiles/olinda/14/6603/8555.png", "/tiles/olinda/14/6604/8555.png")
        ]
        await wait_for_fault_taken(emulator)  # both calls are upstream: both slots leased
        process.kill()
        await process.wait()
        await asyncio.gather(*calls, return_exceptions=True)
    restarted = await gateway_for(emulator, config=config, cache_dir=tmp_path / "cache")
    response = await restarted.get("/tiles/olinda/14/6605/8555.png")
    assert response.status == 200
    assert response.headers["X-Cache"] == "MISS"


# --------------------------------------------------------------------------- damaged stores


async def metric(client, name: str) -> float:
    """The value of the first sample of ``name`` (a full series name) at /metrics; 0 if none."""
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


STORES = {"tiles": "cache", "state": "cache-state", "downloads": "cache-downloads/index"}
"""Each store's directory under the test's tmp_path (the defaults for cache directory
``tmp_path/cache``)."""


def damage(db: Path, how: str) -> None:
    """Write garbage over all of ``db``, or over everything after its first page."""
    if how == "all":
        db.write_bytes(b"this is not an SQLite database; " * 1024)
    else:
        with db.open("r+b") as f:
            f.seek(4096)
            size = max(db.stat().st_size - 4096, 4096 * 4)
            f.write(b"\xa5" * size)


@pytest.mark.parametrize(
    ("store", "how"),
    [("tiles", "all"), ("tiles", "after-page-1"), ("state", "all"), ("downloads", "all")],
)
async def test_a_damaged_store_is_rebuilt_at_start(
    gateway_for, emulator, tmp_path, caplog, store, how
):
    first = await gateway_for(emulator)
    assert (await first.get(OLINDA)).status == 200
    series = f'gateway_store_rebuilds_total{{store="{store}"}}'
    before = await metric(first, series)
    await first.close()
    directory = tmp_path / STORES[store]
    damage(directory / "cache.db", how)
    second = await gateway_for(emulator)  # starts: the damaged store is started afresh
    response = await second.get(OLINDA)
    assert response.status == 200
    assert (await second.get("/readyz")).status == 200
    assert await metric(second, series) == before + 1
    lines = [r for r in caplog.records if "was damaged" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelname == "WARNING"
    assert f"the {store} store" in lines[0].getMessage()
    assert (directory / "cache.db.damaged").is_file()
    assert "Traceback" not in log_text(caplog)


@pytest.mark.parametrize(("path", "where"), [(OLINDA, "file"), (OLINDA_Z14, "row")])
async def test_a_truncated_tile_value_is_a_miss_and_is_replaced(
    gateway_for, emulator, tmp_path, path, where
):
    config = config_with(tmp_path, ("memory_bytes = 268_435_456", "memory_bytes = 0"))
    client = await gateway_for(emulator, config=config)
    assert (await client.get(path)).headers["X-Cache"] == "MISS"
    directory = tmp_path / "cache"
    if where == "file":  # an 82 kB tile: diskcache keeps it in a value file
        (value,) = [p for p in directory.rglob("*.val") if p.stat().st_size > 60_000]
        value.write_bytes(value.read_bytes()[: value.stat().st_size // 2])
    else:  # a 23 kB tile: kept in its database row
        with contextlib.closing(sqlite3.connect(directory / "cache.db")) as db, db:
            changed = db.execute(
                "UPDATE Cache SET value = substr(value, 1, length(value) / 2)"
                " WHERE filename IS NULL AND length(value) > 10000"
            ).rowcount
        assert changed == 1
    before = await metric(client, "gateway_cache_damaged_entries_total")
    again = await client.get(path)
    assert again.status == 200
    assert again.headers["X-Cache"] == "MISS"
    assert await metric(client, "gateway_cache_damaged_entries_total") == before + 1
    assert (await client.get(path)).headers["X-Cache"] == "HIT"  # stored intact again
    assert emulator.renders() == 2
    assert (await client.get("/readyz")).status == 200


class _RenamedTile:
    """Stands in for a tile class that has since moved: pickled as ``gateway.cache.CachedTile``,
    where the first releases kept it."""

    def __init__(self, body: bytes) -> None:
        self.body = body


@pytest.mark.parametrize("old", ["pickled-class", "moved-module"])
async def test_an_entry_in_an_old_format_is_a_miss_and_is_replaced(
    gateway_for, emulator, tmp_path, old, caplog
):
    """Releases before the versioned entry format pickled the tile class into the cache; such
    entries (and ones whose class has moved since) read as a miss, never as an error."""
    config = config_with(tmp_path, ("memory_bytes = 268_435_456", "memory_bytes = 0"))
    client = await gateway_for(emulator, config=config)
    assert (await client.get(OLINDA)).headers["X-Cache"] == "MISS"
    key = tile_key(client, OLINDA)
    with diskcache.Cache(tmp_path / "cache") as disk:
        current = decode_entry(disk.get(key))
        if old == "pickled-class":
            disk.set(key, current)  # the old way: the CachedTile object itself, pickled
        else:
            _RenamedTile.__module__, _RenamedTile.__qualname__ = "gateway.cache", "CachedTile"
            fake = types.ModuleType("gateway.cache")
            fake.CachedTile = _RenamedTile  # type: ignore[attr-defined]
            sys.modules["gateway.cache"] = fake
            try:
                disk.set(key, _RenamedTile(current.body))
            finally:
                del sys.modules["gateway.cache"]
    before = await metric(client, "gateway_cache_damaged_entries_total")
    again = await client.get(OLINDA)
    assert again.status == 200
    assert again.headers["X-Cache"] == "MISS"
    assert await metric(client, "gateway_cache_damaged_entries_total") == before + 1
    assert (await client.get(OLINDA)).headers["X-Cache"] == "HIT"  # stored in the new format
    assert emulator.renders() == 2
    assert "Traceback" not in log_text(caplog)


def test_the_entry_format_round_trips_and_refuses_a_short_body():
    tile = make_tile(b"\x89PNG body", "image/png", 60, fetch_s=0.25)
    entry = encode_entry(tile)
    assert entry.startswith(ENTRY_FORMAT)
    assert decode_entry(entry) == tile
    with pytest.raises(EntryFormatError):
        decode_entry(entry[:-1])
    with pytest.raises(EntryFormatError):
        decode_entry(entry.replace(b" 1\n", b" 2\n", 1))  # a later version


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def tile_disk(small_disk: Callable[[int], Path]) -> Path:
    """A 4 MiB tmpfs (:func:`tests.conftest.small_disk`): a real disk that fills up."""
    return small_disk(4 << 20)


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and text in r.getMessage()
    ]


async def test_a_full_tile_disk_serves_fresh_tiles_uncached(
    gateway_for, emulator, tmp_path, tile_disk, caplog
):
    config = config_with(
        tmp_path,
        ("empty_ttl_s = 300", f'empty_ttl_s = 300\nstate_directory = "{tmp_path / "state"}"'),
        (
            "size_limit_bytes = 10_737_418_240",
            f'size_limit_bytes = 10_737_418_240\ndirectory = "{tmp_path / "downloads"}"',
        ),
    )
    client = await gateway_for(emulator, config=config, cache_dir=tile_disk / "tiles")
    assert (await client.get("/readyz")).status == 200
    filler = fill_disk(tile_disk)

    for path in (OLINDA, OLINDA_Z14):
        fresh = await client.get(path)
        assert fresh.status == 200
        assert fresh.headers["X-Cache"] == "MISS"
        assert (await fresh.read()).startswith(b"\x89PNG")
    ready = await client.get("/readyz")
    assert ready.status == 503
    report = await ready.json()
    assert report["checks"]["cache_writable"] is False
    assert "disk-full" in report["reason"]
    assert "uncached" in report["reason"]
    assert await metric(client, "gateway_cache_writable") == 0
    assert await metric(client, 'gateway_cache_write_failures_total{reason="disk-full"}') >= 2
    assert len(warnings_about(caplog, "the tiles store cannot write (disk-full)")) == 1

    filler.unlink()  # room again: ready, and tiles are stored again
    assert (await client.get("/readyz")).status == 200
    assert await metric(client, "gateway_cache_writable") == 1
    stored = await client.get("/tiles/olinda/14/6604/8556.png")
    assert stored.status == 200
    assert stored.headers["X-Cache"] == "MISS"
    cache = client.server.app[TILE_SERVICE].cache
    assert cache.get(tile_key(client, "/tiles/olinda/14/6604/8556.png"), from_disk=True)
    assert "Traceback" not in log_text(caplog)


async def test_a_full_disk_under_everything_answers_no_500(
    gateway_for, emulator, tile_disk, caplog
):
    client = await gateway_for(emulator, cache_dir=tile_disk / "tiles")  # state, downloads too
    assert (await client.get(OLINDA)).status == 200
    fill_disk(tile_disk)
    hit = await client.get(OLINDA)  # in memory
    assert hit.status == 200
    assert hit.headers["X-Cache"] == "HIT"
    miss = await client.get(OLINDA_Z14)  # the limiter cannot record the call: fail closed
    assert miss.status == 503
    assert int(miss.headers["Retry-After"]) >= 1
    assert (await problem(miss))["type"].endswith("limiter-unavailable")
    ready = await client.get("/readyz")
    assert ready.status == 503
    checks = (await ready.json())["checks"]
    assert checks["cache_writable"] is False
    assert checks["state_writable"] is False
    assert (await client.get("/metrics")).status == 200
    assert "Traceback" not in log_text(caplog)


# --------------------------------------------------------------------------- misses vs hits


async def test_a_miss_leaves_sqlite_and_decoding_off_the_event_loop(gateway, emulator, monkeypatch):
    """What a cache miss does that takes time (SQLite transactions of the tile cache and the
    limiter state, decoding the tile) runs in worker threads: a flood of misses never holds
    the event loop that serves cache hits (timings are bench/miss_flood.py's business). The
    one SQLite statement on the loop is the key lookup (an indexed read, no transaction) of
    a miss that finds no other miss in flight, so that its upstream request is written
    without waiting for the loop's next turn; the misses of a flood skip it."""
    import diskcache
    from PIL import Image

    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    sql = diskcache.Cache._sql
    contains = diskcache.Cache.__contains__
    load = Image.Image.load
    looking_up = threading.local()

    def recording_sql(self):
        if threading.get_ident() == loop_thread and not getattr(looking_up, "key", False):
            on_loop.append("sqlite")
        return sql.fget(self)

    def recording_contains(self, key):
        if threading.get_ident() != loop_thread:
            return contains(self, key)
        on_loop.append("key lookup")
        looking_up.key = True
        try:
            return contains(self, key)
        finally:
            looking_up.key = False

    def recording_load(self):
        if threading.get_ident() == loop_thread:
            on_loop.append("decode")
        return load(self)

    assert (await gateway.get("/readyz")).status == 200  # start-up is done
    monkeypatch.setattr(diskcache.Cache, "_sql", property(recording_sql))
    monkeypatch.setattr(diskcache.Cache, "__contains__", recording_contains)
    monkeypatch.setattr(Image.Image, "load", recording_load)
    for path in (OLINDA, OLINDA_Z14, OLINDA, OLINDA_Z14):  # two misses, then two hits
        assert (await gateway.get(path)).status == 200
    assert emulator.renders() == 2
    assert on_loop == ["key lookup", "key lookup"]
    on_loop.clear()
    service, layer = gateway.app[TILE_SERVICE], gateway.app[LAYERS]["olinda"]
    flood = [TileAddress(layer, 14, x, 8556, 1, "png") for x in range(6603, 6607)]
    results = await asyncio.gather(*(service.get(address) for address in flood))  # at once
    assert [r.cache_status for r in results] == ["MISS"] * 4
    assert emulator.renders() == 6
    assert on_loop == ["key lookup"]  # the first of them, into an idle process
