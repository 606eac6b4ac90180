"""Settings: one TOML file plus environment overrides, validated at start.

The file names the upstream, the cache and the layers (see ``config/gateway.toml`` and the
README's config reference). The Geopera API key never lives in the file: it comes from
``GEOPERA_API_KEY`` or from the file named by ``upstream.api_key_file`` /
``GEOPERA_API_KEY_FILE``. ``GEOPERA_BASE_URL`` overrides ``upstream.base_url``,
``GEOPERA_CACHE_DIR`` overrides ``cache.directory``, and ``GEOPERA_HOST`` / ``GEOPERA_PORT``
override ``server.host`` / ``server.port`` (a container sets them once; ``--host`` and
``--port`` still win).

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
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from limits import parse

from gateway.config.layers import parse_layers
from gateway.config.tables import ConfigError, TableReader
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

THROTTLE_SCOPES = ("asset", "operation", "organisation")


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

    throttle_scopes: Mapping[str, str] = field(
        default_factory=lambda: {
            EMULATOR_PROBLEM_BASE + "asset-rate-limited": "asset",
            EMULATOR_PROBLEM_BASE + "bandwidth-circuit-open": "organisation",
        }
    )
    scope_missing: frozenset[str] = frozenset({EMULATOR_PROBLEM_BASE + "insufficient-scope"})
    source_unknown: frozenset[str] = frozenset({EMULATOR_PROBLEM_BASE + "cog-not-found"})


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """How to reach Geopera: base URL, credentials, HTTP client limits and how its error
    types are read.

    Timeouts are in seconds; ``max_connections`` bounds each upstream connection pool.
    """

    base_url: str
    api_key: Secret
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_connections: int = 64
    problem_types: ProblemTypes = field(default_factory=ProblemTypes)
    check_sources: bool = True


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Where the gateway listens (``host``, TCP ``port``), whom it trusts for
    ``X-Forwarded-For`` (``trusted_proxies``, CIDRs) and whether it writes an access log."""

    host: str = "127.0.0.1"
    port: int = 8080
    trusted_proxies: tuple[Network, ...] = ()
    access_log: bool = True
    public_url: str | None = None
    cors_origins: tuple[str, ...] = ("*",)
    header_timeout_s: float = 10.0
    """Longest a connection may take to deliver a complete request head, from its opening
    or its last response, seconds; then it is closed (slowloris defence, and the keep-alive
    idle timeout)."""
    shutdown_timeout_s: float = 10.0
    """On SIGTERM, longest wait for requests in flight before connections are closed,
    seconds (streamed downloads are cut at once; clients resume with Range)."""


MAPLIBRE_VERSION = "5.6.0"
"""The MapLibre GL JS release of the viewer's default URLs and built-in SRI hashes."""


@dataclass(frozen=True, slots=True)
class ViewerSettings:
    """Where the map page loads MapLibre GL JS from: URLs with Subresource Integrity hashes,
    or ``assets_dir``, a local directory holding ``maplibre-gl.js`` and ``maplibre-gl.css``
    that the gateway serves itself (for networks without internet access)."""

    maplibre_js: str = f"https://unpkg.com/maplibre-gl@{MAPLIBRE_VERSION}/dist/maplibre-gl.js"
    maplibre_js_integrity: str | None = (
        "sha384-GfxBM9x46BaAFxtCq39Fxir8fNZ4VDnwgfi6Kzi5/F1tAFsm0amuuV8kd+Pxzuf/"
    )
    maplibre_css: str = f"https://unpkg.com/maplibre-gl@{MAPLIBRE_VERSION}/dist/maplibre-gl.css"
    maplibre_css_integrity: str | None = (
        "sha384-Nq6PQ+9vJPvw7U/VfDELyrWoGQMsy0gi6QShhaSrGzkpF5KkM40csg2leky+YMTd"
    )
    assets_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """One client token, configured by the SHA-256 hex digest of its value.

    ``scopes`` is a subset of ``tiles``, ``downloads``, ``admin``; ``layers`` limits the
    private layers it may read (None: all); ``rate_limit`` overrides ``clients.rate_limit``;
    ``projects`` limits the Geopera projects whose clip jobs it may list and fetch (None:
    every project of the organisation).
    """

    name: str
    sha256: str
    scopes: frozenset[str]
    layers: frozenset[str] | None = None
    rate_limit: str | None = None
    projects: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Per-client request limit, a ``limits`` rate string (``"100/second"``); None = off."""

    rate_limit: str | None = "100/second"


@dataclass(frozen=True, slots=True)
class Rate:
    """Requests per second with a burst size (token bucket capacity)."""

    rps: float
    burst: float


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Upstream protection settings (``[limits]`` in the config; see the README).

    Rates are requests per second; sizes bytes; times seconds.
    """

    operation_default: Rate = Rate(20.0, 40.0)
    operations: dict[str, Rate] = field(default_factory=dict)
    asset: Rate = Rate(10.0, 20.0)
    bytes_per_s: float = 25_000_000.0
    bytes_burst: float = 25_000_000.0
    max_concurrent: int = 16
    max_wait_s: float = 10.0
    daily_egress_bytes: int = 0
    retry_attempts: int = 3
    retry_initial_s: float = 0.1
    retry_max_s: float = 2.0
    failure_threshold: int = 5
    failure_window_s: float = 30.0
    open_s: float = 30.0
    max_retry_after_s: float = 3600.0

    def rate_for(self, operation: str) -> Rate:
        """The configured rate of ``operation`` (or the default)."""
        return self.operations.get(operation, self.operation_default)


