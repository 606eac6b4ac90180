"""Settings: one TOML file plus environment overrides, validated at start.

Every setting is declared once, as a field of a pydantic model below: its TOML name, type,
default and constraint (and, with an :class:`~gateway.config.tables.Env` marker, the
environment variable that overrides it). :class:`Settings` is the whole file, one field per
``[section]``; the README's configuration reference lists them all.

The Geopera API key never lives in the file: it comes from ``GEOPERA_API_KEY`` or from the
file named by ``upstream.api_key_file`` / ``GEOPERA_API_KEY_FILE``. ``GEOPERA_BASE_URL``
overrides ``upstream.base_url``, ``GEOPERA_CACHE_DIR`` overrides ``cache.directory``, and
``GEOPERA_HOST`` / ``GEOPERA_PORT`` override ``server.host`` / ``server.port`` (a container
sets them once; ``--host`` and ``--port`` still win).

Relative paths in a config file (``cache.directory``, ``cache.state_directory``,
``downloads.directory``, ``viewer.assets_dir``, ``upstream.api_key_file``), and the default
cache directory, resolve against the directory holding the file, whatever directory a command
runs from; paths from the environment resolve against the working directory, as a shell user
expects. The packaged demo config (no file given) keeps its paths relative to the working
directory.

Every problem raises :class:`ConfigError` whose message names the file, the key and the fix.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import annotated_types
from limits import parse
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.config.layers import LayerTable, layer_map
from gateway.config.tables import (
    Bool,
    ConfigError,
    ConfigPath,
    Env,
    Float,
    Int,
    NonNegativeFloat,
    NonNegativeInt,
    OptionalPath,
    PositiveFloat,
    PositiveInt,
    Str,
    Table,
    config_error,
    invalid,
    list_of,
    optional_path,
    section,
)
from gateway.layers import Layer
from gateway.secrets import Secret

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
"""An IP network (a CIDR, or one address as a /32 or /128)."""


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings (or bare addresses) to networks. Raises ValueError on a bad one."""
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


DEFAULT_CONFIG_NAME = "gateway.toml"
DEFAULT_CACHE_DIR = ".cache/geopera-gateway/tiles"

EMULATOR_PROBLEM_BASE = "https://docs.geopera.com/errors/"
"""Prefix of the problem ``type`` URIs the bundled emulator sends (our choice: the Geopera
docs say every error is problem+json but publish no list of types)."""

ThrottleScope = Literal["asset", "operation", "organisation"]
THROTTLE_SCOPES: tuple[ThrottleScope, ...] = ("asset", "operation", "organisation")

DEFAULT_THROTTLE_SCOPES: Mapping[str, ThrottleScope] = MappingProxyType(
    {
        EMULATOR_PROBLEM_BASE + "asset-rate-limited": "asset",
        EMULATOR_PROBLEM_BASE + "bandwidth-circuit-open": "organisation",
    }
)
DEFAULT_SCOPE_MISSING_TYPES = frozenset({EMULATOR_PROBLEM_BASE + "insufficient-scope"})
DEFAULT_SOURCE_UNKNOWN_TYPES = frozenset({EMULATOR_PROBLEM_BASE + "cog-not-found"})

SCOPES = frozenset({"tiles", "downloads", "admin"})
"""The scopes a client token may carry."""
PROJECT_ID = re.compile(r"[!-~]{1,128}")
"""A Geopera project id as a token's ``projects`` names it: 1-128 printable ASCII characters
without spaces (the docs show UUIDs; the emulator uses ``demo`` and ``survey``)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")

MAPLIBRE_VERSION = "5.6.0"
"""The MapLibre GL JS release of the viewer's default URLs and built-in SRI hashes."""
MAPLIBRE_JS = f"https://unpkg.com/maplibre-gl@{MAPLIBRE_VERSION}/dist/maplibre-gl.js"
MAPLIBRE_JS_INTEGRITY = "sha384-GfxBM9x46BaAFxtCq39Fxir8fNZ4VDnwgfi6Kzi5/F1tAFsm0amuuV8kd+Pxzuf/"
MAPLIBRE_CSS = f"https://unpkg.com/maplibre-gl@{MAPLIBRE_VERSION}/dist/maplibre-gl.css"
MAPLIBRE_CSS_INTEGRITY = "sha384-Nq6PQ+9vJPvw7U/VfDELyrWoGQMsy0gi6QShhaSrGzkpF5KkM40csg2leky+YMTd"


