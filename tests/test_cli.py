"""The command line as a user runs it: ``demo``, ``serve --workers 2``, and config errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from tests.clients import needs_gdal
from tests.conftest import DEFAULT_CONFIG, PLANTED_KEY, Emulator

README = Path(__file__).resolve().parent.parent / "README.md"

OLINDA = "/tiles/olinda/13/3302/4278.png"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def running(
    *args: str,
    env: dict[str, str] | None = None,
    ready: str = "",
    program: tuple[str, ...] = (sys.executable, "-m", "gateway"),
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """Run ``python -m gateway ARGS`` (or ``program ARGS``) until ``ready`` appears in its
    output (stdout and stderr); stop it on exit."""
    process = await asyncio.create_subprocess_exec(
        *program,
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
    from gateway.config.settings import load_settings
    from gateway.http.auth import token_digest

    settings = load_settings(config, environ={"GEOPERA_API_KEY": "gpra_x12345678"})
    (configured,) = settings.tokens
    assert configured.name == "qgis-team"
    assert configured.sha256 == token_digest(token)
    assert configured.scopes == {"tiles", "downloads"}


async def serve_exit(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``python -m gateway serve ARGS`` expecting it to stop by itself within 30 s;
    returns its exit code, stdout and stderr. If it does not, it and its workers (one
    process group) are killed and the test fails."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.communicate()
        raise AssertionError("serve kept running") from None
    return process.returncode, out.decode(), err.decode()


async def test_serve_on_a_port_in_use_is_one_line_and_exit_2(emulator, tmp_path):
    env = {
        "GEOPERA_BASE_URL": emulator.url,
        "GEOPERA_API_KEY": PLANTED_KEY,
        "GEOPERA_CACHE_DIR": str(tmp_path / "cache"),
    }
    with socket.socket() as taken:  # another program already listens on the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            code, out, err = await serve_exit("--port", str(port), "--workers", workers, env=env)
            assert code == 2, out + err
            assert out == ""  # no banner
            assert err.splitlines() == [
                f"geopera-gateway: cannot listen on 127.0.0.1:{port}: address already in use "
                "(another process, perhaps another gateway, listens there; stop it or choose "
                "another --port)"
            ]


async def test_a_second_gateway_cannot_share_the_port_of_a_running_one(emulator, tmp_path):
    async with serving_workers(emulator, DEFAULT_CONFIG, tmp_path / "cache") as (base, _):
        port = base.rsplit(":", 1)[1]
        other = tmp_path / "other.toml"  # another config: one layer only
        text = DEFAULT_CONFIG.read_text()
        other.write_text(text[: text.index("[[layers]]", text.index("[[layers]]") + 1)])
        env = {
            "GEOPERA_BASE_URL": emulator.url,
            "GEOPERA_API_KEY": PLANTED_KEY,
            "GEOPERA_CACHE_DIR": str(tmp_path / "other-cache"),
        }
        code, out, err = await serve_exit(
            "--config", str(other), "--port", port, "--workers", "2", env=env
        )
        assert code == 2, out + err
        assert out == ""
        assert len(err.splitlines()) == 1
        assert "address already in use" in err
        for _ in range(10):  # new connections: every one reaches the first gateway
            async with aiohttp.ClientSession() as session, session.get(base + "/layers") as r:
                assert len(await r.json()) == 4


def readme_block(containing: str) -> str:
    """The README's bash code block that contains ``containing``."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)
    (block,) = [b for b in blocks if containing in b]
    return block


async def bash(script: str, cwd: Path, env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        cwd=cwd,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, script + "\n" + err.decode()
    return out.decode()


@needs_gdal
async def test_the_readme_clip_example_runs_against_the_demo(tmp_path):
    create = readme_block("clip.create_from_item")
    fetch = readme_block('AUTH="Authorization: Bearer $TOKEN"')
    assert "uuidgen" not in create
    assert "geopera-gateway demo --emulator-port 8081" in create
    port, emulator_port = free_port(), free_port()
    env = {"GEOPERA_CACHE_DIR": str(tmp_path / "cache")}
    args = ("demo", "--port", str(port), "--emulator-port", str(emulator_port))
    async with running(*args, env=env, ready="Ctrl+C") as (_, lines):
        token = next(line.split()[-1] for line in lines if "demo token" in line)
        # the lines after the demo's own start and the TOKEN= placeholder, as typed
        typed = [line for line in create.splitlines() if line.startswith(("JOB_ID=", " ", "\t"))]
        script = "\n".join(typed).replace("8081", str(emulator_port)) + '\necho "$JOB_ID"'
        job_id = (await bash(script, tmp_path, {})).strip()
        assert re.fullmatch(r"[0-9a-f-]{36}", job_id), job_id
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:  # "the job completes after about 2 s"
                async with session.get(
                    f"{base}/downloads/{job_id}", headers={"Authorization": f"Bearer {token}"}
                ) as response:
                    if (await response.json())["status"] == "completed":
                        break
                await asyncio.sleep(0.2)
        out = await bash(
            fetch.replace("127.0.0.1:8080", f"127.0.0.1:{port}"),
            tmp_path,
            {"TOKEN": token, "JOB_ID": job_id},
        )
    saved = tmp_path / "harbour_rgb.tif"
    assert saved.stat().st_size > 10_000
    assert '"status": "completed"' in out or '"status":"completed"' in out
    assert "Driver: GTiff" in out  # gdalinfo read it in place


async def test_demo_takes_a_config_and_prints_the_viewer_tilejson_and_wmts(tmp_path):
    conf = tmp_path / "etc"
    (conf / "dist").mkdir(parents=True)
    (conf / "dist" / "maplibre-gl.js").write_text("/* local maplibre */")
    (conf / "dist" / "maplibre-gl.css").write_text("/* local css */")
    text = DEFAULT_CONFIG.read_text()
    olinda_only = text[: text.index("[[layers]]", text.index("[[layers]]") + 1)]
    config = conf / "demo.toml"
    config.write_text(olinda_only + '\n[viewer]\nassets_dir = "dist"\n')
    port = free_port()
    env = {"GEOPERA_CACHE_DIR": str(tmp_path / "cache")}
    args = ("demo", "--config", str(config), "--port", str(port))
    async with running(*args, env=env, ready="Ctrl+C") as (_, lines):
        output = "".join(lines)
        base = f"http://127.0.0.1:{port}"
        assert f"(config: {config})" in output
        printed = {
            name: next(line.split()[-1] for line in lines if line.strip().startswith(name))
            for name in ("map viewer:", "WMTS:", "layers:", "TileJSON:", "sample tile:")
        }
        assert printed["map viewer:"] == base + "/"
        assert "olinda-ndvi" not in output
        assert "bahamas" not in output
        async with aiohttp.ClientSession() as session:
            for name, url in printed.items():
                async with session.get(url) as response:
                    assert response.status == 200, (name, url)
                    if name == "map viewer:":
                        page = await response.text()
            assert f'<script src="{base}/viewer/assets/maplibre-gl.js">' in page
            async with session.get(base + "/viewer/assets/maplibre-gl.js") as response:
                assert await response.text() == "/* local maplibre */"


def test_token_create_with_projects_limits_the_token(tmp_path, capsys):
    from gateway.cli.main import main
    from gateway.config.settings import load_settings

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
