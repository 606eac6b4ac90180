"""Requests aiohttp's parser refuses, sent as raw bytes to the gateway's own HTTP server.

aiohttp quotes the raw request line or header in its log and in its answer; a token in the
URL or in ``Authorization`` must appear in neither.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.cli.serve import bound_port, listen
from gateway.logs import access_log_options
from tests.conftest import TOKENS

TOKEN = TOKENS["all"]
TILE = "/tiles/olinda/13/3302/4278.png"


def request(target: str = TILE, *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


CASES = {
    "space in ?token=": request(f"{TILE}?token={TOKEN} x"),
    "tab in ?token=": request(f"{TILE}?token={TOKEN}\tx"),
    "NUL in ?token=": request(f"{TILE}?token={TOKEN}\x00x"),
    "DEL in ?token=": request(f"{TILE}?token={TOKEN}\x7fx"),
    "request line over 8 KB": request(f"{TILE}?token={TOKEN}&pad={'a' * 9000}"),
    "NUL in Authorization": request(TILE, f"Authorization: Bearer {TOKEN}\x00x"),
    "obs-fold in Authorization": request(TILE, "Authorization: Bearer", f" {TOKEN}"),
    "Authorization over 8 KB": request(TILE, f"Authorization: Bearer {TOKEN}{'a' * 9000}"),
}


@pytest.fixture
async def port(settings_for, emulator):
    """The gateway app served as ``serve`` serves it (``web.AppRunner`` on a bound socket)."""
    runner = web.AppRunner(create_app(settings_for(emulator)), **access_log_options(True))
    await runner.setup()
    sockets = listen("127.0.0.1", 0)
    for sock in sockets:
        await web.SockSite(runner, sock).start()
    yield bound_port(sockets)
    await runner.cleanup()


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()  # the gateway closes the connection after a 400
    finally:
        writer.close()


@pytest.mark.parametrize("case", CASES)
async def test_unparsable_request_is_a_problem_and_the_token_is_never_logged(port, case, caplog):
    caplog.set_level(logging.DEBUG)
    answer = await exchange(port, CASES[case])
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert status_line.split(" ")[1] == "400", answer[:300]
    assert headers["content-type"] == "application/problem+json"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["server"].startswith("geopera-gateway/")
    assert TOKEN.encode() not in answer
    problem = json.loads(body)
    assert problem["status"] == 400
    assert problem["type"].startswith("https://")
    records = caplog.get_records("call")
    for record in records:
        text = record.getMessage() + (record.exc_text or "")
        assert TOKEN not in text, f"{record.name}: {text[:200]}"
        assert record.levelno < logging.ERROR, f"{record.name}: {text[:200]}"
    assert any(r.name == "gateway.http" and "not valid HTTP" in r.getMessage() for r in records)
