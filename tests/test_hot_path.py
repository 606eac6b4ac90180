"""What the cache-hit path keeps while it does less per request (issue 15): the access log
line is the JSON it always was, log records and timestamps are those of ``logging``, the
redactor sees every secret as it is made, a remembered tile path is still checked per
layer, metric labels stay bounded, and a tile carries each header once."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import io
import json
import logging
import logging.handlers
import re
import sys
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import REGISTRY

from gateway import metrics
from gateway.app import create_app
from gateway.http import answers as answers_module
from gateway.http import hits
from gateway.http.answers import ReadyHeads, ReadyResponse
from gateway.http.hits import tile_route
from gateway.http.keys import LAYERS
from gateway.http.params import parse_tile
from gateway.http.problem import Problem
from gateway.logs import (
    CLIENT_GONE_KEY,
    CLIENT_KEY,
    FORMAT,
    UPSTREAM_TIME_KEY,
    AccessFields,
    AccessLines,
    GatewayFormatter,
    access_line,
    access_log_options,
    access_text,
    gateway_handler,
)
from gateway.secrets import REDACTED, Secret, redact
from gateway.services.tiles import TileResult
from gateway.storage.tiles import TileCache, make_tile
from tests.conftest import PRIVATE_LAYER, TOKENS, config_with

TILE = "/tiles/olinda/13/3302/4278.png"


def _old_line(request: web.BaseRequest, response: web.StreamResponse, seconds: float) -> str:
    """The access line as ``json.dumps`` wrote it before issue 15."""
    record = {
        "remote": request.get(CLIENT_KEY) or request.remote,
        "method": request.method,
        "path": request.path[:512],
        "status": 499 if request.get(CLIENT_GONE_KEY) else response.status,
        "bytes": response.body_length,
        "duration_ms": round(seconds * 1000, 2),
    }
    cache = response.headers.get("X-Cache")
    if cache:
        record["cache"] = cache
    upstream = request.get(UPSTREAM_TIME_KEY)
    if upstream is not None:
        record["upstream_ms"] = round(upstream * 1000, 2)
    return json.dumps(record, separators=(",", ":"))


@pytest.mark.parametrize(
    ("path", "state", "headers", "seconds"),
    [
        ("/tiles/olinda/13/3302/4278.png", {}, {"X-Cache": "HIT"}, 0.000351),
        ("/t/%22quoted%22/back%5Cslash/%C3%A9t%C3%A9/\u2603", {}, {}, 12.3456789),
        ("/tiles/x/" + "a" * 600, {CLIENT_GONE_KEY: True}, {"X-Cache": "MISS"}, 1e-7),
        ("/tiles/y.png", {CLIENT_KEY: "203.0.113.9", UPSTREAM_TIME_KEY: 0.0501}, {}, 3.0),
    ],
)
def test_the_access_line_is_the_json_it_always_was(path, state, headers, seconds):
    request = make_mocked_request("GET", path)
    for key, value in state.items():
        request[key] = value
    response = web.Response(status=200, headers=headers)
    line = access_line(request, response, seconds)
    assert line == _old_line(request, response, seconds)
    assert json.loads(line)["path"] == request.path[:512]


def test_a_lean_access_record_formats_as_a_logging_one():
    logger = logging.getLogger("gateway.access")
    lines = AccessLines()
    formatter = GatewayFormatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    first = lines.record(logger, "one", time.time())
    second = lines.record(logger, "two", time.time())  # the lean one
    standard = logger.makeRecord(logger.name, logging.INFO, "", 0, "two", (), None)  # as info()
    lean, made = vars(second), vars(standard)
    assert lean.keys() == made.keys()
    varying = {"msg", "created", "msecs", "relativeCreated"}
    assert {k: v for k, v in lean.items() if k not in varying} == {
        k: v for k, v in made.items() if k not in varying
    }
    assert abs(second.created - standard.created) < 5
    assert second.msecs == int((second.created % 1) * 1000)
    assert formatter.format(first).endswith(f" INFO gateway.access [{first.process}] one")


def test_the_timestamp_is_loggings_own():
    mine, standard = GatewayFormatter("%(asctime)s"), logging.Formatter("%(asctime)s")
    for created in (1_800_000_000.0, 1_800_000_000.999, 1_800_000_001.5, 1_799_999_999.25):
        record = logging.makeLogRecord({"msg": "x"})
        record.created, record.msecs = created, int((created % 1) * 1000) + 0.0
        assert mine.format(record) == standard.format(record)


def test_a_new_secret_is_redacted_at_once_and_a_dead_one_is_forgotten():
    value = "gpra_hot_path_secret_0123456789"
    assert redact(f"key={value}") == f"key={value}"  # primes the cached forms
    secret = Secret(value)
    assert redact(f"key={value}") == f"key={REDACTED}"
    del secret
    gc.collect()
    assert redact(f"key={value}") == f"key={value}"


def test_a_remembered_tile_path_is_still_checked_against_its_layer(settings_for, emulator):
    layer = settings_for(emulator).layers["olinda"]
    first = parse_tile(layer, "13", "3302", "4278.png")
    assert parse_tile(layer, "13", "3302", "4278.png") is first
    assert first.key == layer.cache_key(13, 3302, 4278, 1, "png")
    narrower = dataclasses.replace(layer, maxzoom=12)  # same name, another config
    with pytest.raises(Problem) as refused:
        parse_tile(narrower, "13", "3302", "4278.png")
    assert refused.value.status == 400


def test_route_metrics_are_bound_before_the_first_request_and_stay_bounded():
    observe = metrics.route_observer("hot-path-test")
    labels = {"route": "hot-path-test", "method": "GET", "status": "200"}
    assert REGISTRY.get_sample_value("gateway_http_requests_total", labels) == 0.0
    observe("GET", 200, 0.001)
    assert REGISTRY.get_sample_value("gateway_http_requests_total", labels) == 1.0
    for method in ("BREW", "WHEN", "PROPFIND"):
        observe(method, 405, 0.001)
    other = {"route": "hot-path-test", "method": "other", "status": "405"}
    assert REGISTRY.get_sample_value("gateway_http_requests_total", other) == 3.0
    assert len(observe._counts) <= len(observe.PREBOUND) + 4  # one "other", not one per method


async def test_a_turns_counts_are_added_at_its_end_or_by_a_scrape():
    counter = metrics.HTTP_REQUESTS.labels("turn-counts-test", "GET", "200")
    labels = {"route": "turn-counts-test", "method": "GET", "status": "200"}

    def value() -> float | None:
        return REGISTRY.get_sample_value("gateway_http_requests_total", labels)

    for _ in range(3):
        metrics.TURN_COUNTS.inc(counter)
    assert value() == 0.0  # pending in this turn
    await asyncio.sleep(0)
    assert value() == 3.0  # added once the turn's callbacks ran
    metrics.TURN_COUNTS.inc(counter, 2)
    state = metrics.StateCollector(lambda: 0, list, lambda: None)
    body, _ = metrics.render(state)  # a scrape in the same turn sees the pending 2
    assert b'route="turn-counts-test",status="200"} 5.0' in body


def test_counts_left_by_a_stopped_loop_are_added_not_dropped():
    counter = metrics.HTTP_REQUESTS.labels("turn-counts-stopped", "GET", "200")
    labels = {"route": "turn-counts-stopped", "method": "GET", "status": "200"}

    def value() -> float | None:
        return REGISTRY.get_sample_value("gateway_http_requests_total", labels)

    loop = asyncio.new_event_loop()
    # the count's turn is the loop's last: the flush it schedules would run in the next one
    loop.call_soon(metrics.TURN_COUNTS.inc, counter)
    loop.call_soon(loop.stop)
    loop.run_forever()
    loop.close()
    assert value() == 0.0  # left pending by the stopped loop
    metrics.TURN_COUNTS.inc(counter)  # no loop now: added at once, with what was left
    assert value() == 2.0


async def test_a_tile_hit_carries_each_header_once(gateway):
    await gateway.get(TILE)
    hit = await gateway.get(TILE)
    assert hit.headers["X-Cache"] == "HIT"
    for name in ("ETag", "Content-Type", "Cache-Control", "X-Cache", "Server"):
        assert len(hit.headers.getall(name)) == 1, name
    assert hit.headers.getall("X-Content-Type-Options") == ["nosniff"]
    assert hit.headers["Cache-Control"].startswith("public, max-age=")
    again = await gateway.get(TILE, headers={"If-None-Match": hit.headers["ETag"]})
    assert again.status == 304
    assert again.headers["ETag"] == hit.headers["ETag"]
    assert "Content-Type" not in again.headers


FAST_PATH_SAMPLES = (
    ("gateway_http_requests_total", {"route": "tile", "method": "GET", "status": "200"}),
    ("gateway_http_requests_total", {"route": "tile", "method": "GET", "status": "304"}),
    ("gateway_http_requests_total", {"route": "tile", "method": "GET", "status": "429"}),
    ("gateway_cache_lookups_total", {"result": "hit"}),
    ("gateway_upstream_calls_saved_total", {}),
    ("gateway_upstream_saved_bytes_total", {"operation": "cog.tile.render"}),
    ("gateway_client_rate_limited_total", {}),
)


VARYING = ("Date", "Retry-After", "RateLimit-Remaining", "RateLimit-Reset")
"""Headers whose values depend on when a request came (both apps send them all)."""


def _samples() -> list[float]:
    return [REGISTRY.get_sample_value(name, labels) or 0.0 for name, labels in FAST_PATH_SAMPLES]


def test_the_fast_path_takes_only_what_the_router_gives_the_tile_routes(settings_for, emulator):
    app = create_app(settings_for(emulator))
    layers, default = app[LAYERS], app[LAYERS]["olinda"]
    paths = [
        TILE,
        "/tiles/13/3302/4278.png",
        "/tiles/olinda/13/3302/4278@2x.png",
        "/tiles/olinda/13/3302/4278.webp",
        "/tiles/olinda/x/y/z",
        "/tiles/olinda/13/3302/",
        "/tiles/olinda//3302/4278.png",
        "/tiles/nosuch/13/3302/4278.png",
        "/tiles/olinda/tilejson.json",
        "/tiles/clips/0f8fad5b-d9cb-469f-a165-70867728950e/visual/tilejson.json",
        "/tiles/clips/0f8fad5b-d9cb-469f-a165-70867728950e/visual/13/1/2.png",
        "/tiles/olinda/../olinda/13/3302/4278.png",
        "/tiles/./13/3302/4278.png",
        "/tiles/olinda/13/3302/4278.png?token=x",
        "/tiles/olinda/13/3302/4278.png?token=x&token=y",
        "/tiles/olinda/13/3302/4278.png?token=x&other=1",
        "/tiles/olinda/13/3302/4278.png?other=1",
        "/tiles/olinda/13/3302/4278.png?token=",
        "/tiles/olinda/13/3302/4278.png?token=a+b",
        "/tiles/olinda/13/3302/4278.png?tok%65n=x",
        "/tiles/olinda/13/3302/4278.png?",
        "/tiles/olin%64a/13/3302/4278.png",
        "/tiles/olinda/13/3302/4278.png/extra",
        "/tiles/" + "9" * 2000,
        "/tilesx/13/3302/4278.png",
    ]
    taken = 0
    for raw in paths:
        route = tile_route(raw, layers, default)
        if route is None:
            continue
        taken += 1
        name, layer, z, x, tail = route
        match = asyncio.run(app.router.resolve(make_mocked_request("GET", raw, app=app)))
        assert match.route.name == name, raw
        assert (match.get("layer", layer.name), match["z"], match["x"], match["tail"]) == (
            layer.name,
            z,
            x,
            tail,
        ), raw
    assert taken == 6  # the ?token= one among them
    assert tile_route(TILE, layers, None) is not None
    assert tile_route("/tiles/13/3302/4278.png", layers, None) is None  # no default layer


@pytest.mark.parametrize(
    ("rate", "tile"),
    [
        ("off", TILE),
        ("200/second", TILE),
        ("3/minute", TILE),
        ("200/second", f"/tiles/olinda-private/13/3302/4278.png?token={TOKENS['tiles']}"),
    ],
)
async def test_a_fast_path_answer_is_the_full_paths_answer(
    aiohttp_server, aiohttp_client, settings_for, emulator, tmp_path, clock, caplog, rate, tile
):
    """The same requests to two apps on one cache, one without the fast path: the same
    statuses, headers, bodies, access lines and metrics; only the first never routes."""
    config = config_with(
        tmp_path, ('rate_limit = "200/second"', f'rate_limit = "{rate}"'), append=PRIVATE_LAYER
    )
    settings = settings_for(emulator, config=config)
    limited = rate == "3/minute"
    fast, full = create_app(settings, clock=clock), create_app(settings, clock=clock)
    hits.uninstall(full)  # the app's own handler: router and middleware for every request
    caplog.set_level(logging.INFO, logger="gateway.access")  # before any connection opens
    routed = []
    resolve = fast.router.resolve

    async def counting(request: web.Request) -> web.UrlMappingMatchInfo:
        routed.append(request.path)
        return await resolve(request)

    fast.router.resolve = counting  # type: ignore[method-assign]
    servers = [await aiohttp_server(app, **access_log_options(True)) for app in (fast, full)]
    clients = [await aiohttp_client(server) for server in servers]
    for client in clients:  # warm both: the second app reads the first one's disk entry
        etag = (await client.get(tile)).headers["ETag"]
    routed.clear()
    requests = [{}, {"If-None-Match": etag}, {}] if limited else [{}, {"If-None-Match": etag}]
    answers: list[list[tuple[object, ...]]] = [[], []]
    for headers in requests:
        for client, answer in zip(clients, answers, strict=True):
            before = _samples()
            caplog.clear()
            response = await client.get(tile, headers=headers)
            body = await response.read()
            access: list[logging.LogRecord] = []
            for _ in range(100):  # the line is written at the loop turn after the answer
                access = [r for r in caplog.records if r.name == "gateway.access"]
                if access:
                    break
                await asyncio.sleep(0)
            delta = [after - was for after, was in zip(_samples(), before, strict=True)]
            sent = {k: v for k, v in response.headers.items() if k not in VARYING}
            line = json.loads(access[-1].getMessage())
            line.pop("duration_ms")
            line.pop("remote")  # the test servers' ports differ
            if response.status == 429:  # "retry after N s": N depends on when it came
                body = re.sub(rb"retry after \d+ s", b"retry after N s", body)
                del sent["Content-Length"], line["bytes"]  # N may have one digit more
            answer.append((response.status, sent, body, line, delta))
    assert answers[0] == answers[1]
    statuses = [a[0] for a in answers[0]]
    assert statuses == ([200, 304, 429] if limited else [200, 304])
    assert all(("RateLimit-Policy" in a[1]) == (rate != "off") for a in answers[0])
    assert routed == []  # the fast path answered every one of them, the 429 too


def _tiles(cache: TileCache, keys: list[str]) -> None:
    for key in keys:
        cache.set(key, make_tile(key.encode().ljust(1000, b"."), "image/png", 3600), 3600)


def test_a_pass_over_new_tiles_leaves_the_tiles_asked_for_again_in_memory(tmp_path):
    cache = TileCache(tmp_path / "tiles", 1 << 30, memory_bytes=100_000)  # 100 tiles of 1 kB
    try:
        hot = [f"tile/t/hot/{i}" for i in range(50)]
        _tiles(cache, hot)
        assert all(cache.get_memory(key) is not None for key in hot)  # their second use
        scan = [f"tile/t/scan/{i}" for i in range(500)]  # each asked for once: a crawler
        _tiles(cache, scan)
        assert all(cache.get_memory(key) is not None for key in hot)
        held = [key for key in scan if cache.get_memory(key) is not None]
        assert held == scan[-len(held) :]
        assert len(held) <= 50
        memory = cache._memory
        assert memory is not None
        assert memory.size <= 100_000
        assert memory.size == 1000 * len(memory.key_list())
    finally:
        cache.close()


def test_a_cycle_over_more_tiles_than_fit_is_still_served_from_memory(tmp_path):
    """A map client cycling over 150 tiles with room for 100: a plain LRU evicts each tile
    just before it comes round again and serves every one from disk."""
    cache = TileCache(tmp_path / "tiles", 1 << 30, memory_bytes=100_000)
    try:
        keys = [f"tile/t/{i}" for i in range(150)]
        _tiles(cache, keys)
        for _ in range(3):
            hits = 0
            for key in keys:
                if cache.get_memory(key) is not None:
                    hits += 1
                else:
                    assert cache.get(key, from_disk=True) is not None  # read, and held again
        assert hits >= 70  # the protected share (80 tiles), give or take the round's start
        memory = cache._memory
        assert memory is not None
        assert memory.size <= 100_000
        cache.purge("t")
        assert memory.key_list() == []
        assert memory.size == memory.protected_size == 0
    finally:
        cache.close()


def test_the_standard_format_is_loggings_own():
    standard = logging.Formatter(FORMAT)
    mine = GatewayFormatter(FORMAT)
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.makeLogRecord({"msg": "failed %s", "args": ("x",), "exc_info": True})
        failed.exc_info = sys.exc_info()
    for record in (
        logging.makeLogRecord({"msg": "plain é ☃", "levelname": "INFO", "name": "gateway.access"}),
        logging.makeLogRecord({"msg": "%d tiles", "args": (3,), "levelname": "WARNING"}),
        failed,
    ):
        record.created, record.msecs = 1_800_000_000.25, 250.0
        assert mine.format(record) == standard.format(record)


async def _raw_answers(port: int, requests: list[bytes]) -> list[bytes]:
    """Send ``requests`` one after another on one connection; each answer's bytes (head and
    body), read by its ``Content-Length``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for request in requests:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            answers.append(head + await reader.readexactly(length))
    finally:
        writer.close()
    return answers


