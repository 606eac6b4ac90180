"""Benchmark gateway configs: a base TOML file plus the overrides this gateway understands.

A benchmark of the cache path must not turn into a benchmark of the gateway's protections:
wrk is one client sending far more than any per-client limit allows, and the warm-up renders
1,024 tiles, which default upstream rate limits would stretch to minutes. So the benchmark
config adds a few overrides (access log, per-client limit, upstream rates) to a base config.

Gateways without such a setting reject the unknown key (the config loader refuses unknown
keys), so each override is tried on its own with the gateway's own loader and kept only when
it loads: the same benchmark runs against older and newer gateway versions, and says which
overrides it applied and which it skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Override:
    """One TOML table added to the base config (the base must not define that table)."""

    label: str
    toml: str


def default_overrides(
    *, access_log: bool, client_limit: str, upstream_rps: float
) -> list[Override]:
    """The benchmark's overrides.

    Args:
        access_log: keep the gateway's per-request access log on (the anchors have none).
        client_limit: per-client rate limit, a rate string such as ``"100/second"`` or
            ``"off"``.
        upstream_rps: upstream requests per second allowed per operation and per asset
            (burst the same).
    """
    return [
        Override(
            f"server.access_log = {str(access_log).lower()}",
            f"[server]\naccess_log = {str(access_log).lower()}\n",
        ),
        Override(
            f'clients.rate_limit = "{client_limit}"', f'[clients]\nrate_limit = "{client_limit}"\n'
        ),
        Override(
            f"limits: {upstream_rps:g} upstream req/s per operation and per asset",
            f"[limits]\noperation_rps = {upstream_rps:.1f}\noperation_burst = {upstream_rps:.1f}\n"
            f"asset_rps = {upstream_rps:.1f}\nasset_burst = {upstream_rps:.1f}\n",
        ),
    ]


def write_config(
    base: str, path: Path, environ: Mapping[str, str], overrides: Sequence[Override]
) -> tuple[list[str], list[str]]:
    """Write ``base`` plus every override the installed gateway accepts to ``path``.

    ``environ`` is the environment the gateway will run with (``GEOPERA_BASE_URL``,
    ``GEOPERA_API_KEY``, ``GEOPERA_CACHE_DIR``), so that loading needs no real files.

    Returns:
        ``(applied, skipped)``: labels of the kept overrides, and ``label: reason`` for the
        others.

    Raises:
        gateway.config.settings.ConfigError: the final config does not load.
    """
    from gateway.config.settings import ConfigError, load_settings

    kept: list[Override] = []
    skipped: list[str] = []
    for override in overrides:
        path.write_text(_compose(base, [*kept, override]), encoding="utf-8")
        try:
            load_settings(path, environ=environ)
        except ConfigError as exc:
            skipped.append(f"{override.label}: {exc}")
        else:
            kept.append(override)
    path.write_text(_compose(base, kept), encoding="utf-8")
    load_settings(path, environ=environ)
    return [o.label for o in kept], skipped


def _compose(base: str, overrides: Sequence[Override]) -> str:
    if not overrides:
        return base
    parts = [base.rstrip("\n"), "", "# --- benchmark overrides (bench/gwconfig.py)"]
    parts += [o.toml for o in overrides]
    return "\n".join(parts)
