"""Thin HTTP handlers: parse and validate the request, call a service or a builder, write
the answer. One module per group of URLs.

May import: the leaves, ``config``, ``http``, ``services``, ``discovery``, ``storage``,
``upstream``, ``seed``; never another route module.
"""
