"""What the cache-hit path keeps while it does less per request (issue 15): the access log
line is the JSON it always was, log records and timestamps are those of ``logging``, the
redactor sees every secret as it is made, a remembered tile path is still checked per
layer, metric labels stay bounded, and a tile carries each header once."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import REGISTRY

from gateway import metrics
from gateway.http.params import parse_tile
from gateway.http.problem import Problem
from gateway.logs import (
    CLIENT_GONE_KEY,
    CLIENT_KEY,
    UPSTREAM_TIME_KEY,
    GatewayFormatter,
    JsonAccessLogger,
    access_line,
)
from gateway.secrets import REDACTED, Secret, redact

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
    access = JsonAccessLogger(logger, "")
    formatter = GatewayFormatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    first, second = access.record("one"), access.record("two")  # the second is the lean one
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