@pytest.mark.parametrize("rate", ["off", "200/second"])
async def test_a_ready_header_block_is_the_bytes_aiohttp_would_send(
    aiohttp_server, settings_for, emulator, tmp_path, clock, monkeypatch, rate
):
    """A tile's header block made beforehand is byte for byte, in the same order, what
    aiohttp's own response sends (but the time-dependent values), for 200 and 304, with
    and without caller limits, on the fast path and on the full path (the router, the
    middleware, the caller limit's headers); HTTP/1.0 and ``Connection: close`` requests get
    aiohttp's response. Three apps on one cache: the fast path, the full path, and the full
    path with aiohttp's responses only."""
    config = config_with(tmp_path, ('rate_limit = "200/second"', f'rate_limit = "{rate}"'))
    settings = settings_for(emulator, config=config)
    fast, full, plain = (create_app(settings, clock=clock) for _ in range(3))
    hits.uninstall(full)
    hits.uninstall(plain)

    class Counting:
        """The ready header blocks, counting their answers; none while ``off``."""

        def __init__(self, heads: ReadyHeads) -> None:
            self.heads, self.served, self.off = heads, 0, False

        def response(self, *args: Any) -> ReadyResponse | None:
            if self.off:
                return None
            self.served += 1
            return self.heads.response(*args)

        def head(self, *args: Any) -> tuple[bytes, int] | None:
            return None if self.off else self.heads.head(*args)

        def answer(self, *args: Any) -> ReadyResponse:
            self.served += 1
            return self.heads.answer(*args)

    heads = Counting(answers_module.READY_HEADS)
    monkeypatch.setattr(answers_module, "READY_HEADS", heads)
    servers = [await aiohttp_server(app) for app in (fast, full, plain)]
    get = f"GET {TILE} HTTP/1.1\r\nHost: gw\r\n".encode()
    warm = await _raw_answers(servers[0].port, [get + b"\r\n", get + b"\r\n"])
    etag = next(line for line in warm[1].split(b"\r\n") if line.startswith(b"ETag: "))[6:]
    requests = [
        get + b"\r\n",
        get + b"If-None-Match: " + etag + b"\r\n\r\n",
        get + b"If-None-Match: W/" + etag + b', "other"\r\n\r\n',
        get + b"Connection: close\r\n\r\n",
    ]
    answers, served = [], []
    for server in servers:
        heads.off, heads.served = server is servers[2], 0  # the third: aiohttp's answers only
        sent = await _raw_answers(server.port, requests)
        sent += await _raw_answers(server.port, [f"GET {TILE} HTTP/1.0\r\n\r\n".encode()])
        answers.append([_steady(a) for a in sent])
        served.append(heads.served)
    for ready in answers[:2]:
        for one, other in zip(ready, answers[2], strict=True):
            assert one.partition(b"\r\n\r\n")[0] == other.partition(b"\r\n\r\n")[0]
        assert ready == answers[2]
    statuses = [a.split(b" ", 2)[1] for a in answers[0]]
    assert statuses == [b"200", b"304", b"304", b"200", b"200"]
    assert b"X-Cache: HIT\r\n" in answers[0][0]
    assert b"\r\nConnection: close\r\n" in answers[0][3]
    assert served == [3, 3, 0]  # the 200 and the two 304 of the fast and the full path


