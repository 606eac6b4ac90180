"""Shared fixtures: the bundled emulator as a real HTTP server, and gateways in front of it.

Every gateway under test holds :data:`PLANTED_KEY`, a recognisable fake Geopera key; the
autouse fixture :func:`no_planted_key_in_logs` fails any test whose log records contain it.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.clock import system_clock
from gateway.config.settings import Settings, load_settings
from gateway.emulator import STATS_KEY, EmulatorStats, start_emulator
from gateway.http.auth import token_digest
from gateway.logs import access_log_options, configure_logging

PLANTED_KEY = "gpra_PLANTED-7f3a9c1e-never-echo-me"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "gateway.toml"

# Client tokens of the test config, by scope (their SHA-256 digests are configured);
# "survey" has the downloads scope for the emulator's project "survey" only.
TOKENS = {
    "all": "ggw_test-token-all-scopes-0001",
    "tiles": "ggw_test-token-tiles-only-0002",
    "downloads": "ggw_test-token-downloads-0003",
    "admin": "ggw_test-token-admin-only-0004",
    "survey": "ggw_test-token-survey-project-0005",
}
_TOKEN_TABLES = {
    "all": 'scopes = ["tiles", "downloads", "admin"]\n',
    "survey": 'scopes = ["downloads"]\nprojects = ["survey"]\n',
}
TOKENS_TOML = "".join(
    f'\n[[tokens]]\nname = "test-{scope}"\nsha256 = "{token_digest(token)}"\n'
    + _TOKEN_TABLES.get(scope, f"scopes = {json.dumps([scope])}\n")
    for scope, token in TOKENS.items()
)


def _parse_without_gc(parse: Callable[..., Any]) -> Callable[..., Any]:
    """``ast.parse`` with the cyclic garbage collector paused.

    CPython 3.11.7 keeps one AST recursion counter per interpreter (CPython issue 106905,
    fixed in later releases). When a collection runs inside ``ast.parse`` and a finalizer
    formats a traceback (asyncio's "Task exception was never retrieved" does; 3.11's
    ``traceback`` calls ``ast.parse`` for its carets), the nested parse leaves the counter
    wrong and the outer one raises ``SystemError: AST constructor recursion depth
    mismatch``. Inside pytest's own failure report that is an INTERNALERROR that stops the
    run and hides every later test. With the collector paused no finalizer can run
    inside a parse.
    """

    def parse_safely(*args: Any, **kwargs: Any) -> Any:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return parse(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return parse_safely


ast.parse = _parse_without_gc(ast.parse)

NEVER_RETRIEVED = "exception was never retrieved"
"""asyncio's log message for a task or future whose exception nobody awaited: always a bug."""


class _NeverRetrieved(logging.Handler):
    """Remembers each "exception was never retrieved" record and the test that was running,
    however late the garbage collector finalizes the task."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.current = "(no test)"
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if NEVER_RETRIEVED in record.getMessage():
            self.found.append(f"{self.current}: {record.getMessage()[:200]}")


_NEVER_RETRIEVED = _NeverRetrieved()
logging.getLogger("asyncio").addHandler(_NEVER_RETRIEVED)


def pytest_runtest_setup(item: Any) -> None:
    _NEVER_RETRIEVED.current = item.nodeid


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """Fail the run if any task exception was never retrieved, even one found only by a
    late garbage collection."""
    gc.collect()
    if _NEVER_RETRIEVED.found and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how many hostile-input requests the corpus tests sent (tests/test_hostile.py),
    and list any task exception that was never retrieved."""
    for line in _NEVER_RETRIEVED.found:
        terminalreporter.write_line(f"FAILED (a task exception was never retrieved) {line}")
    from tests.test_hostile import CASES_RUN

    if CASES_RUN:
        terminalreporter.write_line(
            f"hostile-input corpus: {len(CASES_RUN)} requests, each answered 4xx problem+json "
            "with no upstream call"
        )


