"""Running the gateway: one process, or ``--workers N`` processes sharing one port.

Workers are separate processes (``spawn``) that each load the same config file, bind the
same address with ``SO_REUSEPORT`` (the kernel spreads connections across them) and open the
same diskcache directory (process-safe). The parent only supervises: SIGINT/SIGTERM are passed
on, and if one worker dies the others are stopped too so a supervisor can restart the set.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.logs import configure_logging

log = logging.getLogger("gateway.server")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where installed (faster on Linux), asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_single(
    settings: Settings, host: str, port: int, *, access_log: bool = False, reuse_port: bool = False
) -> None:
    """Serve ``settings`` on ``host:port`` in this process until SIGINT/SIGTERM."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    logger = logging.getLogger("aiohttp.access") if access_log else None
    web.run_app(
        create_app(settings),
        host=host,
        port=port,
        reuse_port=reuse_port,
        access_log=logger,
        loop=loop,
        print=None,
        handle_signals=True,
    )


def _worker_main(
    config: str | None, host: str, port: int, access_log: bool, log_level: str
) -> None:
    configure_logging(log_level)
    settings = load_settings(config)
    run_single(settings, host, port, access_log=access_log, reuse_port=True)


def run_workers(
    config: Path | None,
    host: str,
    port: int,
    workers: int,
    *,
    access_log: bool = False,
    log_level: str = "INFO",
) -> int:
    """Start ``workers`` processes on one port and wait for them; returns an exit code.

    Raises:
        ValueError: ``port`` is 0 (each worker would get a different port).
    """
    if port == 0:
        raise ValueError("--workers needs a fixed --port")
    ctx = multiprocessing.get_context("spawn")
    args = (str(config) if config else None, host, port, access_log, log_level)
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

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    try:
        while any(p.is_alive() for p in procs):
            for proc in procs:
                proc.join(timeout=0.5)
                if proc.exitcode not in (None, 0) and code == 0:
                    code = 1
                    log.error(
                        "worker %s exited with %s; stopping the others", proc.pid, proc.exitcode
                    )
                    forward(signal.SIGTERM, None)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return code if sys.exc_info()[0] is None else 1
