"""Conditional requests (RFC 9110 section 13): ``If-None-Match``, parsed one way everywhere.

Every answer with an ``ETag`` (tiles, clip tiles, streamed and stored downloads) evaluates
``If-None-Match`` with :func:`none_match`, which reads aiohttp's own parse
(``request.if_none_match``, the one its ``FileResponse`` uses for stored files): a list of
tags, weak or strong, or ``*``. So a streamed answer and the stored one agree on 304.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.helpers import ETAG_ANY


def none_match(request: web.BaseRequest, etag: str) -> bool:
    """Whether ``If-None-Match`` matches ``etag`` (a quoted entity tag, as sent in
    ``ETag``), so a GET or HEAD is answered 304.

    The weak comparison RFC 9110 section 13.1.2 prescribes for ``If-None-Match``
    (section 13.1.2, "A recipient MUST use the weak comparison function"): ``*``, or any
    listed tag, ``W/`` or not, with the same opaque value. False without the header, and
    for a header aiohttp cannot parse.
    """
    tags = request.if_none_match
    if not tags:
        return False
    value = etag.removeprefix("W/").strip('"')
    return any(tag.value == value or tag.value == ETAG_ANY for tag in tags)