# A private copy of the olinda layer, for tests of tokens and private layers.
PRIVATE_LAYER = """
[[layers]]
name = "olinda-private"
title = "Olinda (private)"
url = "https://demo.geopera.invalid/cogs/landsat7_olinda_6band_cog.tif"
bands = "3,2,1"
rescale = "20,110;25,110;45,130"
minzoom = 9
maxzoom = 16
bounds = [-34.916589, -8.040927, -34.825966, -7.949822]
public = false
"""


def test_config_text() -> str:
    """The demo config plus the test tokens, without the start-up source check (its
    ``cog.thumbnail`` calls would interleave with what tests count; its own tests turn it
    back on)."""
    text = DEFAULT_CONFIG.read_text()
    assert "check_sources = true" in text
    return text.replace("check_sources = true", "check_sources = false") + TOKENS_TOML


@dataclass
class Emulator:
    """A running emulator: its base URL, its call counters and its app."""

    url: str
    stats: EmulatorStats
    app: web.Application

    def renders(self) -> int:
        """Tile operations served so far (render + terrain)."""
        return self.stats.calls["cog.tile.render"] + self.stats.calls["cog.tile.terrain"]


@pytest.fixture(autouse=True)
def no_planted_key_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture every log record at DEBUG through the gateway's redacting handler set-up, and
    fail the test if the Geopera key or a client token appears in any of them."""
    configure_logging("DEBUG")
    caplog.set_level(logging.DEBUG)
    # aiohttp's default access log (test servers started without the gateway's own logger)
    # prints the raw request line with its query; the gateway never uses it.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    yield
    # Finalize this test's dropped tasks now, inside its own log capture. Everything still
    # alive afterwards is frozen (moved out of the collector's generations), so the next
    # test's collection walks only what that test allocated: a full collection over the
    # imported libraries' heap took 0.1-0.5 s a test, a third of the suite's time.
    gc.collect()
    gc.freeze()
    secrets = [PLANTED_KEY, *TOKENS.values()]
    for when in ("setup", "call", "teardown"):
        for record in caplog.get_records(when):
            text = record.getMessage() + (record.exc_text or "")
            for secret in secrets:
                assert secret not in text, f"a secret leaked in log record {record.name}"
            assert NEVER_RETRIEVED not in text, f"a task exception was never retrieved: {text}"


@pytest.fixture(autouse=True)
def no_planted_key_in_responses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every HTTP response any test reads (gateway or emulator) is scanned for the Geopera
    key, in its headers and its body."""
    original = aiohttp.ClientResponse.read
    planted = PLANTED_KEY.encode()

    async def read(self: aiohttp.ClientResponse) -> bytes:
        body = await original(self)
        assert planted not in body, f"the API key is in the body of {self.url}"
        for name, value in self.headers.items():
            assert PLANTED_KEY not in value, f"the API key is in header {name} of {self.url}"
        return body

    monkeypatch.setattr(aiohttp.ClientResponse, "read", read)


@pytest.fixture
async def start_upstream() -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``await start_upstream(delay_ms=0)`` runs an emulator on a free port."""
    runners: list[web.AppRunner] = []

    async def start(
        delay_ms: float = 0.0, api_keys: list[str] | None = None, **options: Any
    ) -> Emulator:
        runner, url = await start_emulator(
            "127.0.0.1",
            0,
            api_keys=[PLANTED_KEY] if api_keys is None else api_keys,
            delay_ms=delay_ms,
            **options,
        )
        runners.append(runner)
        return Emulator(url, runner.app[STATS_KEY], runner.app)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def emulator(start_upstream: Callable[..., Any]) -> Emulator:
    """An emulator with no added latency that accepts only :data:`PLANTED_KEY`."""
    return await start_upstream()


def config_with(tmp_path: Path, *replacements: tuple[str, str], append: str = "") -> Path:
    """A copy of the demo config with text replacements (each must match) and appended TOML."""
    text = test_config_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"gateway-test-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(text + "\n" + append)
    return path


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    """Factory: settings from a config file (default: config/gateway.toml) for ``upstream``."""

    def make(
        upstream: Emulator | str,
        config: Path | str | None = None,
        api_key: str = PLANTED_KEY,
        cache_dir: Path | None = None,
    ) -> Settings:
        if config is None:
            config = config_with(tmp_path)
        url = upstream if isinstance(upstream, str) else upstream.url
        env = {
            "GEOPERA_BASE_URL": url,
            "GEOPERA_API_KEY": api_key,
            "GEOPERA_CACHE_DIR": str(cache_dir or tmp_path / "cache"),
        }
        return load_settings(config, environ=env)

    return make


class ManualClock:
    """A :data:`gateway.clock.Clock` that stands still until a test moves it: Unix seconds,
    starting at the real time."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward."""
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    """A :class:`ManualClock`; pass it to ``gateway_for(..., clock=clock)``."""
    return ManualClock()


