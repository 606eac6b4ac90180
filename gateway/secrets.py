"""Secret values (the Geopera API key) that cannot leak by accident.

A :class:`Secret` prints as ``'***'`` in ``str``, ``repr``, f-strings and tracebacks; only
:meth:`Secret.reveal` gives the value, and only the upstream client calls it. Every secret
created is registered so :func:`redact` (used by the log filter and on upstream error text)
can scrub it from any string, in clear and in the encodings a careless upstream or library
might echo it in: base64 (RFC 4648 section 4, standard; section 5, URL-safe; with or without
padding, and inside longer encoded text such as ``Bearer <key>``), hexadecimal, and
percent-encoding (RFC 3986 section 2.1).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import weakref
from urllib.parse import quote

REDACTED = "***"

_known: weakref.WeakSet[Secret] = weakref.WeakSet()
_forms: tuple[str, ...] | None = None
"""Every form of every live secret, for :func:`redact` (one log line per request with the
access log): rebuilt after a secret is made or collected."""


def _forget_forms() -> None:
    global _forms
    _forms = None


class Secret:
    """A string that refuses to be printed. Compare with :meth:`reveal`, never ``str()``."""

    __slots__ = ("__forms", "__value", "__weakref__")

    def __init__(self, value: str) -> None:
        self.__value = value
        self.__forms = encoded_forms(value)
        _known.add(self)
        _forget_forms()
        weakref.finalize(self, _forget_forms)

    def reveal(self) -> str:
        """The secret value itself; for the one place that must send it upstream."""
        return self.__value

    def forms(self) -> tuple[str, ...]:
        """Every text form :func:`redact` removes: the value, then its encodings (see
        :func:`encoded_forms`), longest first."""
        return self.__forms

    def __str__(self) -> str:
        return REDACTED

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __reduce__(self) -> tuple[object, ...]:
        # Worker processes receive settings by pickling; keep the value, not the text form.
        return (Secret, (self.__value,))


def derived(secret: Secret, purpose: str) -> Secret:
    """A secret for one ``purpose`` derived from ``secret``: the hex HMAC-SHA256 (RFC 2104) of
    ``purpose`` keyed with the secret's value, itself a :class:`Secret`.

    Whoever holds ``secret`` computes the same value, and the value reveals nothing of
    ``secret``: the replicas of a fleet, which share the Geopera key, authenticate each other
    with ``derived(api_key, "fleet peer")`` without a second secret to distribute.
    """
    digest = hmac.new(secret.reveal().encode(), purpose.encode(), hashlib.sha256)
    return Secret(digest.hexdigest())


def _base64_cores(raw: bytes) -> list[str]:
    """The base64 text that every encoding of ``raw`` contains, wherever ``raw`` sits in a
    longer byte string.

    Base64 maps 3 bytes to 4 characters, so ``raw`` encodes differently at each of the three
    offsets it may start at (mod 3). For each offset, the characters that depend only on
    ``raw`` (not on the bytes before or after it) are kept: character ``i`` covers bits
    ``6i .. 6i+5``, so with ``k`` bytes before, characters ``ceil(8k/6)`` up to
    ``floor(8(k+n)/6)`` (exclusive) do. Padding never falls inside that span, so one core
    matches padded and unpadded text alike.
    """
    cores = []
    for k in range(3):
        encoded = base64.b64encode(b"\0" * k + raw).decode()
        start, end = -(-8 * k // 6), 8 * (k + len(raw)) // 6
        cores.append(encoded[start:end])
    return cores


def encoded_forms(value: str) -> tuple[str, ...]:
    """``value`` and the encodings of it that :func:`redact` removes, longest first.

    Forms: the value itself; percent-encoded (``quote``, and every byte as ``%XX`` in upper
    and lower case); hexadecimal (lower and upper case); base64 standard and URL-safe, at
    each byte offset (:func:`_base64_cores`). Forms shorter than 8 characters are left out
    (they would match ordinary text); an empty value has none.
    """
    if not value:
        return ()
    raw = value.encode()
    forms = {value, quote(value, safe="")}
    forms |= {"".join(f"%{b:02X}" for b in raw), "".join(f"%{b:02x}" for b in raw)}
    forms |= {raw.hex(), raw.hex().upper()}
    for core in _base64_cores(raw):
        forms |= {core, core.replace("+", "-").replace("/", "_")}
    return tuple(sorted((f for f in forms if len(f) >= 8), key=len, reverse=True))


def redact(text: str) -> str:
    """``text`` with every registered secret, in clear or encoded (:func:`encoded_forms`),
    replaced by ``***``. Empty secrets are ignored."""
    global _forms
    forms = _forms
    if forms is None:
        forms = _forms = tuple(form for secret in list(_known) for form in secret.forms())
    for form in forms:
        if form in text:
            text = text.replace(form, REDACTED)
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
