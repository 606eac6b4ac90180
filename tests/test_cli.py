"""The command line as a user runs it: ``demo``, ``serve --workers 2``, and config errors."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from tests.conftest import DEFAULT_CONFIG, PLANTED_KEY, Emulator

OLINDA = "/tiles/olinda/13/3302/4278.png"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def running(
    *args: str, env: dict[str, str] | None = None, ready: str = ""
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """Run ``python -m gateway ARGS`` until ``ready`` appears on stdout; stop it on exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while ready:
                line = (await process.stdout.readline()).decode()
                assert line, "exited early:\n" + "".join(lines)
                lines.append(line)
                if ready in line:
                    break
        yield process, lines
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


@asynccontextmanager
async def serving_workers(
    upstream: Emulator, config: Path, cache: Path, workers: int = 2
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """``geopera-gateway serve --workers N`` in front of ``upstream``, healthy; yields its
    base URL and process."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "GEOPERA_BASE_URL": upstream.url,
        "GEOPERA_API_KEY": PLANTED_KEY,
        "GEOPERA_CACHE_DIR": str(cache),
    }
    args = ("serve", "--config", str(config), "--port", str(port), "--workers", str(workers))
    async with running(*args, env=env) as (process, _):
        await wait_healthy(base)
        yield base, process


async def wait_healthy(base: str) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(60):
        while True:
            try:
                async with session.get(base + "/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)


async def test_demo_prints_urls_that_serve_real_tiles(tmp_path):
    port = free_port()
    env = {"GEOPERA_CACHE_DIR": str(tmp_path / "cache")}
    async with running("demo", "--port", str(port), env=env, ready="Ctrl+C") as (process, lines):
        output = "".join(lines)
        samples = [line.split()[-1] for line in lines if "sample tile:" in line]
        assert len(samples) == 4, output
        assert f"http://127.0.0.1:{port}/tiles/olinda/{{z}}/{{x}}/{{y}}.png" in output
        assert "demo token (tiles, downloads, admin" in output
        async with aiohttp.ClientSession() as session:
            for url in samples:
                async with session.get(url) as response:
                    assert response.status == 200, url
                    assert response.headers["Content-Type"] == "image/png"
                    assert len(await response.read()) > 1000
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 20) == 0


async def test_serve_with_two_workers_shares_one_cache(emulator, tmp_path):
    async with serving_workers(emulator, DEFAULT_CONFIG, tmp_path / "cache") as (base, process):
        statuses = []
        for _ in range(20):  # a new connection each time, so the kernel spreads them
            async with aiohttp.ClientSession() as session, session.get(base + OLINDA) as r:
                statuses.append((r.status, r.headers["X-Cache"]))
                assert PLANTED_KEY.encode() not in await r.read()
        assert statuses[0] == (200, "MISS")
        assert set(statuses[1:]) == {(200, "HIT")}
        assert emulator.renders() == 1
        process.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(process.stdout.read(), 20)).decode()
        assert await asyncio.wait_for(process.wait(), 20) == 0, output
        assert PLANTED_KEY not in output


async def test_config_error_exits_2_with_a_clear_message(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(tmp_path / "missing.toml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "missing.toml: file not found" in stderr.decode()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOPERA_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(DEFAULT_CONFIG),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "export GEOPERA_API_KEY" in stderr.decode()


async def test_two_workers_fetch_a_cold_tile_once(start_upstream, tmp_path):
    slow = await start_upstream(delay_ms=300)
    async with serving_workers(slow, DEFAULT_CONFIG, tmp_path / "cache") as (base, _):

        async def fetch() -> tuple[int, str]:
            connector = aiohttp.TCPConnector(force_close=True)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(base + OLINDA) as response,
            ):
                await response.read()
                return response.status, response.headers["X-Cache"]

        results = await asyncio.gather(*(fetch() for _ in range(60)))
    assert {status for status, _ in results} == {200}
    assert [cache for _, cache in results].count("MISS") == 1
    assert slow.renders() == 1  # the other worker waited on the first one's claim


async def test_token_create_prints_the_token_once_and_toml_to_append(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "token",
        "create",
        "qgis-team",
        "--scopes",
        "tiles,downloads",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    token = next(w for w in err.decode().split() if w.startswith("ggw_"))
    assert token not in out.decode()  # the TOML holds the hash only
    config = tmp_path / "gateway.toml"
    config.write_text(DEFAULT_CONFIG.read_text() + out.decode())
    from gateway.auth import token_digest
    from gateway.config import load_settings

    settings = load_settings(config, environ={"GEOPERA_API_KEY": "gpra_x12345678"})
    (configured,) = settings.tokens
    assert configured.name == "qgis-team" and configured.sha256 == token_digest(token)
    assert configured.scopes == {"tiles", "downloads"}


def test_token_create_with_projects_limits_the_token(tmp_path, capsys):
    from gateway.cli import main
    from gateway.config import load_settings

    assert main(["token", "create", "survey-team", "--scopes", "downloads",
                 "--projects", "survey, demo"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert 'projects = ["demo", "survey"]' in out
    config = tmp_path / "gateway.toml"
    config.write_text(DEFAULT_CONFIG.read_text() + out)
    (token,) = load_settings(config, environ={"GEOPERA_API_KEY": "gpra_x12345678"}).tokens
    assert token.projects == {"demo", "survey"}
    assert main(["token", "create", "x", "--scopes", "downloads", "--projects", " , "]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
