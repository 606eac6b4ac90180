"""The ``geopera-gateway`` command: ``serve``, ``demo``, ``token``, ``seed``, ``export``,
``purge`` and ``emulator``.

Bad arguments are one line on stderr and exit code 2 (:class:`OneLineParser`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import mercantile

from gateway import __version__
from gateway.config.settings import (
    PROJECT_ID,
    SCOPES,
    Settings,
    TokenSettings,
    load_settings,
)
from gateway.config.tables import ConfigError
from gateway.emulator import defaults as emulator
from gateway.http.auth import new_token
from gateway.logs import configure_logging

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("gateway.cli")

DEMO_API_KEY = "gpra_demo_local_emulator_only"
"""Key the demo uses with its bundled emulator when GEOPERA_API_KEY is not set."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (``prog: message``, with a
    pointer to ``--help``) and exit code 2, instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = OneLineParser(
        prog="geopera-gateway",
        description="Caching XYZ tile and download proxy for the Geopera imagery API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("GEOPERA_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("GEOPERA_CONFIG"),
        help="config file (default: $GEOPERA_CONFIG, else the packaged demo config)",
    )
    serve.add_argument("--host", help="listen address (default: server.host from the config)")
    serve.add_argument("--port", type=int, help="listen port (default: server.port)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port and the disk cache (default 1)",
    )

    demo = sub.add_parser(
        "demo",
        help="run the bundled emulator and the gateway on sample data",
        description="The gateway in front of the bundled emulator, with a demo token of every "
        "scope. --config takes the layers, viewer and other settings from a file; the "
        "upstream is always the emulator.",
    )
    demo.add_argument(
        "--config",
        type=Path,
        help="config file (default: the packaged demo config; $GEOPERA_CONFIG is not read)",
    )
    demo.add_argument("--host", help="listen address (default: server.host from the config)")
    demo.add_argument("--port", type=int, help="listen port (default: server.port)")
    demo.add_argument(
        "--emulator-port",
        type=int,
        default=0,
        help="port for the bundled emulator, e.g. 8081 (default: any free port)",
    )

    token = sub.add_parser("token", help="client tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser(
        "create",
        help="print a new token (to stderr, once) and its [[tokens]] TOML (to stdout)",
        description="Append the output to your config: "
        "geopera-gateway token create alice --scopes tiles >> config/gateway.toml",
    )
    create.add_argument("name", help="who holds the token (shown in logs and rate limits)")
    create.add_argument("--scopes", required=True, help="comma-separated: tiles, downloads, admin")
    create.add_argument("--layers", help="comma-separated private layers it may read")
    create.add_argument("--rate-limit", help="its own request limit, e.g. '500/second'")
    create.add_argument(
        "--projects", help="comma-separated Geopera projects whose clip jobs it may reach"
    )

    _add_seed_parser(sub)
    _add_export_parser(sub)
    _add_purge_parser(sub)

    emu = sub.add_parser("emulator", help="run the bundled Geopera emulator alone")
    emu.add_argument("--host", default=emulator.DEFAULT_HOST)
    emu.add_argument("--port", type=int, default=emulator.DEFAULT_PORT)
    emu.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY[=SCOPES]",
        help="accept only this API key or session token, with these comma-separated scopes "
        "(e.g. KEY=tiles:read,clip:read; default every scope); repeatable. Default: any gpra_ "
        "key and any JWT-shaped session token, with every scope",
    )
    emu.add_argument(
        "--delay-ms",
        type=float,
        default=emulator.DEFAULT_DELAY_MS,
        help="added latency per upstream call, milliseconds",
    )
    emu.add_argument(
        "--asset-rps",
        type=float,
        default=emulator.DEFAULT_ASSET_RPS,
        metavar="R",
        help="per-asset request limit, requests/s (default %(default)g; 0 disables)",
    )
    emu.add_argument(
        "--bandwidth",
        type=float,
        default=emulator.DEFAULT_BANDWIDTH,
        metavar="BYTES_PER_S",
        help=f"response bandwidth limit, bytes/s (default {emulator.DEFAULT_BANDWIDTH:,}; "
        "0 disables)",
    )
    emu.add_argument(
        "--clip-delay-s",
        type=float,
        default=emulator.DEFAULT_CLIP_DELAY_S,
        metavar="S",
        help="minimum time a clip job stays running, seconds (default %(default)g)",
    )
    emu.add_argument(
        "--empty-tiles",
        type=int,
        choices=emulator.EMPTY_STATUSES,
        default=emulator.DEFAULT_EMPTY_STATUS,
        help="status of an empty tile: 404 problem+json (default) or 204 No Content",
    )
    return parser


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("GEOPERA_CONFIG"),
        help="config file (default: $GEOPERA_CONFIG, else the packaged demo config)",
    )


