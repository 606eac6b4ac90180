"""``geopera-gateway serve`` as a process under abuse: SIGTERM in the middle of a download,
and slowloris connections that never finish their request head."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from tests.conftest import TOKENS, config_with
from tests.test_cli import serving_workers
from tests.test_download_faults import wait_completed
from tests.test_downloads import create_job

BEARER = {"Authorization": f"Bearer {TOKENS['downloads']}"}


async def test_sigterm_during_a_download_stops_at_once_and_cuts_the_client(
    start_upstream, tmp_path
):
    upstream = await start_upstream(clip_delay_s=0.05)
    # 2 MB/s of upstream egress: a 100 MB transfer would take nearly a minute
    config = config_with(tmp_path, ("bytes_per_s = 25_000_000", "bytes_per_s = 2_000_000"))
    async with (
        serving_workers(upstream, config, tmp_path / "cache", workers=1) as (base, process),
        aiohttp.ClientSession(headers=BEARER) as session,
    ):
        job_id = await create_job(upstream, "synthetic-100000000")
        await wait_completed(session, f"{base}/downloads/{job_id}")
        response = await session.get(f"{base}/downloads/{job_id}/data")
        assert response.status == 200
        await response.content.readexactly(1 << 20)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        received = 1 << 20
        try:
            async for chunk in response.content.iter_chunked(1 << 16):
                received += len(chunk)
        except aiohttp.ClientPayloadError:
            pass  # cut short: the client resumes with Range
        assert received < 100_000_000
        assert await asyncio.wait_for(process.wait(), 30) == 0
        stopped = time.monotonic() - started
    assert stopped < 8, f"SIGTERM took {stopped:.1f} s"
    assert list((tmp_path / "cache-downloads" / "tmp").iterdir()) == []


async def test_slowloris_connections_are_closed_after_the_header_timeout(emulator, tmp_path):
    config = config_with(tmp_path, ("[server]\n", "[server]\nheader_timeout_s = 1.0\n"))
    async with serving_workers(emulator, config, tmp_path / "cache", workers=1) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
        started = time.monotonic()
        for _, writer in connections:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        # trickle a header byte now and then, as slowloris does, until the server hangs up
        closed_after = []
        async with asyncio.timeout(10):
            for reader, writer in connections:
                while await _still_open(reader, writer):
                    pass
                closed_after.append(time.monotonic() - started)
                writer.close()
        assert max(closed_after) < 3  # 1 s plus scheduling, not minutes
        # the server still answers a real client at once
        async with aiohttp.ClientSession() as session, session.get(base + "/healthz") as r:
            assert r.status == 200


async def _still_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Send one more header byte and listen for 0.2 s; False once the server has closed."""
    try:
        writer.write(b"X")
        await writer.drain()
        return await asyncio.wait_for(reader.read(1024), 0.2) != b""
    except TimeoutError:
        return True
    except ConnectionError:
        return False
