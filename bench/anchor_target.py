"""Start geopera-gateway as an ``--ext`` target of the reference anchor harness.

``../shared/bench-anchors/run_all.sh --ext '{"cmd": ...}'`` starts its extra target with a
command in which ``{port}``, ``{upstream}`` and ``{scratch}`` are filled in. The harness's fake
upstream answers ``POST /v1/op/cog.tile.render`` with one fixed 256 px PNG for any z/x/y and
COG url, and the harness warms ``/tiles/{z}/{x}/{y}.png`` at z12 (x 2000-2039, y 1300-1324) and
runs cold misses at z14. So this wrapper writes a config whose only (default) layer covers the
whole world at zoom 0-18, with the upstream as its base URL and the cache in ``{scratch}``
(plus the overrides of ``bench/gwconfig.py``: no access log, no per-client limit, upstream
limits far above what the harness sends), and then execs ``python -m gateway serve`` in its
place (same PID, so the harness's taskset pinning and stop-by-PID apply to the gateway
itself)::

    python bench/anchor_target.py --port {port} --upstream {upstream} --scratch {scratch}

``bench/tiles.py --anchors`` builds that command; it can also be passed by hand to
``run_all.sh --ext``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# bench/gwconfig.py and bench/harness.py: this script's directory is first on sys.path
import gwconfig
import harness

CONFIG_TEMPLATE = """\
# Written by bench/anchor_target.py for the anchor harness's fake upstream.
[upstream]
base_url = "{upstream}"
max_connections = 64

[cache]
directory = "{cache}"
{memory}
[[layers]]
name = "anchor"
title = "Anchor harness tiles (fake upstream, fixed PNG)"
kind = "raster"
default = true
url = "https://demo.geopera.invalid/cogs/anchor.tif"
minzoom = 0
maxzoom = 18
formats = ["png"]
ttl_s = 86400
"""

UPSTREAM_RPS = 10_000.0
"""Upstream limit per operation and per asset for the fake upstream (which has none)."""


def write_config(
    upstream: str,
    scratch: Path,
    environ: dict[str, str],
    *,
    access_log: bool = False,
    client_limit: str = "off",
    memory_bytes: int | None = None,
) -> Path:
    """Write ``<scratch>/gateway.toml`` for ``upstream``; returns its path.

    The overrides are those of bench/tiles.py (by default no access log and no per-client
    limit, as for the anchors), except that the upstream rate is high: the fake upstream has
    no limits of its own. ``memory_bytes`` sets ``cache.memory_bytes`` (default: the
    gateway's own).
    """
    scratch.mkdir(parents=True, exist_ok=True)
    config = scratch / "gateway.toml"
    memory = "" if memory_bytes is None else f"memory_bytes = {memory_bytes}\n"
    base = CONFIG_TEMPLATE.format(
        upstream=upstream.rstrip("/"), cache=scratch / "cache", memory=memory
    )
    overrides = gwconfig.default_overrides(
        access_log=access_log, client_limit=client_limit, upstream_rps=UPSTREAM_RPS
    )
    applied, skipped = gwconfig.write_config(base, config, environ, overrides)
    print(f"anchor_target: {config}, overrides: {'; '.join(applied) or 'none'}", flush=True)
    for reason in skipped:
        print(f"anchor_target: override skipped: {reason}", flush=True)
    return config


def main() -> None:
    """Parse the options, write the config and exec the gateway (does not return)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--upstream", required=True, help="base URL of the fake upstream")
    parser.add_argument("--scratch", type=Path, required=True, help="directory for config/cache")
    parser.add_argument("--workers", type=int, default=1, help="gateway workers (1)")
    args = parser.parse_args()
    # the bench API key, never a real one: the fake upstream ignores it, but the gateway
    # refuses to start without a key
    env = harness.gateway_env()
    config = write_config(args.upstream, args.scratch, env)
    sys.stdout.flush()
    os.execve(sys.executable, harness.gateway_argv(config, args.port, args.workers), env)


if __name__ == "__main__":
    main()