_VARYING_LINES = tuple(name.encode() + b": " for name in VARYING)


def _steady(answer: bytes) -> bytes:
    """``answer`` without the header lines whose values depend on when it was sent."""
    head, _, body = answer.partition(b"\r\n\r\n")
    kept = [line for line in head.split(b"\r\n") if not line.startswith(_VARYING_LINES)]
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def test_a_ready_header_block_never_carries_a_line_break():
    """A header value with a line break (header injection) gets no ready block: the fast
    path then answers through aiohttp's response, whose serialiser refuses it."""
    heads = ReadyHeads()
    good = make_tile(b"png", "image/png", 60, now=1000.0)
    bad = make_tile(b"png", "image/png\r\nSet-Cookie: x=1", 60, now=1000.0)
    answer = heads.response(TileResult(good, "HIT"), False, 60, False)
    assert answer is not None
    assert answer.status == 200
    assert heads.response(TileResult(bad, "HIT"), False, 60, False) is None


class _CountingStream(io.StringIO):
    """A text stream that counts its writes."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_access_lines_are_written_once_a_loop_turn_as_their_records_would_be(
    monkeypatch,
):
    """With the gateway's stderr handler as the only one, a turn's access lines go out in one
    write at the start of the next turn: the text the records would have made (timestamp,
    level, logger, process, JSON line), secrets redacted. With another handler too, each line
    is a record again."""
    secret = Secret("gpra_" + "q" * 32)
    stream = _CountingStream()
    handler = gateway_handler(stream)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    logger = logging.getLogger("gateway.access")
    lines = AccessLines()
    now = time.time()
    entries = [
        ("203.0.113.9", "GET", TILE, 200, 20480, 0.0012, "HIT", None, now),
        ("::1", "GET", f"/tiles/{secret.reveal()}/x", 404, 120, 0.0003, None, 0.05, now + 0.5),
    ]
    for fields in entries:
        lines.add(logger, fields)
    assert stream.getvalue() == ""  # waits for the next loop turn
    await asyncio.sleep(0)
    assert stream.writes == 1
    expected = [
        handler.format(lines.record(logger, access_text(fields), fields[-1])) for fields in entries
    ]
    assert stream.getvalue().splitlines() == [redact(line) for line in expected]
    assert secret.reveal() not in stream.getvalue()
    assert REDACTED in stream.getvalue().splitlines()[1]
    other = logging.handlers.BufferingHandler(10)
    monkeypatch.setattr(root, "handlers", [handler, other])
    lines.add(logger, entries[0])
    await asyncio.sleep(0)
    assert [r.getMessage() for r in other.buffer] == [access_text(entries[0])]
    assert stream.writes == 2  # the record went through the handler on its own


def test_access_lines_left_by_a_closed_loop_go_out_with_the_next_ones(monkeypatch):
    """A line queued on an event loop that closed before its turn came (a test's loop, a
    stopped server) is written with the next loop's first batch, not held for ever."""
    stream = _CountingStream()
    handler = gateway_handler(stream)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    logger = logging.getLogger("gateway.access")
    lines = AccessLines()
    entries = [("::1", "GET", f"/{n}", 200, 1, 0.001, None, None, time.time()) for n in "ab"]

    async def add_then_stop(fields: AccessFields) -> None:
        asyncio.get_running_loop().stop()  # this turn is the loop's last
        lines.add(logger, fields)

    async def add(fields: AccessFields) -> None:
        lines.add(logger, fields)
        await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(add_then_stop(entries[0]))
    loop.close()
    assert stream.getvalue() == ""  # its flush never ran
    asyncio.run(add(entries[1]))
    paths = [json.loads(line.split(" ", 5)[5])["path"] for line in stream.getvalue().splitlines()]
    assert paths == ["/a", "/b"]
    assert stream.writes == 1
