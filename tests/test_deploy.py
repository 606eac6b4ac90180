"""The deployment examples in deploy/: the Grafana dashboard asks only for metrics the
gateway exports, and the proxy configs keep the settings the README promises."""

from __future__ import annotations

import json
import re
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

METRIC = re.compile(r"\b(gateway_[a-z_]+)")


def exported_names(exposition: str) -> set[str]:
    """Every sample name ``/metrics`` can show: from each ``# TYPE`` line, the family and the
    names Prometheus derives from it (``_total``, ``_bucket``, ``_sum``, ``_count``)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            suffixes = {
                "counter": ("", "_total"),
                "histogram": ("_bucket", "_sum", "_count"),
            }.get(kind, ("",))
            names |= {name + suffix for suffix in suffixes}
    return names


async def test_every_dashboard_query_names_a_metric_the_gateway_exports(gateway_for, emulator):
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(queries) >= 10
    client = await gateway_for(emulator)
    await client.get("/tiles/olinda/13/3302/4278.png")  # so every family has been touched
    exported = exported_names(await (await client.get("/metrics")).text())
    # present only with a daily budget configured
    exported.add("gateway_egress_budget_remaining_bytes")
    for query in queries:
        named = METRIC.findall(query)
        assert named, query
        for name in named:
            assert name in exported, f"{name} (in {query!r}) is not exported"


def test_the_proxies_route_and_cache_as_the_readme_says():
    haproxy = (DEPLOY / "haproxy.cfg").read_text()
    assert re.search(r"^\s*balance uri\b", haproxy, re.M)
    assert re.search(r"^\s*hash-type consistent\b", haproxy, re.M)
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert re.search(r"^\s*proxy_cache_lock off;", nginx, re.M)
    assert re.search(r"^\s*proxy_cache_revalidate on;", nginx, re.M)
    assert not re.search(r"^\s*proxy_cache_valid", nginx, re.M)  # Cache-Control decides
    compose = (DEPLOY / "compose.yaml").read_text()
    assert compose.count("GATEWAY_REDIS_URL") == 1
    assert "gateway3:" in compose
    # each replica names itself to the others; the outside never reaches their route
    for n in (1, 2, 3):
        assert f'GATEWAY_PEER_URL: "http://gateway{n}:8080"' in compose
    assert re.search(r"^\s*http-request deny .*path_beg /fleet/", haproxy, re.M)