@dataclass(frozen=True, slots=True)
class DownloadSettings:
    """The download store: a directory of complete clip files with an LRU size limit, and
    the media types a clip file may have (the Clipping guide, seeds ``001``: ``image/tiff``);
    a download answered with another type is refused and not stored."""

    directory: Path
    size_limit_bytes: int = 10 << 30
    content_types: frozenset[str] = frozenset({"image/tiff"})
    organization_id: str | None = None
    """The Geopera organisation whose clip jobs ``GET /downloads`` lists (``clip.jobs.list``
    needs it, Clipping guide); None: no listing."""
    list_ttl_s: float = 10.0
    """How long one page of the upstream job listing is reused, seconds."""


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The tile cache: a diskcache directory with an LRU size limit plus a memory hot tier.

    Sizes are bytes; ``empty_ttl_s`` is the negative TTL (seconds) for tiles the upstream
    reported empty.
    """

    directory: Path
    state_directory: Path
    size_limit_bytes: int = 1 << 30
    memory_bytes: int = 64 << 20
    empty_ttl_s: int = 300


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway needs to start, already validated."""

    source: str
    upstream: UpstreamSettings
    server: ServerSettings
    cache: CacheSettings
    limits: LimitSettings
    clients: ClientSettings
    downloads: DownloadSettings
    viewer: ViewerSettings
    tokens: tuple[TokenSettings, ...]
    layers: dict[str, Layer] = field(default_factory=dict)
    default_layer: str | None = None
    state: StateSettings = field(default_factory=lambda: StateSettings())


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
        ConfigError: unreadable file, bad TOML, unknown or wrong-typed key, bad layer, or no
            API key (the message says how to set ``GEOPERA_API_KEY``).
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

    top = TableReader(source, "", raw)
    top.reject_unknown(
        {
            "upstream",
            "server",
            "cache",
            "limits",
            "clients",
            "downloads",
            "viewer",
            "tokens",
            "layers",
            "state",
        }
    )
    upstream = _upstream(
        TableReader(source, "upstream", top.get("upstream", dict, {})), env, base, need_api_key
    )
    server = _server(TableReader(source, "server", top.get("server", dict, {})), env)
    cache = _cache(TableReader(source, "cache", top.get("cache", dict, {})), env, base)
    limits = _limits(TableReader(source, "limits", top.get("limits", dict, {})))
    clients = _clients(TableReader(source, "clients", top.get("clients", dict, {})))
    downloads = _downloads(
        TableReader(source, "downloads", top.get("downloads", dict, {})), cache.directory, base
    )
    layer_tables = top.get("layers", list, [])
    layers, default_layer = parse_layers(source, layer_tables)
    viewer = _viewer(TableReader(source, "viewer", top.get("viewer", dict, {})), base)
    tokens = _tokens(source, top.get("tokens", list, []), layers)
    state = _state(TableReader(source, "state", top.get("state", dict, {})), env, base)
    return Settings(
        source,
        upstream,
        server,
        cache,
        limits,
        clients,
        downloads,
        viewer,
        tokens,
        layers,
        default_layer,
        state,
    )


