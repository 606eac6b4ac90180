"""``python -m gateway.emulator [options]`` is ``geopera-gateway emulator [options]``.

The options are defined once, in :mod:`gateway.cli.main`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the emulator with ``argv`` (default: the command line); returns the exit code."""
    from gateway.cli.main import main as cli_main

    return cli_main(["emulator", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
