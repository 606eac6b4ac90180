"""Thin HTTP handlers: parse and validate the request, call a service or a builder, write
the answer. One module per group of URLs.

May import: the leaves, ``config``, ``http``, ``services``, ``discovery``, ``storage``,
``upstream``, ``seed``, and for now each other's request parsing (tile paths, job ids:
to move into ``http``).
"""
