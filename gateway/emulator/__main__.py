"""``python -m gateway.emulator [--host H] [--port P] [--delay-ms MS] [--api-key KEY ...]``."""

from __future__ import annotations

import argparse

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
    args = parser.parse_args(argv)
    run_emulator(args.host, args.port, api_keys=args.api_keys, delay_ms=args.delay_ms)


if __name__ == "__main__":
    main()