@pytest.fixture
def gateway_for(aiohttp_client: Any, settings_for: Callable[..., Settings]) -> Any:
    """Factory: ``await gateway_for(emulator, token=None, clock=None, **settings_kw)`` ->
    TestClient.

    ``token`` (a key of :data:`TOKENS`) is sent as a Bearer token on every request;
    ``clock`` (a :class:`ManualClock`) replaces the real one for tile freshness.
    """

    async def make(
        upstream: Emulator | str,
        token: str | None = None,
        clock: Callable[[], float] = system_clock,
        **kw: Any,
    ) -> TestClient:
        headers = {"Authorization": f"Bearer {TOKENS[token]}"} if token else None
        return await aiohttp_client(
            create_app(settings_for(upstream, **kw), clock=clock),
            headers=headers,
            server_kwargs=access_log_options(True),  # the gateway's own access log, not aiohttp's
        )

    return make


@pytest.fixture
async def gateway(gateway_for: Any, emulator: Emulator) -> TestClient:
    """The demo config's gateway in front of :func:`emulator`, with a fresh cache."""
    return await gateway_for(emulator)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Factory: ``small_disk(size_bytes)`` mounts a tmpfs of that size in ``tmp_path`` (a
    real file system that fills up: ENOSPC, SQLite's "database or disk is full") and
    unmounts it after the test. Needs root, as CI has; skipped elsewhere."""
    mounts: list[Path] = []

    def mount(size_bytes: int) -> Path:
        path = tmp_path / f"small-disk-{len(mounts)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
            pytest.skip("mounting a tmpfs needs root")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(directory: Path, leave_bytes: int = 0) -> Path:
    """Fill the file system of ``directory`` (a :func:`small_disk`) with one file until about
    ``leave_bytes`` are free, or, with 0, until a write fails (ENOSPC); returns the file
    (delete it to make room again)."""
    filler = directory / "filler"
    if leave_bytes > 0:
        stats = os.statvfs(directory)
        free = stats.f_bavail * stats.f_frsize
        filler.write_bytes(b"\0" * max(0, free - leave_bytes))
        return filler
    with filler.open("wb", buffering=0) as file:
        for size in (65536, 1):  # big writes first, then the last bytes one at a time
            with contextlib.suppress(OSError):
                while True:
                    file.write(b"\0" * size)
    return filler


# --------------------------------------------------------------------------- Redis

REDIS_SERVER = shutil.which("redis-server")

needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None and not os.environ.get("CI"),
    reason="redis-server not installed (CI installs the Debian package redis-server)",
)


class RedisServer:
    """A real ``redis-server`` on a free loopback port, no persistence; stop and start it
    again (empty) to play an outage and a restart."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (on the same port as before, if it ran) and wait until it answers."""
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed")
        if not self.port:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self.port = sock.getsockname()[1]
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), *options, "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        pytest.fail("redis-server did not start")

    def stop(self) -> None:
        """Stop it at once (SIGKILL: an outage, not a shutdown)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            assert sock.recv(16).startswith(b"+OK")


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole run (see :func:`redis_server`)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> RedisServer:
    """The session's redis-server, emptied for this test."""
    if redis_session.process is None:  # a test stopped it
        redis_session.start()
    redis_session.flush()
    return redis_session