_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")


def _in(base: Path, value: str) -> Path:
    """``value`` (``~`` expanded) as a path; a relative one under ``base``."""
    return base / Path(value).expanduser()


def _downloads(r: TableReader, cache_dir: Path, base: Path) -> DownloadSettings:
    r.reject_unknown(
        {"directory", "size_limit_bytes", "content_types", "organization_id", "list_ttl_s"}
    )
    directory = r.get("directory", str)
    organization = r.get("organization_id", str, None)
    if organization is not None and not PROJECT_ID.fullmatch(organization):
        raise r.error(
            "organization_id",
            f"a Geopera organisation id (1-128 printable characters, no spaces), got "
            f"{organization!r}",
        )
    types = r.get("content_types", list, ["image/tiff"])
    if not types or not all(isinstance(t, str) and _MEDIA_TYPE.fullmatch(t) for t in types):
        raise r.error(
            "content_types",
            f'a non-empty list of lower-case media types like "image/tiff", got {types!r}',
        )
    return DownloadSettings(
        directory=_in(base, directory)
        if directory
        else cache_dir.parent / (cache_dir.name + "-downloads"),
        size_limit_bytes=r.positive("size_limit_bytes", int, 10 << 30),
        content_types=frozenset(types),
        organization_id=organization,
        list_ttl_s=r.positive("list_ttl_s", float, 10.0),
    )


def _upstream(
    r: TableReader, env: Mapping[str, str], base: Path, need_api_key: bool
) -> UpstreamSettings:
    r.reject_unknown(
        {
            "base_url",
            "api_key_file",
            "connect_timeout_s",
            "read_timeout_s",
            "max_connections",
            "api_key",
            "throttle_scopes",
            "scope_missing_types",
            "source_unknown_types",
            "check_sources",
        }
    )
    if "api_key" in r.table:
        raise r.error(
            "api_key",
            "the API key must not be written in a config file; "
            "set GEOPERA_API_KEY or upstream.api_key_file instead",
        )
    base_url = env.get("GEOPERA_BASE_URL") or r.get("base_url", str)
    if not base_url:
        raise r.error(
            "base_url",
            "missing; set it to https://api.geopera.com or the emulator's "
            "URL, or export GEOPERA_BASE_URL",
        )
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise r.error("base_url", f"must be an http(s) URL with a host, got {base_url!r}")
    return UpstreamSettings(
        base_url=base_url.rstrip("/"),
        api_key=_api_key(r, env, base, need_api_key),
        connect_timeout_s=r.positive("connect_timeout_s", float, 5.0),
        read_timeout_s=r.positive("read_timeout_s", float, 30.0),
        max_connections=r.positive("max_connections", int, 64),
        problem_types=_problem_types(r),
        check_sources=r.get("check_sources", bool, True),
    )


def _problem_types(r: TableReader) -> ProblemTypes:
    d = ProblemTypes()
    scopes = r.get("throttle_scopes", dict, dict(d.throttle_scopes))
    for uri, scope in scopes.items():
        if scope not in THROTTLE_SCOPES:
            raise r.error(
                f'throttle_scopes."{uri}"',
                f"must be one of {', '.join(THROTTLE_SCOPES)}, got {scope!r}",
            )
    lists = {}
    for key, default in (
        ("scope_missing_types", d.scope_missing),
        ("source_unknown_types", d.source_unknown),
    ):
        values = r.get(key, list, sorted(default))
        if not all(isinstance(v, str) and v for v in values):
            raise r.error(key, f"a list of problem type URIs (strings), got {values!r}")
        lists[key] = frozenset(values)
    return ProblemTypes(scopes, lists["scope_missing_types"], lists["source_unknown_types"])


