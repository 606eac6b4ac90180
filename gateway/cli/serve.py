"""Running the gateway: one process, or ``--workers N`` processes sharing one port.

The process started by ``serve`` binds the listening sockets itself (:func:`listen`) before
anything else, without ``SO_REUSEPORT``: a port another process listens on (another gateway
included) is refused at once with :class:`ListenError`, and no other process can join this
one's port later. With ``--workers N`` the parent only supervises: it hands its sockets to N
worker processes (``spawn``; each one inherits the file descriptors, so they all accept from
one queue), which each load the same config file, open the same diskcache directories
(process-safe) and write metrics to one ``PROMETHEUS_MULTIPROC_DIR``. SIGINT/SIGTERM are
passed on, and if one worker dies the others are stopped too so a supervisor can restart
the set.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.config.settings import Settings, load_settings
from gateway.logs import access_log_options, configure_logging

log = logging.getLogger("gateway.server")

BACKLOG = 1024
"""Pending connections each listening socket queues (``listen(2)`` backlog)."""


class ListenError(Exception):
    """The gateway cannot listen where it was told to: the message is one line for a person,
    like ``cannot listen on 127.0.0.1:8080: address already in use (...)``."""


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where installed (faster on Linux), asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def listen(host: str, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Bind and listen on every address ``host`` resolves to (``getaddrinfo`` with
    ``AI_PASSIVE``; ``""`` is every interface), TCP ``port`` (0: a free one per address).

    Sockets get ``SO_REUSEADDR`` (a restart may bind while old connections are in
    TIME_WAIT) but never ``SO_REUSEPORT``, so the bind fails while any other process listens
    there, and while these sockets are open no other process can bind the port. IPv6 sockets
    are IPv6-only, as asyncio's ``create_server`` makes them. Returns non-blocking sockets.

    Raises:
        ListenError: ``host`` does not resolve, or an address cannot be bound (in use,
            permission denied for ports below 1024, not an address of this machine).
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {where}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno == errno.EADDRINUSE:
            reason += (
                " (another process, perhaps another gateway, listens there; "
                "stop it or choose another --port)"
            )
        raise ListenError(f"cannot listen on {where}: {reason}") from None
    return sockets


def bound_port(sockets: Sequence[socket.socket]) -> int:
    """The TCP port the first of ``sockets`` is bound to (the one chosen for port 0)."""
    return int(sockets[0].getsockname()[1])


async def serve_app(
    app: web.Application,
    sockets: Sequence[socket.socket],
    *,
    access_log: bool = True,
    ready: Callable[[], None] | None = None,
    header_timeout_s: float = 10.0,
    shutdown_timeout_s: float = 10.0,
) -> None:
    """Serve ``app`` on the listening ``sockets`` until SIGINT or SIGTERM, then shut down
    gracefully (in-flight requests finish, up to ``shutdown_timeout_s`` seconds; the app's
    cleanup contexts run).

    The app's connections are :class:`~gateway.http.server.GatewayRequestHandler`'s (the
    app made by :func:`~gateway.app.create_app` says so itself); ``access_log`` turns
    the JSON access log on; ``ready`` is called once the sockets accept requests. A
    connection that has not sent a whole request head ``header_timeout_s`` seconds after it
    opened or after its last answer is closed (aiohttp's keep-alive timer, which runs from
    the connection's start: the slowloris defence).
    """
    runner = web.AppRunner(
        app,
        keepalive_timeout=header_timeout_s,
        shutdown_timeout=shutdown_timeout_s,
        **access_log_options(access_log),
    )
    await runner.setup()
    # everything made at start-up (modules, settings, the app and its stores) lives as long
    # as the process: out of the collector's sight, so a collection that reaches the oldest
    # generation scans what requests made, not the whole heap again (a cache hit allocates,
    # and with a big heap those collections cost every hit some time)
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        for sock in sockets:
            await web.SockSite(runner, sock, backlog=BACKLOG).start()
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await runner.cleanup()


def run_single(
    settings: Settings, sockets: Sequence[socket.socket], ready: Callable[[], None] | None = None
) -> None:
    """Serve ``settings`` on ``sockets`` (from :func:`listen`) in this process until
    SIGINT/SIGTERM."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(
            serve_app(
                create_app(settings),
                sockets,
                access_log=settings.server.access_log,
                ready=ready,
                header_timeout_s=settings.server.header_timeout_s,
                shutdown_timeout_s=settings.server.shutdown_timeout_s,
            )
        )
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _worker_main(config: str | None, sockets: list[socket.socket], log_level: str) -> None:
    configure_logging(log_level)
    run_single(load_settings(config), sockets)


def run_workers(
    config: Path | None,
    sockets: Sequence[socket.socket],
    workers: int,
    *,
    log_level: str = "INFO",
) -> int:
    """Start ``workers`` processes serving on ``sockets`` (from :func:`listen`; this process
    closes its copies once they run) and wait for them; returns an exit code: 0 when they
    stopped on a signal, 1 when one exited on its own or failed."""
    ctx = multiprocessing.get_context("spawn")
    args = (str(config) if config else None, list(sockets), log_level)
    # workers write metrics to files here; /metrics in any worker merges them all
    metrics_dir = tempfile.mkdtemp(prefix="geopera-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    procs = [
        ctx.Process(target=_worker_main, args=args, name=f"gateway-worker-{i}")
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()  # the child has its own descriptors of the sockets once this returns
    address = sockets[0].getsockname()
    for sock in sockets:
        sock.close()
    log.info(
        "started %d workers on %s port %d (pids %s)",
        workers,
        address[0],
        address[1],
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