def _add_seed_parser(sub: argparse._SubParsersAction[OneLineParser]) -> None:
    seed = sub.add_parser(
        "seed",
        help="fill the tile cache for an area and zoom range ahead of map users",
        description="Fetch a layer's tiles through the gateway's cache and upstream limits at "
        "seeding priority (map users go first). Interrupt with Ctrl+C; the same command "
        "resumes. Exit 0 done, 1 some tiles failed, 2 bad arguments, 130 interrupted.",
    )
    _walk_arguments(seed, "fetch nothing")
    seed.add_argument(
        "--formats", metavar="FMT[,FMT]", help="e.g. png,webp (default: the layer's first)"
    )
    seed.add_argument("--scale", type=int, choices=(1, 2), default=1, help="2 for @2x tiles")
    seed.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="resume state file (default: in the cache's state directory, per parameters)",
    )
    _config_argument(seed)


def _add_export_parser(sub: argparse._SubParsersAction[OneLineParser]) -> None:
    export = sub.add_parser(
        "export",
        help="write a layer's tiles over an area and zoom range to an MBTiles file",
        description="Write an MBTiles 1.3 file for offline use: tiles from the cache, what is "
        "missing fetched through the gateway's upstream limits at seeding priority. The file "
        "appears only when complete. Exit 0 written, 1 some tiles failed (nothing written), "
        "2 bad arguments, 130 interrupted.",
    )
    _walk_arguments(export, "fetch and write nothing")
    export.add_argument("--mbtiles", required=True, metavar="OUT.mbtiles", help="file to write")
    export.add_argument(
        "--format", metavar="FMT", help="png, jpg or webp (default: the layer's first)"
    )
    _config_argument(export)


def _walk_arguments(parser: argparse.ArgumentParser, dry_run: str) -> None:
    """The options of commands that walk a layer's tiles: ``--layer``, ``--bbox``,
    ``--zoom``, ``--dry-run`` (which does ``dry_run``) and ``--concurrency``."""
    parser.add_argument("--layer", required=True, help="layer name")
    parser.add_argument("--bbox", required=True, metavar="W,S,E,N", help="area in degrees")
    parser.add_argument("--zoom", required=True, metavar="A-B", help="zoom range, e.g. 8-12")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"print the tile count and estimated egress; {dry_run}",
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="tiles in flight at once (default 4)"
    )


def _add_purge_parser(sub: argparse._SubParsersAction[OneLineParser]) -> None:
    purge = sub.add_parser(
        "purge",
        help="remove a layer's cached tiles (all, or by area and zoom)",
        description="Remove a layer's cached tiles, every scale and format; running "
        "gateway workers drop their in-memory copies within about a second.",
    )
    purge.add_argument("--layer", required=True, help="layer name")
    purge.add_argument("--bbox", metavar="W,S,E,N", help="only tiles overlapping this area")
    purge.add_argument("--zoom", metavar="A-B", help="only these zoom levels, e.g. 12-14")
    _config_argument(purge)


