"""Settings: one TOML file plus environment overrides, validated at start by pydantic models
(each setting declared once, unknown keys refused); every mistake is one
``file: key: what is wrong and how to fix it`` line.

May import: the leaves only (never the HTTP edge).
"""
