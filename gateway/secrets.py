"""Secret values (the Geopera API key) that cannot leak by accident.

A :class:`Secret` prints as ``'***'`` in ``str``, ``repr``, f-strings and tracebacks; only
:meth:`Secret.reveal` gives the value, and only the upstream client calls it. Every secret
created is registered so :func:`redact` (used by the log filter and on upstream error text)
can scrub it from any string.
"""

from __future__ import annotations

import logging
import weakref

REDACTED = "***"

_known: weakref.WeakSet[Secret] = weakref.WeakSet()


class Secret:
    """A string that refuses to be printed. Compare with :meth:`reveal`, never ``str()``."""

    __slots__ = ("__value", "__weakref__")

    def __init__(self, value: str) -> None:
        self.__value = value
        _known.add(self)

    def reveal(self) -> str:
        """The secret value itself; for the one place that must send it upstream."""
        return self.__value

    def __str__(self) -> str:
        return REDACTED

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __reduce__(self) -> tuple[object, ...]:
        # Worker processes receive settings by pickling; keep the value, not the text form.
        return (Secret, (self.__value,))


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``. Empty secrets are ignored."""
    for secret in list(_known):
        value = secret.reveal()
        if value and value in text:
            text = text.replace(value, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Logging filter that renders each record and scrubs registered secrets from it.

    Attach it to handlers (not loggers) so records from every library pass through it,
    including exception tracebacks, which are formatted and redacted here too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
            record.exc_info = None
        return True
