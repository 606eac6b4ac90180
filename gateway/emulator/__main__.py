"""``python -m gateway.emulator [--host H] [--port P] [--delay-ms MS] [--api-key KEY ...]
[--asset-rps R] [--bandwidth BYTES_PER_S] [--clip-delay-s S]``."""

from __future__ import annotations

import argparse

from .clips import DEFAULT_CLIP_DELAY_S
from .egress import DEFAULT_ASSET_RPS, DEFAULT_BANDWIDTH
from .server import run_emulator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="simulated latency per call")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        help="accepted bearer token (repeatable); default: any gpra_ key of 13+ characters",
    )
    parser.add_argument(
        "--asset-rps",
        type=float,
        default=DEFAULT_ASSET_RPS,
        metavar="R",
        help=f"per-asset request limit, requests/s (default {DEFAULT_ASSET_RPS:g}; 0 disables)",
    )
    parser.add_argument(
        "--bandwidth",
        type=float,
        default=DEFAULT_BANDWIDTH,
        metavar="BYTES_PER_S",
        help=f"response bandwidth limit, bytes/s (default {DEFAULT_BANDWIDTH:,}; 0 disables)",
    )
    parser.add_argument(
        "--clip-delay-s",
        type=float,
        default=DEFAULT_CLIP_DELAY_S,
        metavar="S",
        help=f"minimum time a clip job stays running, seconds (default {DEFAULT_CLIP_DELAY_S:g})",
    )
    args = parser.parse_args(argv)
    run_emulator(
        args.host,
        args.port,
        api_keys=args.api_keys,
        delay_ms=args.delay_ms,
        asset_rps=args.asset_rps,
        bandwidth=args.bandwidth,
        clip_delay_s=args.clip_delay_s,
    )


if __name__ == "__main__":
    main()
