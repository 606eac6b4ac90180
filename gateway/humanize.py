"""Numbers for people, shared by the command line and the HTML pages."""

from __future__ import annotations


def human_bytes(nbytes: float) -> str:
    """A size in binary units, one decimal: ``391.8 KiB``, ``12.0 MiB``; whole bytes below
    1 KiB (``512 B``)."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
