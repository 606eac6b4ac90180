"""The building blocks of the config schema: the :class:`Table` base model, strict TOML
scalar types, the :class:`Env` override marker, and the translation of a pydantic
``ValidationError`` into one :class:`ConfigError` line ``<file>: <key>: <problem>``.

Each setting is declared once, as a field of a :class:`Table` subclass: its TOML name (the
field name, or its ``alias``), its type, its default and its constraint (``annotated_types``
``Gt``/``Ge``/``Le``, or a validator that raises :func:`invalid`). Unknown keys are refused
(``extra="forbid"``), so a typo is an error naming the allowed keys.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import annotated_types
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError


class ConfigError(Exception):
    """A configuration file or environment value is missing or wrong.

    The message is meant for a person at a terminal: ``<file>: <key>: <what is wrong>``.
    It never contains the API key.
    """


class Table(BaseModel):
    """One TOML table of the config file: unknown keys are refused, values are frozen.

    Subclass it for a new table; see :class:`gateway.config.settings.Settings` for how a
    new ``[section]`` is added (one field there).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


@dataclass(frozen=True, slots=True)
class Env:
    """``Annotated`` marker: the environment variable ``name`` overrides this setting.

    ``parse`` turns the variable's text into the value (default: the stripped text; an empty
    variable counts as unset). It raises :class:`ConfigError` naming the variable. A value
    TOML cannot produce (a :class:`~pathlib.Path`) is taken as it is: that is how an
    environment path stays relative to the working directory rather than the config file.
    """

    name: str
    parse: Callable[[str], object] = str.strip


Str = Annotated[str, Strict()]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
"""A number: TOML integers are accepted and become floats; booleans never are numbers."""
Bool = Annotated[bool, Strict()]
PositiveInt = Annotated[int, Strict(), annotated_types.Gt(0)]
PositiveFloat = Annotated[float, Strict(), annotated_types.Gt(0)]
NonNegativeInt = Annotated[int, Strict(), annotated_types.Ge(0)]
NonNegativeFloat = Annotated[float, Strict(), annotated_types.Ge(0)]


def invalid(problem: str, key: str | None = None) -> PydanticCustomError:
    """The error a validator raises: ``problem`` says what is wrong and how to fix it.

    ``key`` replaces the key path pydantic would report (for rules over several tables, such
    as ``layers[1].name`` being a duplicate).
    """
    context: dict[str, Any] = {"problem": problem}
    if key is not None:
        context["key"] = key
    return PydanticCustomError("config", "{problem}", context)


def _config_path(value: object, info: ValidationInfo) -> object:
    """A TOML string (``~`` expanded) as a path; a relative one under the config file's
    directory (``context["base"]``). A :class:`Path` (from the environment or the code, never
    from TOML) is kept as it is."""
    if isinstance(value, str):
        base = (info.context or {}).get("base", Path())
        return base / Path(value).expanduser()
    if isinstance(value, Path):
        return value
    raise invalid(f"expected a path (a string), got {_type_name(value)}")


def optional_path(value: object, info: ValidationInfo) -> Path | None:
    """Like :data:`ConfigPath`, with ``""`` (or nothing) meaning unset (None)."""
    if value is None or value == "":
        return None
    path = _config_path(value, info)
    assert isinstance(path, Path)
    return path


ConfigPath = Annotated[Path, BeforeValidator(_config_path)]
"""A path setting: relative to the config file's directory when written in the file."""
OptionalPath = Annotated[Path | None, BeforeValidator(optional_path)]
"""A path setting that may be unset (``""`` or absent: None)."""


def list_of(test: Callable[[str], bool], rule: str, *, empty_ok: bool = False) -> BeforeValidator:
    """A validator for a list of strings that each pass ``test``; the message is ``rule``
    (say what a valid list is) and the value given. None (unset) passes through."""

    def check(value: object) -> object:
        if value is None:
            return None
        if (
            not isinstance(value, list | tuple | set | frozenset)
            or not (empty_ok or value)
            or not all(isinstance(v, str) and v and test(v) for v in value)
        ):
            raise invalid(f"{rule}, got {value!r}")
        return value

    return BeforeValidator(check)


def section() -> Any:
    """The default of a section field: an absent ``[section]`` is validated as an empty one
    (so its defaults apply and its required keys are reported under the section's name)."""
    return Field(default_factory=dict, validate_default=True)


