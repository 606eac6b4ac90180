"""Minimal request-body validation with pydantic-v2-like error entries.

Only what the emulated operations need: required/optional fields of type int, str or bool,
inclusive integer bounds and a fixed set of (case-insensitive) string choices. Types are
checked strictly: ``"13"`` is not an integer and ``true`` is not an integer. ``null`` counts
as absent for optional fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .protocol import RequestValidationError, field_error

_TYPE_ERRORS: dict[type, tuple[str, str]] = {
    int: ("Input should be a valid integer", "int_type"),
    str: ("Input should be a valid string", "string_type"),
    bool: ("Input should be a valid boolean", "bool_type"),
}


@dataclass(frozen=True, slots=True)
class Field:
    """One body field: name, Python type (int, str or bool) and optional constraints."""

    name: str
    kind: type
    required: bool = False
    ge: int | None = None
    le: int | None = None
    choices: tuple[str, ...] | None = None


def _check(field: Field, value: Any) -> tuple[Any, dict[str, Any] | None]:
    is_bool = isinstance(value, bool)
    if (field.kind is int and (is_bool or not isinstance(value, int))) or (
        field.kind is not int and not isinstance(value, field.kind)
    ):
        msg, type_ = _TYPE_ERRORS[field.kind]
        return None, field_error(field.name, msg, type_)
    if field.ge is not None and value < field.ge:
        msg = f"Input should be greater than or equal to {field.ge}"
        return None, field_error(field.name, msg, "greater_than_equal")
    if field.le is not None and value > field.le:
        msg = f"Input should be less than or equal to {field.le}"
        return None, field_error(field.name, msg, "less_than_equal")
    if field.choices is not None:
        value = value.lower()
        if value not in field.choices:
            quoted = [f"'{c}'" for c in field.choices]
            msg = f"Input should be {', '.join(quoted[:-1])} or {quoted[-1]}"
            return None, field_error(field.name, msg, "literal_error")
    return value, None


def validate_body(body: Mapping[str, Any], fields: Sequence[Field]) -> dict[str, Any]:
    """Return ``{name: value}`` for the declared fields present in ``body`` (unknown keys ignored).

    String choices come back lower-cased. Raises :class:`RequestValidationError` listing every
    failing field (``type`` ``missing``, ``int_type``, ``string_type``, ``bool_type``,
    ``greater_than_equal``, ``less_than_equal`` or ``literal_error``).
    """
    values: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for field in fields:
        value = body.get(field.name)
        if value is None:
            if field.required:
                errors.append(field_error(field.name, "Field required", "missing"))
            continue
        checked, error = _check(field, value)
        if error is not None:
            errors.append(error)
        else:
            values[field.name] = checked
    if errors:
        raise RequestValidationError(errors)
    return values