# --- rules shared by several settings ------------------------------------------------------


def _rate_string(value: str | None) -> str | None:
    """A ``limits`` rate string (``"100/second"``)."""
    if value is not None:
        try:
            parse(value)
        except ValueError:
            raise invalid(f"expected a rate like '100/second', got {value!r}") from None
    return value


def _env_port(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"GEOPERA_PORT: must be a port number 0..65535, got {text!r}")
    return int(text)


def _env_path(text: str) -> Path:
    """A path from the environment: relative to the working directory."""
    return Path(text).expanduser()


# --- [upstream] --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProblemTypes:
    """How the gateway reads the RFC 9457 ``type`` of upstream errors (``[upstream]`` keys
    ``throttle_scopes``, ``scope_missing_types``, ``source_unknown_types``).

    The Geopera docs say every error is ``application/problem+json`` (seeds ``001``
    "Clipping", ``004`` "Python recipes") without listing type URIs, so the defaults are
    the bundled emulator's; set them to what your Geopera deployment sends.

    Attributes:
        throttle_scopes: 429 type URI -> what it throttles: ``asset``, ``operation`` or
            ``organisation``. A 429 whose type is not here pauses its whole operation.
        scope_missing: 403 types meaning "the key lacks a scope" even on a clip operation
            that names a job (any other 403 there means "not your organisation's job").
        source_unknown: 404 types meaning "this COG is unknown" rather than "no data here".
    """

    throttle_scopes: Mapping[str, str] = field(default_factory=lambda: DEFAULT_THROTTLE_SCOPES)
    scope_missing: frozenset[str] = DEFAULT_SCOPE_MISSING_TYPES
    source_unknown: frozenset[str] = DEFAULT_SOURCE_UNKNOWN_TYPES