def config_error(error: ValidationError, source: str, root: type[BaseModel]) -> ConfigError:
    """The first problem of ``error`` as ``<source>: <key>: <problem>``.

    ``root`` is the model validated (its fields name the keys, and a discriminated union's
    tag in the error location is skipped).
    """
    first = error.errors(include_url=False)[0]
    context = first.get("ctx") or {}
    key, where, field = _key_path(root, first["loc"])
    problem = _problem(first["type"], first.get("input"), context, where, field)
    if first["type"] == "union_tag_invalid":
        key = f"{key}.kind" if key else "kind"
    key = context.get("key", key)
    return ConfigError(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "frozen_set_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def _type_name(value: object) -> str:
    """How a TOML value's type reads in a message (``str``, ``a boolean``)."""
    return "a boolean" if isinstance(value, bool) else type(value).__name__


def _problem(
    kind: str,
    value: object,
    context: dict[str, Any],
    where: type[BaseModel] | None,
    field: FieldInfo | None,
) -> str:
    if kind == "config":
        return str(context["problem"])
    if kind == "extra_forbidden":
        allowed = sorted(_toml_names(where)) if where is not None else []
        return f"unknown key; allowed keys are {', '.join(allowed)}"
    if kind == "missing":
        hint = field.description if field is not None and field.description else "set it"
        return f"required: {hint}"
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {_type_name(value)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        low, high = _bounds(field)
        if low is not None and high is not None:
            return f"must be {_number(low)} to {_number(high)}, got {value}"
        if kind == "greater_than":
            return f"must be greater than {_number(context['gt'])}, got {value}"
        if kind == "greater_than_equal":
            return f"must be {_number(context['ge'])} or more, got {value}"
        bound = context.get("lt", context.get("le"))
        relation = "less than" if kind == "less_than" else "at most"
        return f"must be {relation} {_number(bound)}, got {value}"
    if kind == "literal_error":
        return f"must be one of {context['expected']}, got {value!r}"
    if kind == "union_tag_invalid":
        return f"must be {context['expected_tags'].replace(', ', ' or ')}, got {value_tag(value)}"
    if kind == "union_tag_not_found":
        return f"expected a table, got {_type_name(value)}"
    return f"{kind.replace('_', ' ')}: got {value!r}"


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def value_tag(value: object) -> str:
    """The ``kind`` of a table as a message quotes it."""
    return repr(value.get("kind")) if isinstance(value, dict) else repr(value)


def _bounds(field: FieldInfo | None) -> tuple[object, object]:
    """The lower and upper bound a numeric field declares (None where it has none)."""
    low = high = None
    metadata = [*field.metadata, *_unwrap(field.annotation)[1]] if field is not None else []
    for item in metadata:
        if isinstance(item, annotated_types.Ge | annotated_types.Gt):
            low = getattr(item, "ge", getattr(item, "gt", None))
        elif isinstance(item, annotated_types.Le | annotated_types.Lt):
            high = getattr(item, "le", getattr(item, "lt", None))
    return low, high


def _toml_names(model: type[BaseModel]) -> list[str]:
    """The keys a table model accepts (aliases where set)."""
    return [info.alias or name for name, info in model.model_fields.items()]


def _field_named(model: type[BaseModel], key: str) -> FieldInfo | None:
    for name, info in model.model_fields.items():
        if (info.alias or name) == key:
            return info
    return None


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """``annotation`` without ``Annotated`` layers and ``| None``, plus the metadata."""
    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = typing.get_args(annotation)
            metadata += extra
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation, metadata
            annotation = members[0]
        else:
            return annotation, metadata


def _tags(annotation: Any) -> dict[str, Any]:
    """A discriminated union's members by ``Tag``."""
    found = {}
    for member in typing.get_args(annotation):
        if typing.get_origin(member) is Annotated:
            inner, *extra = typing.get_args(member)
            for item in extra:
                tag = getattr(item, "tag", None)
                if isinstance(tag, str):
                    found[tag] = inner
    return found


_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _key_path(
    root: type[BaseModel], loc: Sequence[int | str]
) -> tuple[str, type[BaseModel] | None, FieldInfo | None]:
    """The TOML key of error location ``loc`` (``layers[0].url``), the table model the last
    key belongs to, and that key's field (None when unknown)."""
    text = ""
    current: Any = root
    where: type[BaseModel] | None = None
    field: FieldInfo | None = None
    for item in loc:
        current, _ = _unwrap(current)
        origin = typing.get_origin(current)
        if isinstance(item, int) and origin in (list, tuple, set, frozenset):
            text += f"[{item}]"
            current = typing.get_args(current)[0] if typing.get_args(current) else Any
            continue
        if isinstance(item, str) and item in _tags(current):
            current = _tags(current)[item]
            continue
        name = str(item)
        if not set(name) <= _BARE_KEY or not name:
            name = f'"{name}"'
        text = f"{text}.{name}" if text else name
        if isinstance(current, type) and issubclass(current, BaseModel):
            where = current
            field = _field_named(current, str(item))
            current = field.annotation if field is not None else Any
        elif origin in (dict, collections.abc.Mapping):
            current = typing.get_args(current)[1] if typing.get_args(current) else Any
        else:
            current = Any
    return text, where, field
