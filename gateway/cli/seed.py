"""The ``seed``, ``export`` and ``purge`` subcommands (arguments parsed in
:mod:`gateway.cli.main`).

Exit codes: 0 done, 1 some tiles failed (or the egress budget stopped the seed; an export
then writes nothing), 2 bad arguments or configuration (one line on stderr), 130
interrupted (Ctrl+C or SIGTERM; a seed's resume state is saved, an export's partial file is
removed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gateway.config.settings import Settings, load_settings
from gateway.humanize import human_bytes
from gateway.layers import Bounds, Layer
from gateway.seed.area import AreaError, parse_bbox, parse_formats, parse_zoom
from gateway.seed.estimate import dry_run
from gateway.seed.export import Exporter, MBTilesWriter, mbtiles_metadata
from gateway.seed.fleet import FleetPurges
from gateway.seed.plan import SeedPlan
from gateway.seed.purge import purge_tiles
from gateway.seed.resume import ResumeError, ResumeState
from gateway.seed.runner import Outcome, Seeder, SeedSummary
from gateway.services.tiles import TileAddress
from gateway.storage.redis_link import RedisLink, StateUnavailable
from gateway.storage.tiles import TileCache

EXIT_INTERRUPTED = 130


def run_seed(args: argparse.Namespace) -> int:
    """``seed``: walk the plan (or ``--dry-run`` it) and print the summary.

    Raises:
        ConfigError: the config cannot be loaded (the caller prints it, exit 2).
    """
    settings = load_settings(
        args.config, need_api_key=not args.dry_run
    )  # a dry run fetches nothing
    try:
        layer = _layer(settings, args.layer)
        zooms = parse_zoom(args.zoom)
        plan = SeedPlan.for_layer(
            layer,
            parse_bbox(args.bbox),
            zooms,
            parse_formats(layer, args.formats),
            args.scale,
        )
    except AreaError as exc:
        return _usage_error("seed", str(exc))
    if args.concurrency < 1:
        return _usage_error("seed", "--concurrency must be 1 or more")
    _note_clipped(plan, zooms)
    if args.dry_run:
        return _dry_run(settings, plan)

    state = ResumeState.for_plan(plan, settings.cache.state_directory, args.state)
    try:
        start = state.load()
    except ResumeError as exc:
        return _usage_error("seed", str(exc))
    total = plan.count()
    if start >= total:
        start = 0
    if start:
        print(f"resuming at tile {start} of {total} (state: {state.path})", flush=True)

    from gateway.cli.serve import new_event_loop

    loop = new_event_loop()
    try:
        summary = loop.run_until_complete(
            _seed(settings, plan, args.concurrency, state, start, total)
        )
    finally:
        loop.close()
    if summary.complete:
        state.remove()
    _print_summary(plan, summary, state.path)
    if summary.stopped == "interrupted":
        return EXIT_INTERRUPTED
    return 1 if summary.failed or summary.stopped else 0


async def _seed(
    settings: Settings,
    plan: SeedPlan,
    concurrency: int,
    state: ResumeState | None,
    start: int,
    total: int,
    *,
    command: str = "seed",
    on_address: Callable[[TileCache, TileAddress, Outcome], None] | None = None,
) -> SeedSummary:
    """Open the gateway's tile path (no memory tier: each tile is stored once) and seed,
    with a progress bar; ``on_address`` gets the cache, each finished tile's address and
    its outcome (the export writes it there)."""
    from gateway.services.stack import open_tile_stack

    seed_settings = settings.model_copy(
        update={"cache": settings.cache.model_copy(update={"memory_bytes": 0})}
    )
    stack = open_tile_stack(seed_settings)
    bar = tqdm(
        total=total,
        initial=start,
        unit="tile",
        desc=f"{command} {plan.layer.name}",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=None,  # off when stderr is not a terminal
    )

    def on_tile(_outcome: Outcome, s: SeedSummary) -> None:
        bar.update(1)
        bar.set_postfix_str(
            f"fetched {s.fetched}, skipped {s.skipped}, empty {s.empty}, failed {s.failed}, "
            f"{human_bytes(s.bytes)}",
            refresh=False,
        )

    def written(address: TileAddress, outcome: Outcome) -> None:
        if on_address is not None:
            on_address(stack.cache, address, outcome)

    seeder = Seeder(stack.service, plan, concurrency, state, on_tile, written)

    def on_signal() -> None:
        first = seeder.summary.stopped is None
        seeder.interrupt()
        tqdm.write(
            "interrupted: finishing the tiles in flight (again to stop at once)"
            if first
            else "stopping the tiles in flight",
            file=sys.stderr,
        )

    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal)
    try:
        with _logging_through(bar):
            return await seeder.run(total, start)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        bar.close()
        await stack.aclose()


@contextlib.contextmanager
def _logging_through(bar: tqdm) -> Iterator[None]:
    """Route console log lines around the progress bar, keeping the handlers' filters (the
    secret redaction)."""
    if bar.disable:
        yield
        return
    root = logging.getLogger()
    filters = [f for handler in root.handlers for f in handler.filters]
    with logging_redirect_tqdm():
        for handler in root.handlers:
            for log_filter in filters:
                handler.addFilter(log_filter)
        yield


def _dry_run(settings: Settings, plan: SeedPlan) -> int:
    cache = TileCache(settings.cache.directory, settings.cache.size_limit_bytes, 0)
    try:
        result = dry_run(cache, plan)
    finally:
        cache.close()
    print(f"dry run: {plan.describe()}")
    print(f"  tiles:          {result.total}")
    print(f"  not fresh:      {result.not_fresh} (would be fetched)")
    print(f"  upstream calls: {result.upstream_calls} at most")
    basis = "; ".join(
        f"{fmt}: {nbytes:,} bytes/tile ({source})"
        for fmt, (nbytes, source) in result.tile_bytes.items()
    )
    egress = result.egress_bytes
    print(f"  est. egress:    {egress:,} bytes ({human_bytes(egress)}); {basis}")
    return 0


def _print_summary(
    plan: SeedPlan, s: SeedSummary, state_path: Path | None, command: str = "seed"
) -> None:
    status = {
        None: "complete",
        "interrupted": "interrupted",
        "budget": "stopped (daily egress budget spent)",
    }[s.stopped]
    if s.stopped == "interrupted" and s.complete:
        status = "interrupted (every tile was done)"
    print(f"{command} {status}: {plan.describe()}")
    resumed = f", resumed at tile {s.start}" if s.start else ""
    print(f"  tiles:    {s.total} in the plan{resumed}, {s.done} done in this run")
    print(f"  fetched:  {s.fetched}")
    print(f"  skipped:  {s.skipped} (fresh)")
    print(f"  empty:    {s.empty}")
    print(f"  failed:   {s.failed}")
    print(f"  bytes:    {s.bytes:,} ({human_bytes(s.bytes)})")
    print(f"  elapsed:  {s.elapsed_s:.1f} s")
    print(f"  rate:     {s.rate:.1f} tiles/s")
    if not s.complete and state_path is not None:
        print(
            f"  resume:   run the same command again to continue at tile {s.next_index} "
            f"of {s.total} (state: {state_path})"
        )
    sys.stdout.flush()


def run_export(args: argparse.Namespace) -> int:
    """``export``: write the plan's tiles into an MBTiles 1.3 file (or ``--dry-run`` it),
    fetching what the cache lacks at seeding priority (:mod:`gateway.seed.export`).

    Raises:
        ConfigError: the config cannot be loaded (the caller prints it, exit 2).
    """
    settings = load_settings(args.config)
    output = Path(args.mbtiles)
    try:
        layer = _layer(settings, args.layer)
        zooms = parse_zoom(args.zoom)
        formats = parse_formats(layer, args.format)
        if len(formats) != 1:
            raise AreaError(f"an MBTiles file holds one format; got --format {args.format!r}")
        plan = SeedPlan.for_layer(layer, parse_bbox(args.bbox), zooms, formats)
    except AreaError as exc:
        return _usage_error("export", str(exc))
    if args.concurrency < 1:
        return _usage_error("export", "--concurrency must be 1 or more")
    if output.is_dir() or not output.parent.is_dir():
        return _usage_error(
            "export", f"--mbtiles {str(output)[:200]!r} must be a file in an existing directory"
        )
    _note_clipped(plan, zooms)
    if args.dry_run:
        return _dry_run(settings, plan)
    try:
        writer = MBTilesWriter(output, mbtiles_metadata(plan))
    except (OSError, sqlite3.Error) as exc:
        return _usage_error("export", f"cannot create a file beside {str(output)[:200]!r}: {exc}")
    exporter = Exporter(writer)
    total = plan.count()

    from gateway.cli.serve import new_event_loop

    loop = new_event_loop()
    try:
        seeding = _seed(
            settings,
            plan,
            args.concurrency,
            None,
            0,
            total,
            command="export",
            on_address=exporter.add,
        )
        summary = loop.run_until_complete(seeding)
    except BaseException:
        writer.discard()
        raise
    finally:
        loop.close()
    if summary.stopped == "interrupted" or not summary.complete or not exporter.complete:
        writer.discard()
        _print_summary(plan, summary, None, "export")
        reason = exporter.error or (
            f"{exporter.failed + exporter.missing} of {total} tiles could not be fetched"
            if summary.stopped != "interrupted"
            else "interrupted"
        )
        print(
            f"export not written ({reason}); the tiles fetched stay in the cache, so running "
            "the same command again fetches only the rest",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED if summary.stopped == "interrupted" else 1
    try:
        count = writer.commit()
    except (OSError, sqlite3.Error) as exc:
        print(f"geopera-gateway export: could not finish {output}: {exc}", file=sys.stderr)
        return 1
    _print_summary(plan, summary, None, "export")
    print(f"  written:  {count} tiles to {output} (MBTiles 1.3, {plan.formats[0]})")
    return 0


def run_purge(args: argparse.Namespace) -> int:
    """``purge``: remove a layer's cached tiles (all, or by ``--bbox`` / ``--zoom``).

    Raises:
        ConfigError: the config cannot be loaded (the caller prints it, exit 2).
    """
    settings = load_settings(args.config, need_api_key=False)  # purging never calls upstream
    try:
        layer = _layer(settings, args.layer)
        bbox = parse_bbox(args.bbox) if args.bbox is not None else None
        zooms = parse_zoom(args.zoom) if args.zoom is not None else None
    except AreaError as exc:
        return _usage_error("purge", str(exc))
    cache = TileCache(settings.cache.directory, settings.cache.size_limit_bytes, 0)
    try:
        removed = purge_tiles(cache, layer.name, bbox, zooms)
        fleet = _announce_purge(settings, cache, layer.name, bbox, zooms)
    finally:
        cache.close()
    scope = []
    if zooms is not None:
        scope.append(f"zoom {zooms[0]}-{zooms[1]}")
    if bbox is not None:
        scope.append("bbox " + ",".join(f"{v:g}" for v in bbox))
    where = f" ({', '.join(scope)})" if scope else " (all zooms and places)"
    print(f"removed {removed} cached tiles of layer {layer.name}{where}")
    if fleet is False:
        print(
            "purge: Redis cannot be reached, so the other replicas did not get this purge; "
            "run it again once Redis is back",
            file=sys.stderr,
        )
        return 1
    if fleet:
        print("announced to the other replicas (they purge within about a second)")
    return 0


def _announce_purge(
    settings: Settings,
    cache: TileCache,
    layer: str,
    bbox: Bounds | None,
    zooms: tuple[int, int] | None,
) -> bool | None:
    """With ``[state] redis_url``, announce the purge to the fleet (:mod:`gateway.seed.fleet`):
    True when announced, False when Redis cannot be reached; None without a fleet."""
    url, password = settings.state.redis_url, settings.state.password
    if url is None:
        return None

    async def announce() -> None:
        link = RedisLink(url, password)
        try:
            await FleetPurges(link, cache, settings.layers).announce(layer, bbox, zooms)
        finally:
            await link.aclose()

    # the link's own outage line speaks of a serving replica; the command says it in one line
    link_log = logging.getLogger("gateway.redis")
    level = link_log.level
    link_log.setLevel(logging.CRITICAL)
    try:
        asyncio.run(announce())
    except StateUnavailable:
        return False
    finally:
        link_log.setLevel(level)
    return True


def _note_clipped(plan: SeedPlan, zooms: tuple[int, int]) -> None:
    """Say on stderr when the asked zoom range was clipped to the layer's."""
    if plan.zooms != zooms:
        print(
            f"note: zoom {zooms[0]}-{zooms[1]} clipped to the zoom range of layer "
            f"{plan.layer.name!r}: {plan.zooms[0]}-{plan.zooms[1]}",
            file=sys.stderr,
        )


def _layer(settings: Settings, name: str) -> Layer:
    layer = settings.layers.get(name)
    if layer is None:
        known = ", ".join(settings.layers)
        raise AreaError(f"unknown layer {name[:64]!r}; {settings.source} has: {known}")
    return layer


def _usage_error(command: str, message: str) -> int:
    print(f"geopera-gateway {command}: {message}", file=sys.stderr)
    return 2