def _api_key(r: TableReader, env: Mapping[str, str], base: Path, need_api_key: bool) -> Secret:
    value = env.get("GEOPERA_API_KEY", "").strip()
    if not value and not need_api_key:
        return Secret("")  # not even a key file is read
    from_env, from_file = env.get("GEOPERA_API_KEY_FILE"), r.get("api_key_file", str)
    key_file = from_env or from_file
    if not value and key_file:
        key_path = Path(from_env) if from_env else _in(base, from_file)
        try:
            value = key_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise r.error("api_key_file", f"cannot read {key_file!r}: {exc.strerror}") from None
    if not value:
        raise ConfigError(
            f"{r.source}: upstream: no Geopera API key; export GEOPERA_API_KEY=gpra_... "
            "or set upstream.api_key_file (or GEOPERA_API_KEY_FILE) to a file holding it"
        )
    if any(c.isspace() for c in value) or not value.isprintable():
        raise ConfigError(
            f"{r.source}: upstream: the Geopera API key contains whitespace or "
            "control characters; check GEOPERA_API_KEY or the key file"
        )
    return Secret(value)


def _server(r: TableReader, env: Mapping[str, str]) -> ServerSettings:
    r.reject_unknown(
        {
            "host",
            "port",
            "trusted_proxies",
            "access_log",
            "public_url",
            "cors_origins",
            "header_timeout_s",
            "shutdown_timeout_s",
        }
    )
    port = r.get("port", int, 8080)
    if not 0 <= port <= 65535:
        raise r.error("port", f"must be 0..65535, got {port}")
    env_port = env.get("GEOPERA_PORT", "").strip()
    if env_port:
        if not env_port.isdigit() or not 0 <= int(env_port) <= 65535:
            raise ConfigError(f"GEOPERA_PORT: must be a port number 0..65535, got {env_port!r}")
        port = int(env_port)
    proxies = r.get("trusted_proxies", list, [])
    try:
        trusted = parse_networks(proxies)
    except (TypeError, ValueError) as exc:
        raise r.error("trusted_proxies", f"must be IP addresses or CIDRs: {exc}") from None
    public_url = r.get("public_url", str, "") or None
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise r.error(
                "public_url",
                f"must be an http(s) URL like https://tiles.example.org, got {public_url!r}",
            )
        public_url = public_url.rstrip("/")
    origins = r.get("cors_origins", list, ["*"])
    for origin in origins:
        parts = urlsplit(origin) if isinstance(origin, str) else None
        if origin != "*" and (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
        ):
            raise r.error(
                "cors_origins",
                f"each origin is '*' or like https://app.example.org, got {origin!r}",
            )
    return ServerSettings(
        host=env.get("GEOPERA_HOST", "").strip() or r.get("host", str, "127.0.0.1"),
        port=port,
        trusted_proxies=trusted,
        access_log=r.get("access_log", bool, True),
        public_url=public_url,
        cors_origins=tuple(o.rstrip("/") for o in origins),
        header_timeout_s=r.positive("header_timeout_s", float, 10.0),
        shutdown_timeout_s=r.positive("shutdown_timeout_s", float, 10.0),
    )


def _viewer(r: TableReader, base: Path) -> ViewerSettings:
    d = ViewerSettings()
    r.reject_unknown(
        {
            "maplibre_js",
            "maplibre_js_integrity",
            "maplibre_css",
            "maplibre_css_integrity",
            "assets_dir",
        }
    )
    assets = r.get("assets_dir", str, "")
    assets_dir = _in(base, assets) if assets else None
    if assets_dir is not None and not (assets_dir / "maplibre-gl.js").is_file():
        raise r.error(
            "assets_dir",
            f"{str(assets_dir)!r} must hold maplibre-gl.js and maplibre-gl.css "
            "(for example node_modules/maplibre-gl/dist)",
        )
    return ViewerSettings(
        maplibre_js=r.get("maplibre_js", str, d.maplibre_js),
        maplibre_js_integrity=r.get("maplibre_js_integrity", str, None),
        maplibre_css=r.get("maplibre_css", str, d.maplibre_css),
        maplibre_css_integrity=r.get("maplibre_css_integrity", str, None),
        assets_dir=assets_dir,
    )


