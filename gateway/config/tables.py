"""Typed reading of TOML tables, with errors that name the file, the key and the fix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ConfigError(Exception):
    """A configuration file or environment value is missing or wrong.

    The message is meant for a person at a terminal: ``<file>: <key>: <what is wrong>``.
    It never contains the API key.
    """


class TableReader:
    """Typed access to one TOML table that reports errors as ``file: key: problem``."""

    def __init__(self, source: str, prefix: str, table: Mapping[str, Any]) -> None:
        self.source, self.prefix, self.table = source, prefix, table

    def error(self, key: str, problem: str) -> ConfigError:
        """A :class:`ConfigError` reading ``<file>: <table>.<key>: <problem>``."""
        name = f"{self.prefix}.{key}" if self.prefix else key
        return ConfigError(f"{self.source}: {name}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        """``key``'s value checked against ``kind`` (ints accepted as floats, booleans never
        as numbers), or ``default`` when absent. Raises ConfigError on a wrong type."""
        if key not in self.table:
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {_kind_names(kinds)}, got a boolean")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {_kind_names(kinds)}, got {type(value).__name__}")
        return value

    def positive(self, key: str, kind: type, default: Any) -> Any:
        """Like :meth:`get`, and the value must be greater than 0."""
        value = self.get(key, kind, default)
        if value <= 0:
            raise self.error(key, f"must be greater than 0, got {value}")
        return value

    def reject_unknown(self, allowed: set[str]) -> None:
        """Raise ConfigError for the first key of the table not in ``allowed`` (typos)."""
        for key in self.table:
            if key not in allowed:
                raise self.error(key, f"unknown key; allowed keys are {', '.join(sorted(allowed))}")


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
