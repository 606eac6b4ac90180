"""The gateway's HTML pages (the map viewer, the downloads page): filling their templates.

Templates are package data (``gateway/viewer/*.html``) with ``{{name}}`` placeholders; every
value is escaped for its context by the route that builds it, before :func:`fill`.
"""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def fill(text: str, values: dict[str, str]) -> str:
    """Replace each ``{{name}}`` in ``text`` once (replacements are not scanned again).

    Raises:
        KeyError: a placeholder without a value.
    """
    return _PLACEHOLDER.sub(lambda m: values[m[1]], text)
