"""Logging set-up: one stderr handler whose records pass through the secret redactor."""

from __future__ import annotations

import logging
import sys

from gateway.secrets import RedactingFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level`` with :class:`RedactingFilter` on the handler.

    Replaces handlers on the root logger, so it is safe to call once per process.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