SCOPES = frozenset({"tiles", "downloads", "admin"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
PROJECT_ID = re.compile(r"[!-~]{1,128}")
"""A Geopera project id as a token's ``projects`` names it: 1-128 printable ASCII characters
without spaces (the docs show UUIDs; the emulator uses ``demo`` and ``survey``)."""


def _tokens(source: str, tables: list[Any], layers: dict[str, Layer]) -> tuple[TokenSettings, ...]:
    tokens: list[TokenSettings] = []
    for index, table in enumerate(tables):
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: tokens[{index}]: expected a table ([[tokens]])")
        r = TableReader(source, f"tokens[{index}]", table)
        r.reject_unknown({"name", "sha256", "scopes", "layers", "rate_limit", "projects"})
        name = r.get("name", str)
        if not name:
            raise r.error("name", "required: who holds this token")
        digest = r.get("sha256", str, "")
        if not _SHA256.fullmatch(digest):
            raise r.error(
                "sha256",
                "required: 64 lower-case hex digits, the SHA-256 of the "
                "token (geopera-gateway token create prints it)",
            )
        scopes = r.get("scopes", list, [])
        if not scopes or any(s not in SCOPES for s in scopes):
            raise r.error(
                "scopes", f"a non-empty list of {', '.join(sorted(SCOPES))}, got {scopes!r}"
            )
        allowed = r.get("layers", list, None)
        if allowed is not None and any(name not in layers for name in allowed):
            raise r.error("layers", f"unknown layer in {allowed!r}")
        rate = r.get("rate_limit", str, None)
        if rate is not None:
            try:
                parse(rate)
            except ValueError:
                raise r.error(
                    "rate_limit", f"expected a rate like '100/second', got {rate!r}"
                ) from None
        projects = r.get("projects", list, None)
        valid = projects and all(isinstance(p, str) and PROJECT_ID.fullmatch(p) for p in projects)
        if projects is not None and not valid:
            raise r.error(
                "projects",
                "a non-empty list of Geopera project ids (1-128 printable characters, no "
                f"spaces), got {projects!r}",
            )
        if any(t.sha256 == digest for t in tokens):
            raise r.error("sha256", "the same token hash is configured twice")
        tokens.append(
            TokenSettings(
                name,
                digest,
                frozenset(scopes),
                frozenset(allowed) if allowed is not None else None,
                rate,
                frozenset(projects) if projects is not None else None,
            )
        )
    return tuple(tokens)


def _clients(r: TableReader) -> ClientSettings:
    r.reject_unknown({"rate_limit"})
    rate = r.get("rate_limit", str, "100/second")
    if rate in ("", "off"):
        return ClientSettings(None)
    try:
        parse(rate)
    except ValueError:
        msg = f"expected a rate like '100/second' or 'off', got {rate!r}"
        raise r.error("rate_limit", msg) from None
    return ClientSettings(rate)


def _rate(r: TableReader, prefix: str, default: Rate) -> Rate:
    rps = r.positive(f"{prefix}rps", float, default.rps)
    burst = r.positive(f"{prefix}burst", float, max(default.burst, rps))
    return Rate(rps, burst)


def _limits(r: TableReader) -> LimitSettings:
    d = LimitSettings()
    r.reject_unknown(
        {
            "operation_rps",
            "operation_burst",
            "asset_rps",
            "asset_burst",
            "bytes_per_s",
            "bytes_burst",
            "max_concurrent",
            "max_wait_s",
            "daily_egress_bytes",
            "retry_attempts",
            "retry_initial_s",
            "retry_max_s",
            "breaker_failures",
            "breaker_window_s",
            "breaker_open_s",
            "max_retry_after_s",
            "operations",
        }
    )
    operations = {}
    for name, table in r.get("operations", dict, {}).items():
        if not isinstance(table, dict):
            raise r.error(f"operations.{name}", "expected a table with rps and burst")
        sub = TableReader(r.source, f"{r.prefix}.operations.{name}", table)
        sub.reject_unknown({"rps", "burst"})
        operations[name] = _rate(sub, "", d.operation_default)
    bytes_per_s = r.get("bytes_per_s", float, d.bytes_per_s)
    if bytes_per_s < 0:
        raise r.error("bytes_per_s", "must be 0 (off) or more")
    budget = r.get("daily_egress_bytes", int, 0)
    if budget < 0:
        raise r.error("daily_egress_bytes", "must be 0 (no budget) or more")
    return LimitSettings(
        operation_default=_rate(r, "operation_", d.operation_default),
        operations=operations,
        asset=_rate(r, "asset_", d.asset),
        bytes_per_s=bytes_per_s,
        bytes_burst=r.get("bytes_burst", float, bytes_per_s),
        max_concurrent=r.positive("max_concurrent", int, d.max_concurrent),
        max_wait_s=r.positive("max_wait_s", float, d.max_wait_s),
        daily_egress_bytes=budget,
        retry_attempts=r.positive("retry_attempts", int, d.retry_attempts),
        retry_initial_s=r.positive("retry_initial_s", float, d.retry_initial_s),
        retry_max_s=r.positive("retry_max_s", float, d.retry_max_s),
        failure_threshold=r.positive("breaker_failures", int, d.failure_threshold),
        failure_window_s=r.positive("breaker_window_s", float, d.failure_window_s),
        open_s=r.positive("breaker_open_s", float, d.open_s),
        max_retry_after_s=r.positive("max_retry_after_s", float, d.max_retry_after_s),
    )


def _cache(r: TableReader, env: Mapping[str, str], base: Path) -> CacheSettings:
    r.reject_unknown(
        {"directory", "state_directory", "size_limit_bytes", "memory_bytes", "empty_ttl_s"}
    )
    from_env = env.get("GEOPERA_CACHE_DIR")
    directory = (
        Path(from_env).expanduser()
        if from_env
        else _in(base, r.get("directory", str, DEFAULT_CACHE_DIR))
    )
    state = r.get("state_directory", str)
    state_directory = _in(base, state) if state else directory.parent / (directory.name + "-state")
    memory = r.get("memory_bytes", int, 64 << 20)
    if memory < 0:
        raise r.error("memory_bytes", f"must be 0 (off) or more, got {memory}")
    return CacheSettings(
        directory=directory,
        state_directory=state_directory,
        size_limit_bytes=r.positive("size_limit_bytes", int, 1 << 30),
        memory_bytes=memory,
        empty_ttl_s=r.positive("empty_ttl_s", int, 300),
    )


# --- [state]: where the upstream state lives (issue 13; one block, so it merges alone) ---


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Where the upstream state (token buckets, breakers, egress budget, concurrency leases,
    purge marks, client limits, cross-replica claims) lives: ``redis_url`` None keeps it in
    the host's diskcache (one host); a Redis URL shares it across every replica.

    ``redis_url`` and ``password`` are :class:`~gateway.secrets.Secret` (a URL may hold a
    password): never logged or shown. ``lease_s`` is how long a replica's claims and
    concurrency leases outlive it (they are renewed while it runs), seconds.
    """

    redis_url: Secret | None = None
    password: Secret | None = None
    lease_s: float = 5.0


REDIS_SCHEMES = ("redis", "rediss", "unix")


def _state(r: TableReader, env: Mapping[str, str], base: Path) -> StateSettings:
    """``[state]``: ``redis_url`` (``GATEWAY_REDIS_URL`` wins), ``password_file``
    (``GATEWAY_REDIS_PASSWORD_FILE`` wins) and ``lease_s``."""
    r.reject_unknown({"redis_url", "password_file", "lease_s"})
    url = env.get("GATEWAY_REDIS_URL", "").strip() or r.get("redis_url", str, "")
    password: Secret | None = None
    if url:
        parts = urlsplit(url)
        if parts.scheme not in REDIS_SCHEMES or (parts.scheme != "unix" and not parts.hostname):
            # the URL itself is never echoed: it may hold a password
            raise r.error(
                "redis_url",
                'must look like "redis://HOST:6379/0" or "rediss://HOST:6380/0" (or '
                "unix:///path/to/redis.sock); check it or GATEWAY_REDIS_URL",
            )
        if parts.password:
            password = Secret(parts.password)
    from_env, from_file = env.get("GATEWAY_REDIS_PASSWORD_FILE"), r.get("password_file", str, "")
    secret_file = from_env or from_file
    if url and secret_file:
        path = Path(from_env) if from_env else _in(base, from_file)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise r.error("password_file", f"cannot read it: {exc.strerror}") from None
        password = Secret(value) if value else password
    return StateSettings(
        redis_url=Secret(url) if url else None,
        password=password,
        lease_s=r.positive("lease_s", float, 5.0),
    )