def _base_url(value: str) -> str:
    if not value:
        raise invalid(f"required: {_BASE_URL_HINT}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid(f"must be an http(s) URL with a host, got {value!r}")
    return value.rstrip("/")


_BASE_URL_HINT = (
    "set it to https://api.geopera.com or the emulator's URL, or export GEOPERA_BASE_URL"
)


def _not_in_file(value: object) -> object:
    if not isinstance(value, Secret):  # TOML gives a string; only the loader sets a Secret
        raise invalid(
            "the API key must not be written in a config file; "
            "set GEOPERA_API_KEY or upstream.api_key_file instead"
        )
    return value


_TypeURIs = Annotated[
    frozenset[str], list_of(bool, "a list of problem type URIs (strings)", empty_ok=True)
]


class UpstreamSettings(Table):
    """``[upstream]``: how to reach Geopera: base URL, credentials, HTTP client limits and
    how its error types are read.

    Timeouts are in seconds; ``max_connections`` bounds each upstream connection pool.
    ``api_key`` is never read from the file (:func:`load_settings` sets it).
    """

    base_url: Annotated[
        Str,
        Env("GEOPERA_BASE_URL"),
        AfterValidator(_base_url),
    ] = Field(description=_BASE_URL_HINT)
    api_key_file: Annotated[OptionalPath, Env("GEOPERA_API_KEY_FILE", _env_path)] = None
    api_key: Annotated[Secret, BeforeValidator(_not_in_file)] = Field(
        default_factory=lambda: Secret(""), repr=False
    )
    connect_timeout_s: PositiveFloat = 5.0
    read_timeout_s: PositiveFloat = 30.0
    max_connections: PositiveInt = 64
    throttle_scopes: Mapping[str, ThrottleScope] = Field(
        default_factory=lambda: dict(DEFAULT_THROTTLE_SCOPES)
    )
    """429 problem type URI -> ``asset``, ``operation`` or ``organisation``."""
    scope_missing_types: _TypeURIs = DEFAULT_SCOPE_MISSING_TYPES
    source_unknown_types: _TypeURIs = DEFAULT_SOURCE_UNKNOWN_TYPES
    check_sources: Bool = True
    """Ask at start (``cog.thumbnail``) whether each layer's COG exists."""

    @cached_property
    def problem_types(self) -> ProblemTypes:
        """The error-type settings as the upstream client takes them."""
        return ProblemTypes(
            dict(self.throttle_scopes), self.scope_missing_types, self.source_unknown_types
        )


# --- [server] ----------------------------------------------------------------------------


def _networks(value: object) -> tuple[Network, ...]:
    if not isinstance(value, list | tuple):
        raise invalid(f"expected a list of IP addresses or CIDRs, got {value!r}")
    try:
        return parse_networks(value)
    except (TypeError, ValueError) as exc:
        raise invalid(f"must be IP addresses or CIDRs: {exc}") from None


def _public_url(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise invalid(f"expected a string, got {type(value).__name__}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise invalid(f"must be an http(s) URL like https://tiles.example.org, got {value!r}")
    return value.rstrip("/")


def _origins(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise invalid(f"expected a list of origins, got {value!r}")
    for origin in value:
        parts = urlsplit(origin) if isinstance(origin, str) else None
        if origin != "*" and (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
        ):
            raise invalid(f"each origin is '*' or like https://app.example.org, got {origin!r}")
    return tuple(o.rstrip("/") for o in value)


class ServerSettings(Table):
    """``[server]``: where the gateway listens (``host``, TCP ``port``), whom it trusts for
    ``X-Forwarded-For`` (``trusted_proxies``, CIDRs) and whether it writes an access log."""

    host: Annotated[Str, Env("GEOPERA_HOST")] = "127.0.0.1"
    port: Annotated[
        Int, annotated_types.Ge(0), annotated_types.Le(65535), Env("GEOPERA_PORT", _env_port)
    ] = 8080
    trusted_proxies: Annotated[tuple[Network, ...], BeforeValidator(_networks)] = ()
    access_log: Bool = True
    public_url: Annotated[str | None, BeforeValidator(_public_url)] = None
    """The URL callers reach the gateway at (behind a proxy); None: from each request."""
    cors_origins: Annotated[tuple[str, ...], BeforeValidator(_origins)] = ("*",)
    header_timeout_s: PositiveFloat = 10.0
    """Longest a connection may take to deliver a complete request head, from its opening
    or its last response, seconds; then it is closed (slowloris defence, and the keep-alive
    idle timeout)."""
    shutdown_timeout_s: PositiveFloat = 10.0
    """On SIGTERM, longest wait for requests in flight before connections are closed,
    seconds (streamed downloads are cut at once; clients resume with Range)."""


# --- [viewer] ----------------------------------------------------------------------------


def _assets_dir(value: object, info: ValidationInfo) -> Path | None:
    if value is None or value == "":
        return None
    directory = optional_path(value, info)
    if directory is not None and not (directory / "maplibre-gl.js").is_file():
        raise invalid(
            f"{str(directory)!r} must hold maplibre-gl.js and maplibre-gl.css "
            "(for example node_modules/maplibre-gl/dist)"
        )
    return directory


class ViewerSettings(Table):
    """``[viewer]``: where the map page loads MapLibre GL JS from: URLs with Subresource
    Integrity hashes, or ``assets_dir``, a local directory holding ``maplibre-gl.js`` and
    ``maplibre-gl.css`` that the gateway serves itself (for networks without internet
    access).

    An integrity hash left unset is the built-in one for the built-in URL, and none for
    another URL.
    """

    maplibre_js: Str = MAPLIBRE_JS
    maplibre_js_integrity: Str | None = Field(None, validate_default=True)
    maplibre_css: Str = MAPLIBRE_CSS
    maplibre_css_integrity: Str | None = Field(None, validate_default=True)
    assets_dir: Annotated[Path | None, BeforeValidator(_assets_dir)] = None

    @field_validator("maplibre_js_integrity", "maplibre_css_integrity", mode="before")
    @classmethod
    def _built_in_integrity(cls, value: object, info: ValidationInfo) -> object:
        if value is not None:
            return value
        if info.field_name == "maplibre_js_integrity":
            return MAPLIBRE_JS_INTEGRITY if info.data.get("maplibre_js") == MAPLIBRE_JS else None
        return MAPLIBRE_CSS_INTEGRITY if info.data.get("maplibre_css") == MAPLIBRE_CSS else None


# --- [[tokens]], [clients] ---------------------------------------------------------------


def _required_text(what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not value:
            raise invalid(f"required: {what}")
        return value

    return AfterValidator(check)


def _sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise invalid(f"required: {_SHA256_RULE}")
    return value


_SHA256_RULE = (
    "64 lower-case hex digits, the SHA-256 of the token (geopera-gateway token create prints it)"
)
_SCOPES_RULE = f"a non-empty list of {', '.join(sorted(SCOPES))}"
_PROJECTS_RULE = "a non-empty list of Geopera project ids (1-128 printable characters, no spaces)"


class TokenSettings(Table):
    """One client token (``[[tokens]]``), configured by the SHA-256 hex digest of its value.

    ``scopes`` is a subset of ``tiles``, ``downloads``, ``admin``; ``layers`` limits the
    private layers it may read (None: all); ``rate_limit`` overrides ``clients.rate_limit``;
    ``projects`` limits the Geopera projects whose clip jobs it may list and fetch (None:
    every project of the organisation).
    """

    name: Annotated[Str, _required_text("who holds this token")] = Field(
        description="who holds this token"
    )
    sha256: Annotated[Str, AfterValidator(_sha256)] = Field(description=_SHA256_RULE)
    scopes: Annotated[frozenset[str], list_of(SCOPES.__contains__, _SCOPES_RULE)] = Field(
        description=_SCOPES_RULE
    )
    layers: Annotated[
        frozenset[str] | None, list_of(bool, "a list of layer names", empty_ok=True)
    ] = None
    rate_limit: Annotated[Str | None, AfterValidator(_rate_string)] = None
    projects: Annotated[
        frozenset[str] | None, list_of(lambda p: bool(PROJECT_ID.fullmatch(p)), _PROJECTS_RULE)
    ] = None


def _client_rate(value: object) -> object:
    return None if value in ("", "off") else value


class ClientSettings(Table):
    """``[clients]``: the per-caller request limit, a ``limits`` rate string
    (``"100/second"``); ``"off"`` (None) = no limit."""

    rate_limit: Annotated[
        Str | None, BeforeValidator(_client_rate), AfterValidator(_rate_string)
    ] = "100/second"


# --- [limits] ----------------------------------------------------------------------------

OPERATION_RPS, OPERATION_BURST = 20.0, 40.0
ASSET_RPS, ASSET_BURST = 10.0, 20.0


def _burst(value: object, info: ValidationInfo, rps_key: str, floor: float) -> object:
    """A burst left unset: the larger of ``floor`` and the rate (one second's worth)."""
    if value is not None:
        return value
    rps = info.data.get(rps_key)
    return max(floor, rps) if isinstance(rps, float) else floor


class Rate(Table):
    """Requests per second with a burst size (token bucket capacity); a
    ``[limits.operations."<operation id>"]`` table."""

    rps: PositiveFloat = OPERATION_RPS
    burst: PositiveFloat = Field(None, validate_default=True)
    """Default: the larger of 40 and ``rps``."""

    @field_validator("burst", mode="before")
    @classmethod
    def _default_burst(cls, value: object, info: ValidationInfo) -> object:
        return _burst(value, info, "rps", OPERATION_BURST)


class LimitSettings(Table):
    """``[limits]``: upstream protection (see the README).

    Rates are requests per second; sizes bytes; times seconds. A burst left unset is the
    larger of its default and its rate.
    """

    operation_rps: PositiveFloat = OPERATION_RPS
    operation_burst: PositiveFloat = Field(None, validate_default=True)
    operations: Mapping[str, Rate] = Field(default_factory=dict)
    """Per-operation rates overriding ``operation_rps`` / ``operation_burst``."""
    asset_rps: PositiveFloat = ASSET_RPS
    asset_burst: PositiveFloat = Field(None, validate_default=True)
    bytes_per_s: NonNegativeFloat = 25_000_000.0
    """Upstream egress, bytes/s; 0 = off."""
    bytes_burst: Float = Field(None, validate_default=True)
    """Default: ``bytes_per_s``."""
    max_concurrent: PositiveInt = 16
    max_wait_s: PositiveFloat = 10.0
    daily_egress_bytes: NonNegativeInt = 0
    """0 = no daily budget."""
    retry_attempts: PositiveInt = 3
    retry_initial_s: PositiveFloat = 0.1
    retry_max_s: PositiveFloat = 2.0
    failure_threshold: PositiveInt = Field(5, alias="breaker_failures")
    failure_window_s: PositiveFloat = Field(30.0, alias="breaker_window_s")
    open_s: PositiveFloat = Field(30.0, alias="breaker_open_s")
    max_retry_after_s: PositiveFloat = 3600.0

    @field_validator("operation_burst", "asset_burst", "bytes_burst", mode="before")
    @classmethod
    def _default_burst(cls, value: object, info: ValidationInfo) -> object:
        if info.field_name == "operation_burst":
            return _burst(value, info, "operation_rps", OPERATION_BURST)
        if info.field_name == "asset_burst":
            return _burst(value, info, "asset_rps", ASSET_BURST)
        return info.data.get("bytes_per_s", 0.0) if value is None else value

    @cached_property
    def operation_default(self) -> Rate:
        """The rate of an operation without its own ``[limits.operations]`` table."""
        return Rate(rps=self.operation_rps, burst=self.operation_burst)

    @cached_property
    def asset(self) -> Rate:
        """The rate of one asset (COG URL, clip job)."""
        return Rate(rps=self.asset_rps, burst=self.asset_burst)

    def rate_for(self, operation: str) -> Rate:
        """The configured rate of ``operation`` (or the default)."""
        return self.operations.get(operation, self.operation_default)


# --- [downloads], [cache] ----------------------------------------------------------------


def _organization(value: str | None) -> str | None:
    if value is not None and not PROJECT_ID.fullmatch(value):
        raise invalid(
            f"a Geopera organisation id (1-128 printable characters, no spaces), got {value!r}"
        )
    return value


class DownloadSettings(Table):
    """``[downloads]``: the download store: a directory of complete clip files with an LRU
    size limit, and the media types a clip file may have (the Clipping guide, seeds ``001``:
    ``image/tiff``); a download answered with another type is refused and not stored."""

    directory: ConfigPath = Field(description="a directory for the download store")
    """Default: beside the tile cache, ``<cache.directory>-downloads``."""
    size_limit_bytes: PositiveInt = 10 << 30
    content_types: Annotated[
        frozenset[str],
        list_of(
            lambda t: bool(_MEDIA_TYPE.fullmatch(t)),
            'a non-empty list of lower-case media types like "image/tiff"',
        ),
    ] = frozenset({"image/tiff"})
    organization_id: Annotated[Str | None, AfterValidator(_organization)] = None
    """The Geopera organisation whose clip jobs ``GET /downloads`` lists (``clip.jobs.list``
    needs it, Clipping guide); None: no listing."""
    list_ttl_s: PositiveFloat = 10.0
    """How long one page of the upstream job listing is reused, seconds."""


class CacheSettings(Table):
    """``[cache]``: the tile cache: a diskcache directory with an LRU size limit plus a
    memory hot tier, and the shared-state directory (breakers, buckets, budget).

    Sizes are bytes; ``empty_ttl_s`` is the negative TTL (seconds) for tiles the upstream
    reported empty.
    """

    directory: Annotated[ConfigPath, Env("GEOPERA_CACHE_DIR", _env_path)] = Field(
        DEFAULT_CACHE_DIR, validate_default=True
    )
    state_directory: ConfigPath = Field("", validate_default=True)
    """Default: beside the cache, ``<directory>-state``."""
    size_limit_bytes: PositiveInt = 1 << 30
    memory_bytes: NonNegativeInt = 256 << 20
    """Per worker process; 0 = no memory tier. 256 MiB holds a few thousand imagery tiles
    (80 KB) or ten thousand small ones: what a city's map users keep asking for."""
    empty_ttl_s: PositiveInt = 300

    @field_validator("state_directory", mode="before")
    @classmethod
    def _beside_cache(cls, value: object, info: ValidationInfo) -> object:
        directory = info.data.get("directory")
        if value == "" and isinstance(directory, Path):
            return directory.parent / (directory.name + "-state")
        return value


# --- the file ----------------------------------------------------------------------------


# --- [state] -----------------------------------------------------------------------------

REDIS_SCHEMES = ("redis", "rediss", "unix")
"""URL schemes of ``state.redis_url`` (redis-py's ``from_url``)."""


def _redis_url(value: object) -> Secret | None:
    """A Redis URL (a string, or a :class:`~gateway.secrets.Secret` from code) as a
    ``Secret`` (it may hold a password); the URL is never echoed in the error."""
    if isinstance(value, Secret):
        value = value.reveal()
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise invalid("must be a Redis URL (a string)")
    parts = urlsplit(value)
    if parts.scheme not in REDIS_SCHEMES or (parts.scheme != "unix" and not parts.hostname):
        raise invalid(
            'must look like "redis://HOST:6379/0" or "rediss://HOST:6380/0" (or '
            "unix:///path/to/redis.sock); check it or GATEWAY_REDIS_URL"
        )
    return Secret(value)


def _peer_url(value: str | None) -> str | None:
    """``state.peer_url``: an http(s) URL with a host and nothing after the port, without
    its trailing slash (other replicas append ``/fleet/downloads/...``)."""
    if value is None or value == "":
        return None
    parts = urlsplit(value)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.path.strip("/")
        or parts.query
        or parts.fragment
    ):
        raise invalid(
            "must be this replica's own address as the other replicas reach it, like "
            '"http://10.0.0.5:8080" (scheme, host and port only); check it or GATEWAY_PEER_URL'
        )
    return value.rstrip("/")


class StateSettings(Table):
    """``[state]``: where the upstream state lives (token buckets, breakers, egress budget,
    concurrency leases, caller limits, cross-replica tile claims).

    ``redis_url`` unset keeps it in the host's diskcache (one host); a Redis URL
    (``GATEWAY_REDIS_URL`` wins) shares it across every replica. The URL and the password
    (from the URL, or from ``password_file`` / ``GATEWAY_REDIS_PASSWORD_FILE``) are
    :class:`~gateway.secrets.Secret`: never logged or shown. ``lease_s`` is how long a
    replica's claims and concurrency leases outlive it (renewed while it runs), seconds.
    ``peer_url`` (``GATEWAY_PEER_URL`` wins) is this replica's own address as the other
    replicas reach it: with it, a clip file crosses the upstream once for the whole fleet
    (the others stream it from the replica that holds or fetches it); without it, each
    replica fetches its own copy.
    """

    redis_url: Annotated[Secret | None, Env("GATEWAY_REDIS_URL"), BeforeValidator(_redis_url)] = (
        Field(None, repr=False)
    )
    password_file: Annotated[OptionalPath, Env("GATEWAY_REDIS_PASSWORD_FILE", _env_path)] = None
    lease_s: PositiveFloat = 5.0
    peer_url: Annotated[Str | None, Env("GATEWAY_PEER_URL"), AfterValidator(_peer_url)] = None

    _password: Secret | None = PrivateAttr(None)

    @property
    def password(self) -> Secret | None:
        """The Redis password: the file's content, else the URL's password, else None."""
        return self._password

    @model_validator(mode="after")
    def _read_password(self) -> StateSettings:
        if self.redis_url is None:
            return self
        url_password = urlsplit(self.redis_url.reveal()).password
        self._password = Secret(url_password) if url_password else None
        if self.password_file is not None:
            try:
                text = self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise invalid(f"cannot read it: {exc.strerror}", "state.password_file") from None
            if text:
                self._password = Secret(text)
        return self


class Settings(Table):
    """Everything the gateway needs to start, already validated: the whole config file.

    One field per ``[section]``; to add a section, declare its :class:`Table` model and add
    one line here (``name: NameSettings = section()``): its keys, the unknown-key check, the
    error messages and the README's configuration reference follow from the model.

    ``layers`` (by name), ``default_layer`` and ``source`` (the file read) are derived.
    """

    upstream: UpstreamSettings = section()
    server: ServerSettings = section()
    cache: CacheSettings = section()
    limits: LimitSettings = section()
    clients: ClientSettings = section()
    downloads: DownloadSettings = section()
    viewer: ViewerSettings = section()
    state: StateSettings = section()
    tokens: tuple[TokenSettings, ...] = ()
    layer_tables: tuple[LayerTable, ...] = Field((), alias="layers")

    _source: str = PrivateAttr("")
    _layers: dict[str, Layer] = PrivateAttr(default_factory=dict)
    _default_layer: str | None = PrivateAttr(None)

    @property
    def source(self) -> str:
        """The config file these settings were read from."""
        return self._source

    @property
    def layers(self) -> dict[str, Layer]:
        """The configured layers by name, in file order."""
        return self._layers

    @property
    def default_layer(self) -> str | None:
        """The layer marked ``default = true``, or the only layer, or None."""
        return self._default_layer

    @field_validator("downloads", mode="before")
    @classmethod
    def _downloads_beside_cache(cls, table: object, info: ValidationInfo) -> object:
        cache = info.data.get("cache")
        if isinstance(table, dict) and table.get("directory", "") == "" and cache is not None:
            directory = cache.directory.parent / (cache.directory.name + "-downloads")
            return {**table, "directory": directory}
        return table

    @model_validator(mode="after")
    def _whole_file(self, info: ValidationInfo) -> Settings:
        """Rules across tables: the layer map, token hashes, token layer names."""
        self._layers, self._default_layer = layer_map(self.layer_tables)
        self._source = str((info.context or {}).get("source", ""))
        seen: set[str] = set()
        for index, token in enumerate(self.tokens):
            if token.sha256 in seen:
                raise invalid("the same token hash is configured twice", f"tokens[{index}].sha256")
            seen.add(token.sha256)
            if token.layers is not None and not token.layers <= self._layers.keys():
                raise invalid(
                    f"unknown layer in {sorted(token.layers)!r}", f"tokens[{index}].layers"
                )
        return self


def default_config_path() -> Path:
    """The demo configuration shipped inside the package (``gateway/defaults/gateway.toml``)."""
    return Path(str(resources.files("gateway") / "defaults" / DEFAULT_CONFIG_NAME))


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    need_api_key: bool = True,
) -> Settings:
    """Read and validate a config file, applying environment overrides.

    ``path=None`` loads the packaged demo config. ``environ`` defaults to ``os.environ``.
    ``need_api_key=False`` is for commands that never call the upstream (``purge``,
    ``seed --dry-run``): without a key, ``upstream.api_key`` is empty.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown or wrong-typed key, bad layer, bad
            environment value, or no API key (the message says how to set
            ``GEOPERA_API_KEY``).
    """
    env = os.environ if environ is None else environ
    file = Path(path) if path is not None else default_config_path()
    # relative paths in a file: against its directory (not resolving symlinks: the directory
    # the user named); the packaged demo config: against the working directory
    base = Path(os.path.abspath(file)).parent if path is not None else Path()
    source = str(file)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found; pass --config PATH") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        settings = Settings.model_validate(
            with_environment(Settings, raw, env), context={"base": base, "source": source}
        )
    except ValidationError as exc:
        raise config_error(exc, source, Settings) from None
    key = _api_key(settings.upstream, env, need_api_key, source)
    upstream = settings.upstream.model_copy(update={"api_key": key})
    return settings.model_copy(update={"upstream": upstream})


def with_environment(
    model: type[BaseModel], raw: dict[str, Any], env: Mapping[str, str]
) -> dict[str, Any]:
    """``raw`` (the parsed TOML) with the settings marked :class:`Env` replaced by the
    environment variables that are set (non-empty)."""
    data = dict(raw)
    for name, info in model.model_fields.items():
        table_model = info.annotation
        if not (isinstance(table_model, type) and issubclass(table_model, BaseModel)):
            continue
        key = info.alias or name
        for field_name, field_info in table_model.model_fields.items():
            for marker in field_info.metadata:
                if not isinstance(marker, Env) or not env.get(marker.name, "").strip():
                    continue
                table = data.get(key, {})
                if isinstance(table, dict):
                    table = {
                        **table,
                        field_info.alias or field_name: marker.parse(env[marker.name]),
                    }
                    data[key] = table
    return data


def _api_key(
    upstream: UpstreamSettings, env: Mapping[str, str], need_api_key: bool, source: str
) -> Secret:
    value = env.get("GEOPERA_API_KEY", "").strip()
    if not value and not need_api_key:
        return Secret("")  # not even a key file is read
    key_file = upstream.api_key_file
    if not value and key_file is not None:
        try:
            value = key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"{source}: upstream.api_key_file: cannot read {str(key_file)!r}: {exc.strerror}"
            ) from None
    if not value:
        raise ConfigError(
            f"{source}: upstream: no Geopera API key; export GEOPERA_API_KEY=gpra_... "
            "or set upstream.api_key_file (or GEOPERA_API_KEY_FILE) to a file holding it"
        )
    if any(c.isspace() for c in value) or not value.isprintable():
        raise ConfigError(
            f"{source}: upstream: the Geopera API key contains whitespace or "
            "control characters; check GEOPERA_API_KEY or the key file"
        )
    return Secret(value)
