"""Cache hits answered from the connection's ``data_received`` (issue 15): the requests a
client sends together are answered in the order it sent them, whichever path answers each
(on the spot, aiohttp's request loop, a parse error); an answer on the spot is counted, and
leaves the connection open for more; and the answers of one loop turn go out together,
none to a client that has left (:class:`gateway.http.server.DeferredWrites`)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.http import server
from gateway.http.server import DeferredWrites

TILE = "/tiles/olinda/13/3302/4278.png"
OTHER_TILE = "/tiles/olinda/13/3302/4279.png"


def _get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: gw", *headers, "", ""]
    return "\r\n".join(lines).encode()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer read off ``reader``: status, headers (last of each name), body (by its
    ``Content-Length``)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split(" ", 2)[1]), headers, body


@pytest.fixture
def on_the_spot(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the answers written from ``data_received`` (one entry per answer)."""
    written: list[int] = []
    write = server.DEFERRED_WRITES.write

    def counting(transport: asyncio.BaseTransport, parts: tuple[bytes, ...]) -> None:
        written.append(sum(map(len, parts)))
        write(transport, parts)

    monkeypatch.setattr(server.DEFERRED_WRITES, "write", counting)
    return written


async def test_pipelined_requests_are_answered_in_their_order_whichever_path_answers(
    gateway, on_the_spot
):
    """A hit, a health check, a conditional hit, a miss and a hit, written in one go: the
    hits are answered on the spot, the rest by aiohttp's request loop, and the five
    answers come back in the order of the requests."""
    first = await gateway.get(TILE)
    tile = await first.read()
    etag = first.headers["ETag"]
    on_the_spot.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    try:
        writer.write(
            _get(TILE)
            + _get("/healthz")
            + _get(TILE, f"If-None-Match: {etag}")
            + _get(OTHER_TILE)
            + _get(TILE)
        )
        answers = [await _answer(reader) for _ in range(5)]
    finally:
        writer.close()
    assert [status for status, _, _ in answers] == [200, 200, 304, 200, 200]
    caches = [headers.get("x-cache") for _, headers, _ in answers]
    assert caches == ["HIT", None, "HIT", "MISS", "HIT"]
    assert answers[0][2] == tile
    assert answers[4][2] == tile
    assert json.loads(answers[1][2]) == {"status": "ok"}
    assert answers[2][2] == b""
    assert answers[3][1]["content-type"] == "image/png"
    assert answers[3][2] != tile
    assert len(on_the_spot) >= 1  # the first hit, at least, came from data_received


async def test_hits_answered_on_the_spot_are_counted_and_keep_the_connection(gateway, on_the_spot):
    """Ten hits one after another on one connection are answered on the spot, each
    counted in the route's metrics, and the connection then serves a request of the full
    path (the metrics themselves)."""
    await gateway.get(TILE)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    try:
        writer.write(_get("/metrics"))
        _, _, before = await _answer(reader)
        on_the_spot.clear()
        for _ in range(10):
            writer.write(_get(TILE))
            status, headers, _ = await _answer(reader)
            assert (status, headers["x-cache"]) == (200, "HIT")
        assert len(on_the_spot) == 10
        writer.write(_get("/metrics"))
        status, _, after = await _answer(reader)
    finally:
        writer.close()
    assert status == 200
    sample = 'gateway_http_requests_total{method="GET",route="tile",status="200"} '

    def count(text: bytes) -> float:
        line = next(x for x in text.decode().splitlines() if x.startswith(sample))
        return float(line.removeprefix(sample))

    assert count(after) - count(before) == 10


async def test_a_client_that_pipelines_many_hits_gets_them_all_without_a_flood_of_buffers(
    gateway, on_the_spot
):
    """Enough pipelined hits in one write (one read of the gateway's) for a megabyte of
    answers: at most :data:`~gateway.http.server.INSTANT_BYTES_PER_TURN` (plus one answer)
    is queued on the spot, the rest waits in aiohttp's queue, whose answers wait for the
    client to read each; every answer arrives, in order."""
    first = await gateway.get(TILE)
    tile = await first.read()
    count = (4 * server.INSTANT_BYTES_PER_TURN) // len(tile) + 1
    on_the_spot.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    try:
        writer.write(_get(TILE) * count)
        answers = [await _answer(reader) for _ in range(count)]
    finally:
        writer.close()
    queued = sum(on_the_spot)  # none after the first read: aiohttp's queue was not empty
    assert 0 < queued <= server.INSTANT_BYTES_PER_TURN + len(tile) + 1024
    assert len(on_the_spot) < count
    assert all(status == 200 and body == tile for status, _, body in answers)


async def test_a_request_it_cannot_parse_after_a_hit_gets_its_problem_json_400(gateway):
    """(As in aiohttp, a parse error refuses all of the bytes it came in: the requests
    sent before it in the same write get no answer.)"""
    await gateway.get(TILE)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    try:
        writer.write(_get(TILE))
        hit = await _answer(reader)
        writer.write(b"GET /\x00 HTTP/1.1\r\nHost: gw\r\n\r\n")
        refused = await _answer(reader)
    finally:
        writer.close()
    assert (hit[0], hit[1]["x-cache"]) == (200, "HIT")
    assert refused[0] == 400
    assert refused[1]["content-type"] == "application/problem+json"


class _Connection:
    """A client transport connected to a loopback server, and the server side's reader."""

    async def open(self) -> _Connection:
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        accepted = asyncio.Queue()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put((reader, writer))

        self.listening = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = self.listening.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        self.reader, self._writer = await accepted.get()
        return self

    async def close(self) -> None:
        self.transport.close()
        self._writer.close()
        self.listening.close()
        await self.listening.wait_closed()


async def test_a_turns_answers_go_out_together_and_none_to_a_closed_connection():
    writes = DeferredWrites()
    open_one, closed_one = await _Connection().open(), await _Connection().open()
    writes.write(open_one.transport, (b"first ", b"answer;"))
    writes.write(closed_one.transport, (b"never sent",))
    writes.write(open_one.transport, (b"second",))
    closed_one.transport.close()  # its client left in the same turn
    assert open_one.reader._buffer == b""  # nothing sent before the turn ends
    await asyncio.sleep(0)
    assert await open_one.reader.readexactly(19) == b"first answer;second"
    assert await closed_one.reader.read() == b""
    for connection in (open_one, closed_one):
        await connection.close()


async def test_answers_left_by_a_closed_loop_do_not_stop_the_next_loops():
    """A flush due on a loop that closed before running it (a test's loop, a stopped
    server) does not keep a later loop's answers queued."""
    writes = DeferredWrites()
    stale = await _Connection().open()
    gone = asyncio.new_event_loop()
    gone.close()
    writes._flush_on = gone  # as if a write had been queued there, on ``stale``
    writes._pending.append((stale.transport, (b"for a client of the loop gone",)))
    connection = await _Connection().open()
    writes.write(connection.transport, (b"still sent",))
    assert await asyncio.wait_for(connection.reader.readexactly(10), 5) == b"still sent"
    stale.transport.close()
    assert await stale.reader.read() == b""  # the loop gone took its answers with it
    for one in (stale, connection):
        await one.close()