def _attach_negative_bbox(argv: Sequence[str]) -> list[str]:
    """``--bbox -35,-8.1,...`` as ``--bbox=-35,-8.1,...``: argparse takes a separate value
    starting with ``-`` for an option (western and southern coordinates are negative)."""
    result: list[str] = []
    for arg in argv:
        if result and result[-1] == "--bbox" and arg[:1] == "-" and arg[1:2] in "0123456789.":
            result[-1] = f"--bbox={arg}"
        else:
            result.append(arg)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a configuration error)."""
    args = build_parser().parse_args(_attach_negative_bbox(sys.argv[1:] if argv is None else argv))
    configure_logging(args.log_level)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "token":
            return _token_create(args)
        if args.command in ("seed", "export", "purge"):
            from gateway.cli import seed

            run = {"seed": seed.run_seed, "export": seed.run_export, "purge": seed.run_purge}
            return run[args.command](args)
        return _emulator(args)
    except ConfigError as exc:
        print(f"geopera-gateway: configuration error: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from gateway.cli.serve import ListenError, bound_port, listen, run_single, run_workers

    settings = load_settings(args.config)
    host, port = listen_address(args, settings)
    if args.workers < 1:
        print("geopera-gateway: --workers must be 1 or more", file=sys.stderr)
        return 2
    try:
        sockets = listen(host, port)  # before the banner: a port in use is one line, exit 2
    except ListenError as exc:
        print(f"geopera-gateway: {exc}", file=sys.stderr)
        return 2
    _print_urls(settings, f"http://{_url_host(host)}:{bound_port(sockets)}")
    if args.workers == 1:
        run_single(settings, sockets)
        return 0
    return run_workers(args.config, sockets, args.workers, log_level=args.log_level)


def listen_address(args: argparse.Namespace, settings: Settings) -> tuple[str, int]:
    """Where ``serve`` and ``demo`` listen: ``--host`` / ``--port``, else the settings'
    ``server.host`` / ``server.port``, which ``GEOPERA_HOST`` / ``GEOPERA_PORT`` override."""
    host = args.host or settings.server.host
    return host, settings.server.port if args.port is None else args.port


def _emulator(args: argparse.Namespace) -> int:
    try:
        from gateway.emulator import run_emulator
    except ImportError:
        print(
            "geopera-gateway: the emulator needs rio-tiler: "
            "pip install 'geopera-gateway[emulator]'",
            file=sys.stderr,
        )
        return 2
    run_emulator(
        args.host,
        args.port,
        api_keys=args.api_keys,
        delay_ms=args.delay_ms,
        asset_rps=args.asset_rps,
        bandwidth=args.bandwidth,
        clip_delay_s=args.clip_delay_s,
        empty_tiles=args.empty_tiles,
    )

    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        from gateway.emulator import start_emulator
    except ImportError:
        print(
            "geopera-gateway: the demo needs rio-tiler: pip install 'geopera-gateway[emulator]'",
            file=sys.stderr,
        )
        return 2
    from gateway.cli.serve import new_event_loop

    loop = new_event_loop()
    try:
        return loop.run_until_complete(_run_demo(args, start_emulator))
    finally:
        loop.close()


async def _run_demo(
    args: argparse.Namespace, start_emulator: Callable[..., Awaitable[tuple[web.AppRunner, str]]]
) -> int:
    from gateway.app import create_app
    from gateway.cli.serve import ListenError, bound_port, listen, serve_app

    try:
        emulator_runner, emulator_url = await start_emulator("127.0.0.1", args.emulator_port)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        print(
            f"geopera-gateway: cannot start the emulator on 127.0.0.1:{args.emulator_port}: "
            f"{reason}",
            file=sys.stderr,
        )
        return 2
    try:
        env = dict(os.environ)
        env["GEOPERA_BASE_URL"] = emulator_url
        env.setdefault("GEOPERA_API_KEY", DEMO_API_KEY)
        settings = load_settings(args.config, environ=env)
        host, port = listen_address(args, settings)
        demo_token, digest = new_token()
        demo = TokenSettings(name="demo", sha256=digest, scopes=SCOPES)
        settings = settings.model_copy(update={"tokens": (*settings.tokens, demo)})
        try:
            sockets = listen(host, port)
        except ListenError as exc:
            print(f"geopera-gateway: {exc}", file=sys.stderr)
            return 2

        def ready() -> None:
            print(f"Geopera emulator (bundled sample COGs): {emulator_url}")
            _print_urls(settings, f"http://{_url_host(host)}:{bound_port(sockets)}")
            print(
                "  demo token (tiles, downloads, admin; valid until the demo stops): " + demo_token
            )
            print("Press Ctrl+C to stop.", flush=True)

        await serve_app(
            create_app(settings), sockets, access_log=settings.server.access_log, ready=ready
        )
    finally:
        await emulator_runner.cleanup()
    return 0


def _token_create(args: argparse.Namespace) -> int:
    """``token create``: the token goes to stderr (shown once), the TOML to stdout."""
    scopes = sorted({s.strip() for s in args.scopes.split(",") if s.strip()})
    if not scopes or any(s not in SCOPES for s in scopes):
        print(f"geopera-gateway: --scopes takes {', '.join(sorted(SCOPES))}", file=sys.stderr)
        return 2
    if not args.name.isprintable() or not args.name.strip():
        print("geopera-gateway: the token name must be printable text", file=sys.stderr)
        return 2
    projects = None
    if args.projects is not None:
        projects = sorted({p.strip() for p in args.projects.split(",") if p.strip()})
        if not projects or not all(PROJECT_ID.fullmatch(p) for p in projects):
            print(
                "geopera-gateway: --projects takes comma-separated project ids "
                "(printable, no spaces)",
                file=sys.stderr,
            )
            return 2
    token, digest = new_token()
    lines = [
        "",
        "[[tokens]]",
        f"name = {json.dumps(args.name)}",
        f'sha256 = "{digest}"',
        f"scopes = {json.dumps(scopes)}",
    ]
    if args.layers:
        lines.append(f"layers = {json.dumps([x.strip() for x in args.layers.split(',')])}")
    if args.rate_limit:
        lines.append(f"rate_limit = {json.dumps(args.rate_limit)}")
    if projects is not None:
        lines.append(f"projects = {json.dumps(projects)}")
    print(
        f"New token for {args.name} (store it now; it is not shown again):\n  {token}\n"
        "Only its SHA-256 goes in the config (the TOML printed on stdout).",
        file=sys.stderr,
    )
    print("\n".join(lines))
    return 0


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _print_urls(settings: Settings, base: str) -> None:
    """Print ready-to-use URLs: the viewer, the WMTS capabilities and ``/layers``, then for
    every layer its XYZ template, TileJSON and one sample tile."""
    from gateway.discovery.tilejson import tile_template, tilejson_url
    from gateway.discovery.wmts import CAPABILITIES_PATH

    print(f"geopera-gateway {__version__} on {base}  (config: {settings.source})")
    print(f"  map viewer:   {base}/")
    print(f"  WMTS:         {base}{CAPABILITIES_PATH}")
    print(f"  layers:       {base}/layers")
    for layer in settings.layers.values():
        fmt = layer.formats[0]
        west, south, east, north = layer.bounds
        zoom = min(layer.maxzoom, layer.minzoom + 4)
        sample = mercantile.tile((west + east) / 2, (south + north) / 2, zoom)
        print(f"  {layer.name} ({layer.kind}, zoom {layer.minzoom}-{layer.maxzoom})")
        print(f"    XYZ template: {tile_template(base, layer)}")
        print(f"    TileJSON:     {tilejson_url(base, layer)}")
        print(f"    sample tile:  {base}/tiles/{layer.name}/{sample.z}/{sample.x}/{sample.y}.{fmt}")
    if settings.default_layer:
        print(f"  default layer {settings.default_layer}: {base}/tiles/{{z}}/{{x}}/{{y}}.png")
    sys.stdout.flush()
