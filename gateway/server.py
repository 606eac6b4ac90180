"""Running the gateway: one process, or ``--workers N`` processes sharing one port.

Workers are separate processes (``spawn``) that each load the same config file, bind the
same address with ``SO_REUSEPORT`` (the kernel spreads connections across them), open the
same diskcache directories (process-safe) and write metrics to one
``PROMETHEUS_MULTIPROC_DIR``. The parent only supervises: SIGINT/SIGTERM are passed
on, and if one worker dies the others are stopped too so a supervisor can restart the set.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.logs import access_log_options, configure_logging

log = logging.getLogger("gateway.server")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where installed (faster on Linux), asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_single(settings: Settings, host: str, port: int, *, reuse_port: bool = False) -> None:
    """Serve ``settings`` on ``host:port`` in this process until SIGINT/SIGTERM."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        create_app(settings),
        host=host,
        port=port,
        reuse_port=reuse_port,
        backlog=1024,
        loop=loop,
        print=None,
        handle_signals=True,
        keepalive_timeout=settings.server.header_timeout_s,
        shutdown_timeout=settings.server.shutdown_timeout_s,
        **access_log_options(settings.server.access_log),
    )


def _worker_main(config: str | None, host: str, port: int, log_level: str) -> None:
    configure_logging(log_level)
    settings = load_settings(config)
    run_single(settings, host, port, reuse_port=True)


def run_workers(
    config: Path | None,
    host: str,
    port: int,
    workers: int,
    *,
    log_level: str = "INFO",
) -> int:
    """Start ``workers`` processes on one port and wait for them; returns an exit code.

    Raises:
        ValueError: ``port`` is 0 (each worker would get a different port).
    """
    if port == 0:
        raise ValueError("--workers needs a fixed --port")
    ctx = multiprocessing.get_context("spawn")
    args = (str(config) if config else None, host, port, log_level)
    # workers write metrics to files here; /metrics in any worker merges them all
    metrics_dir = tempfile.mkdtemp(prefix="geopera-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    procs = [
        ctx.Process(target=_worker_main, args=args, name=f"gateway-worker-{i}")
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    log.info(
        "started %d workers on http://%s:%d (pids %s)",
        workers,
        host,
        port,
        ", ".join(str(p.pid) for p in procs),
    )

    stopping = unexpected = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while any(p.is_alive() for p in procs):
        multiprocessing.connection.wait([p.sentinel for p in procs], timeout=1.0)
        if not stopping and any(p.exitcode is not None for p in procs):
            unexpected = True
            log.error("a worker exited unexpectedly; stopping the others")
            forward(signal.SIGTERM, None)
    clean = {0, -signal.SIGTERM, -signal.SIGINT}  # a worker may be stopped before it serves
    for proc in procs:
        proc.join()
        log.info("worker %s exited with %s", proc.pid, proc.exitcode)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if unexpected or any(p.exitcode not in clean for p in procs) else 0
