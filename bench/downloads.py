"""Download benchmark for geopera-gateway: a 1 GiB clip file, direct, cold and cached.

Run it from the repository root with the project's Python (``pip install -e '.[dev]'``) and
``curl`` on the PATH::

    python bench/downloads.py                  # 1 GiB: direct x2, cold x1, cached x3 (~1 min)
    python bench/downloads.py --size 256MiB --runs 5

What it proves: a clip file crosses the gateway at close to the upstream's own speed the first
time (cold, streamed to the client while it is being stored), is served from disk at loopback
speed afterwards (cached, sendfile), and neither costs the gateway memory in proportion to
the file. Targets: cold >= 80 % of direct throughput, cached >= 1 GiB/s, peak RSS growth of
the gateway < 64 MiB.

Method:

1. **Processes.** The bundled emulator (``python -m gateway emulator --bandwidth 0
   --asset-rps 0 --clip-delay-s 0``: no egress limits, jobs complete at once) and the
   gateway (``python -m gateway serve``, one process) on free ports of 127.0.0.1, with a
   fresh cache and download store in a scratch directory. Nothing is pinned. The scratch
   directory's file system must have at least max(3 GiB, size + 2 GiB) free.
2. **Config.** ``bench/tiles.toml`` plus: access log off, ``clients.rate_limit = "off"``,
   ``limits.bytes_per_s = 0`` (the gateway's own upstream byte pacing off) and
   ``downloads.size_limit_bytes`` = max(2 GiB, 2 x size). Every override must be accepted by
   the gateway's config loader, or the run stops. One more is optional: a ``[[tokens]]``
   entry with the ``downloads`` scope (a random token, configured by its SHA-256), for
   gateways with client access control; when it is accepted, the gateway downloads send it
   as ``Authorization: Bearer``.
3. **Job.** ``clip.create_from_item`` with ``source_item_id = "synthetic-<size>"`` (the
   emulator generates that many deterministic pseudo-random bytes while streaming; mosaic type
   ``data``), then ``clip.job.get`` until ``completed``. The expected SHA-256 comes from
   ``gateway.emulator.synthetic_sha256``.
4. **Downloads**, all with ``curl -s -o /dev/null`` (a C client, so the client is not the
   bottleneck), one at a time, in this order:
   - *direct*: ``POST /v1/op/clip.job.download`` to the emulator, twice; the best counts;
   - ``GET /downloads/{job_id}`` on the gateway (not timed): the job must be completed with
     a ``data`` file of the right ``size_bytes``;
   - *cold*: ``GET /downloads/{job_id}/data`` on the gateway, once (``X-Cache: MISS``:
     streamed to the client as it arrives from the upstream, the last byte held until the
     file is stored);
   - *cached*: the same URL ``--runs`` times (``X-Cache: HIT``, from disk); the median counts;
   - *checksum*: the same URL once more, piped from curl into SHA-256 in this process (not
     timed: hashing would slow the client); it must equal the expected digest;
   - *cold Range*: a second job of ``--range-size`` bytes (default 200 MB), never fetched
     before: ``curl -r 0-1023`` on its URL (206, ``X-Cache: MISS``: this request starts the
     transfer and is answered from it); right after, ``GET /downloads/{job_id}`` must show
     the file's ``sha256`` still null (the transfer was still running when the range was
     answered), then ``GET /downloads/{job_id}/data.sha256`` waits for the stored file and
     must give the expected digest.

   Each timed figure is curl's ``speed_download`` (bytes / total time, connection included).
   Also recorded: time to first byte, and the CPU used by the gateway and the emulator during
   each download (% of one core). The emulator must count exactly one ``clip.job.download``
   from the gateway.
5. **Memory.** A thread samples the RSS (psutil) of the gateway process and its descendants every
   50 ms, from 0.5 s before the cold download (the baseline is the median of those samples)
   until after the cached runs. Reported: baseline, peak per phase, and growth = peak -
   baseline.
6. **Targets** (informational, PASS/MISS): cold >= 80 % of direct; cached (median) >= 1 GiB/s
   (1,073,741,824 B/s); RSS growth < 64 MiB; cold Range time to first byte <= 1 s.

The exit status is 0 when the measurement ran, whatever the targets say; 1 when something
broke (a process died or did not start, a config override was refused, too little disk, a
download was not 200 with the full size, the wrong ``X-Cache``, a wrong checksum, more or
fewer than one upstream download from the gateway); 130 on Ctrl-C. Processes are stopped by
PID by ``bench/harness.py``, also on errors, Ctrl-C and SIGTERM. Everything
listens on 127.0.0.1 and every wait is bounded. The scratch directory is deleted at the end
unless ``--keep``; after a failure its logs are kept but the download store (the big file) is
deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# bench/harness.py and bench/gwconfig.py: this script's directory is first on sys.path
import gwconfig
import harness

MOSAIC = "data"
PROJECT = "demo"
AOI = {
    "type": "Polygon",
    "coordinates": [[[-77.9, 24.3], [-77.5, 24.3], [-77.5, 24.7], [-77.9, 24.7], [-77.9, 24.3]]],
}
DOWNLOAD_OP = "clip.job.download"

MIB = 1 << 20
GIB = 1 << 30
MAX_SIZE = 64 * GIB
"""The emulator's largest synthetic item."""

COLD_RATIO_TARGET = 0.8
CACHED_TARGET_BPS = float(GIB)
RSS_TARGET_MIB = 64.0
RANGE_TTFB_TARGET_S = 1.0
RANGE = (0, 1023)
"""The cold range asked for: ``bytes=0-1023``."""

RSS_SAMPLE_S = 0.05
RSS_BASELINE_S = 0.5
RSS_PIDS_REFRESH_S = 1.0
JOB_TIMEOUT_S = 60.0
JOB_POLL_S = 0.1
CURL_MIN_BPS = 5_000_000
"""A download slower than this (on average) is cut off by curl's --max-time."""
CURL_SLACK_S = 60.0
CURL_WRITE_OUT = "%{http_code} %{size_download} %{speed_download} %{time_total} "
CURL_WRITE_OUT += "%{time_starttransfer}"
HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------- helpers


def parse_size(text: str) -> int:
    """``1073741824``, ``512MiB``, ``1GiB``, ``64KiB`` (also ``M``/``G``/``K``: binary)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1073741824, 512MiB, 1GiB)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]
    return int(match.group(1)) << shift


def fmt_bytes(n: float) -> str:
    """``1 GiB``, ``256 MiB``... when exact, else the byte count."""
    for unit, size in (("GiB", GIB), ("MiB", MIB)):
        if n >= size and n % size == 0:
            return f"{n / size:g} {unit}"
    return f"{n:,.0f} B"


def post_json(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    """POST ``body`` as JSON to ``url`` with the bench API key; decode the JSON answer.

    Raises:
        BenchError: an HTTP error status or no connection.
    """
    return harness.http_json(
        url, "POST", body, {"Authorization": f"Bearer {harness.API_KEY}", **(headers or {})}
    )


def upstream_downloads(emulator_url: str) -> int:
    """``clip.job.download`` calls the emulator has counted."""
    return harness.emulator_calls(emulator_url, DOWNLOAD_OP)


def create_job(emulator_url: str, size: int) -> str:
    """Create a ``synthetic-<size>`` clip job and wait until it is completed; its id.

    Raises:
        BenchError: the job failed or did not complete within :data:`JOB_TIMEOUT_S`.
    """
    op = emulator_url + "/v1/op/"
    answer = post_json(
        op + "clip.create_from_item",
        {"source_item_id": f"synthetic-{size}", "project_id": PROJECT, "aoi_geometry": AOI},
        {"Idempotency-Key": str(uuid.uuid4())},
    )
    job_id = answer["job"]["id"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = post_json(op + "clip.job.get", {"job_id": job_id})
        if job.get("status") == "completed":
            return job_id
        if job.get("status") == "failed":
            raise harness.BenchError(f"clip job {job_id} failed: {job.get('error')}")
        time.sleep(JOB_POLL_S)
    raise harness.BenchError(f"clip job {job_id} not completed after {JOB_TIMEOUT_S:g} s")


# --------------------------------------------------------------------------- curl


@dataclass
class Fetch:
    """One download with curl."""

    label: str
    status: int
    size: int
    speed: float  # bytes/s, curl's speed_download
    seconds: float  # curl's time_total
    ttfb: float  # curl's time_starttransfer, seconds
    xcache: str
    gateway_cpu_pct: float
    emulator_cpu_pct: float
    started: float = 0.0  # monotonic
    ended: float = 0.0

    def ok(self, size: int) -> bool:
        """200 with the whole file."""
        return self.status == 200 and self.size == size


def curl_timeout(size: int) -> float:
    """curl's ``--max-time`` for a ``size``-byte download."""
    return CURL_SLACK_S + size / CURL_MIN_BPS


def last_header(text: str, name: str) -> str:
    """The value of the last header line ``name: value`` in ``text`` (``name`` in lower
    case; ``-`` when there is none)."""
    value = "-"
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip().lower() == name:
            value = rest.strip()
    return value


def xcache_of(header_file: Path) -> str:
    """The last ``X-Cache`` value in a ``curl -D`` header dump (``-`` when none)."""
    if not header_file.exists():
        return "-"
    return last_header(header_file.read_text(errors="replace"), "x-cache")


def run_curl(
    procs: harness.Processes,
    label: str,
    url: str,
    size: int,
    scratch: Path,
    pids: dict[str, int],
    extra: Sequence[str] = (),
) -> Fetch:
    """Download ``url`` once with curl into /dev/null; time it and the servers' CPU.

    ``pids`` maps ``gateway``/``emulator`` to their PIDs (the gateway's descendants count too).

    Raises:
        BenchError: curl failed, overran its time, or printed nothing parsable.
    """
    header_file = scratch / "headers.txt"
    header_file.unlink(missing_ok=True)
    limit = curl_timeout(size)
    argv = [
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "-o",
        "/dev/null",
        "-D",
        str(header_file),
        "--max-time",
        f"{limit:.0f}",
        "-w",
        CURL_WRITE_OUT,
        *extra,
        url,
    ]
    groups = {
        name: harness.process_tree(pid) if name == "gateway" else [pid]
        for name, pid in pids.items()
    }
    before = harness.cpu_snapshot(groups)
    started = time.monotonic()
    popen = procs.start("curl", argv, output="text")
    try:
        out, err = popen.communicate(timeout=limit + 30)
    except subprocess.TimeoutExpired:
        raise harness.BenchError(f"curl did not finish within {limit + 30:.0f} s") from None
    finally:
        procs.stop(popen)
    ended = time.monotonic()
    cpu = harness.cpu_usage(before, harness.cpu_snapshot(groups)).groups_pct
    fields = out.split()
    if popen.returncode != 0 or len(fields) != 5:
        raise harness.BenchError(
            f"curl {url} failed (exit {popen.returncode}): {out} {err}".strip()
        )
    return Fetch(
        label=label,
        status=int(fields[0]),
        size=int(fields[1]),
        speed=float(fields[2]),
        seconds=float(fields[3]),
        ttfb=float(fields[4]),
        xcache=xcache_of(header_file),
        gateway_cpu_pct=cpu.get("gateway", float("nan")),
        emulator_cpu_pct=cpu.get("emulator", float("nan")),
        started=started,
        ended=ended,
    )


def curl_sha256(
    procs: harness.Processes, url: str, size: int, extra: Sequence[str] = ()
) -> tuple[int, int, str, str]:
    """Download ``url`` with curl, hashing its output here; ``(status, bytes, X-Cache, hex)``.

    Raises:
        BenchError: curl failed or overran its time.
    """
    limit = curl_timeout(size) * 2  # hashing in Python may slow the transfer down
    argv = [
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "-D",
        "/dev/stderr",
        "--max-time",
        f"{limit:.0f}",
        "-w",
        "%{stderr}\nHTTP_CODE %{http_code}\n",
        *extra,
        url,
    ]
    popen = procs.start("curl-sha256", argv, output="bytes")
    digest, received = hashlib.sha256(), 0
    errors: list[bytes] = []
    # stderr carries the headers and the status line: drain it in a thread so curl never
    # blocks on a full pipe while stdout is read here
    drain = threading.Thread(target=lambda: errors.append(popen.stderr.read()), daemon=True)
    drain.start()
    try:
        assert popen.stdout is not None
        while chunk := popen.stdout.read(HASH_CHUNK):  # ends at EOF: curl exits by --max-time
            digest.update(chunk)
            received += len(chunk)
        popen.wait(timeout=limit + 30)
        drain.join(timeout=30)
    except subprocess.TimeoutExpired:
        raise harness.BenchError(
            f"curl (checksum run) did not finish within {limit + 30:.0f} s"
        ) from None
    finally:
        procs.stop(popen)
    text = b"".join(errors).decode(errors="replace")
    status_match = re.search(r"^HTTP_CODE (\d+)", text, re.MULTILINE)
    if popen.returncode != 0 or status_match is None:
        raise harness.BenchError(
            f"curl {url} (checksum run) failed (exit {popen.returncode}): {text}"
        )
    xcache = last_header(text, "x-cache")
    return int(status_match.group(1)), received, xcache, digest.hexdigest()


# --------------------------------------------------------------------------- report


def mbps(bps: float) -> str:
    """Bytes/s as MB/s (10^6)."""
    return f"{bps / 1e6:,.0f}"


def gibps(bps: float) -> str:
    """Bytes/s as GiB/s."""
    return f"{bps / GIB:.2f}"


def pct(value: float) -> str:
    """A CPU percentage, ``-`` when not measured."""
    return "-" if value != value else f"{value:.0f}"  # NaN: the process was not running


def fetch_row(fetch: Fetch) -> list[str]:
    """A table row for one download."""
    return [
        fetch.label,
        str(fetch.status),
        fetch.xcache,
        f"{fetch.size:,}",
        f"{fetch.seconds:.2f}",
        f"{fetch.ttfb * 1000:.1f}",
        mbps(fetch.speed),
        gibps(fetch.speed),
        pct(fetch.gateway_cpu_pct),
        pct(fetch.emulator_cpu_pct),
    ]


def disk_write_speed(directory: Path, size: int) -> float:
    """Bytes/s of writing a new ``size``-byte file in ``directory`` in 4 MiB blocks and
    fsyncing it, as the gateway stores a cold download; the file is removed afterwards.

    The cold path cannot beat this: the gateway writes every byte of a cold download to its
    store while it relays it.
    """
    path = directory / "disk-write-probe.bin"
    block = b"\0" * (4 << 20)
    started = time.perf_counter()
    with path.open("wb") as file:
        written = 0
        while written < size:
            written += file.write(block[: min(len(block), size - written)])
        file.flush()
        os.fsync(file.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return size / elapsed if elapsed > 0 else 0.0


def report(
    args: argparse.Namespace,
    disk_speed: float,
    directs: Sequence[Fetch],
    cold: Fetch,
    cached: Sequence[Fetch],
    rss: harness.RssSampler,
    baseline_window: tuple[float, float],
    checksum_ok: bool,
    config_note: str,
    cold_range: Fetch,
    range_size: int,
    range_while_running: bool,
) -> None:
    """Print the downloads table, the summary and the targets."""
    print(f"\n## Downloads: {fmt_bytes(args.size)} ({args.size:,} B) through geopera-gateway\n")
    print(f"config: {config_note}")
    print("client: curl -o /dev/null, one download at a time; nothing pinned\n")
    print(
        harness.table(
            [
                "download",
                "status",
                "X-Cache",
                "bytes",
                "time s",
                "TTFB ms",
                "MB/s",
                "GiB/s",
                "gateway CPU %",
                "emulator CPU %",
            ],
            [fetch_row(f) for f in [*directs, cold, *cached, cold_range]],
        )
    )
    direct = max(f.speed for f in directs)
    cached_median = statistics.median(f.speed for f in cached)
    ratio = cold.speed / direct if direct else 0.0
    base = rss.median_mib(*baseline_window)
    cold_peak = rss.peak_mib(cold.started, cold.ended)
    cached_peak = rss.peak_mib(cached[0].started, cached[-1].ended)
    peak = rss.peak_mib(baseline_window[0], cached[-1].ended + 1.0)
    growth = peak - base
    print()
    print(
        harness.table(
            ["figure", "MB/s", "GiB/s", "note"],
            [
                [f"direct (best of {len(directs)})", mbps(direct), gibps(direct), "emulator"],
                ["disk write, new file", mbps(disk_speed), gibps(disk_speed), "store's disk"],
                [
                    "cold (1 run)",
                    mbps(cold.speed),
                    gibps(cold.speed),
                    f"{ratio:.0%} of direct, {cold.speed / disk_speed:.0%} of disk write",
                ],
                [
                    f"cached (median of {len(cached)})",
                    mbps(cached_median),
                    gibps(cached_median),
                    f"{cached_median / CACHED_TARGET_BPS:.2f}x 1 GiB/s",
                ],
            ],
        )
    )
    print(
        f"\ngateway RSS: baseline {base:.1f} MiB, peak {peak:.1f} MiB "
        f"(cold {cold_peak:.1f}, cached {cached_peak:.1f}), growth {growth:+.1f} MiB; "
        f"{len(rss.samples)} samples every {RSS_SAMPLE_S * 1000:.0f} ms"
    )
    print(f"SHA-256 of a gateway download: {'matches' if checksum_ok else 'WRONG'}")
    print(
        f"cold Range bytes={RANGE[0]}-{RANGE[1]} of a {range_size:,}-byte file: first byte "
        f"after {cold_range.ttfb * 1000:.1f} ms, answered in {cold_range.seconds * 1000:.1f} ms; "
        f"the transfer was {'still running' if range_while_running else 'ALREADY OVER'} then"
    )
    print()
    harness.print_targets(
        ["measured", ""],
        [
            [
                f"cold >= {COLD_RATIO_TARGET:.0%} of direct",
                f"{ratio:.0%}",
                f"{mbps(cold.speed)} vs {mbps(direct)} MB/s",
                harness.verdict(ratio >= COLD_RATIO_TARGET),
            ],
            [
                "cached >= 1 GiB/s",
                f"{gibps(cached_median)} GiB/s",
                f"{mbps(cached_median)} MB/s",
                harness.verdict(cached_median >= CACHED_TARGET_BPS),
            ],
            [
                f"gateway RSS growth < {RSS_TARGET_MIB:g} MiB",
                f"{growth:.1f} MiB",
                f"peak {peak:.1f} - baseline {base:.1f}",
                harness.verdict(growth < RSS_TARGET_MIB),
            ],
            [
                f"cold Range TTFB <= {RANGE_TTFB_TARGET_S:g} s",
                f"{cold_range.ttfb * 1000:.0f} ms",
                f"bytes={RANGE[0]}-{RANGE[1]} of {fmt_bytes(range_size)}, transfer running",
                harness.verdict(cold_range.ttfb <= RANGE_TTFB_TARGET_S and range_while_running),
            ],
        ],
        heading=False,
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Download one large clip file from the bundled emulator directly and "
        "through geopera-gateway (cold, then cached); throughput and the gateway's RSS "
        "growth (see the module docstring for the method).",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=GIB,
        metavar="BYTES",
        help="file size: bytes, or with KiB/MiB/GiB (default 1GiB)",
    )
    parser.add_argument("--runs", type=int, default=3, help="cached downloads (3); median counts")
    parser.add_argument(
        "--range-size",
        type=parse_size,
        default=200_000_000,
        metavar="BYTES",
        help="size of the file whose cold Range is timed (default 200,000,000)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch dir (config, logs, download store)"
    )
    args = harness.parse_options(parser, argv, {"--runs": (1, 20, "")})
    if not MIB <= args.size <= MAX_SIZE:
        parser.error("--size must be 1 MiB .. 64 GiB")
    if not MIB <= args.range_size <= MAX_SIZE:
        parser.error("--range-size must be 1 MiB .. 64 GiB")
    return args


def token_override(token: str) -> gwconfig.Override:
    """A client token with the ``downloads`` scope, for gateways with client access control
    (optional: older gateways, which need no token, refuse ``[[tokens]]``)."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    return gwconfig.Override(
        "[[tokens]] bench, scope downloads",
        f'[[tokens]]\nname = "bench"\nsha256 = "{digest}"\nscopes = ["downloads"]\n',
    )


def overrides(size: int, range_size: int) -> list[gwconfig.Override]:
    """The config overrides; all of them must be accepted."""
    store_limit = max(2 * GIB, 2 * size + range_size)
    return [
        gwconfig.Override("server.access_log = false", "[server]\naccess_log = false\n"),
        gwconfig.Override('clients.rate_limit = "off"', '[clients]\nrate_limit = "off"\n'),
        gwconfig.Override("limits.bytes_per_s = 0 (off)", "[limits]\nbytes_per_s = 0\n"),
        gwconfig.Override(
            f"downloads.size_limit_bytes = {store_limit}",
            f"[downloads]\nsize_limit_bytes = {store_limit}\n",
        ),
    ]


def benchmark(args: argparse.Namespace, scratch: Path, procs: harness.Processes) -> list[str]:
    """Start the processes, run the downloads and print the report; returns the problems.

    Raises:
        BenchError: a process died or did not start, curl is missing or failed, too little
            disk, or the config was not accepted.
    """
    size = args.size
    if shutil.which("curl") is None:
        raise harness.BenchError("curl not found on PATH (Debian: apt-get install curl)")
    need = max(3 * GIB, size + 2 * GIB) + args.range_size
    free = shutil.disk_usage(scratch).free
    if free < need:
        raise harness.BenchError(
            f"{scratch}: {free / GIB:.1f} GiB free, need {need / GIB:.1f} GiB "
            "(set TMPDIR to a bigger file system)"
        )
    problems: list[str] = []

    emulator = harness.start_emulator(
        procs, "--bandwidth", "0", "--asset-rps", "0", "--clip-delay-s", "0"
    )
    emulator_url = emulator.url
    job_id = create_job(emulator_url, size)
    started = time.perf_counter()
    from gateway.emulator import synthetic_sha256

    expected_sha = synthetic_sha256(size)
    print(
        f"emulator pid {emulator.pid} on {emulator_url}; job {job_id} ({size:,} B); expected "
        f"SHA-256 {expected_sha[:16]}... ({time.perf_counter() - started:.1f} s); "
        f"scratch {scratch}",
        flush=True,
    )
    pids = {"emulator": emulator.pid}

    # -- direct
    directs = []
    body = json.dumps({"job_id": job_id, "mosaic_type": MOSAIC})
    direct_args = [
        "-H",
        f"Authorization: Bearer {harness.API_KEY}",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
    ]
    for i in (1, 2):
        fetch = run_curl(
            procs,
            f"direct {i}",
            f"{emulator_url}/v1/op/{DOWNLOAD_OP}",
            size,
            scratch,
            pids,
            direct_args,
        )
        print(f"direct {i}: {fetch.status}, {fetch.size:,} B, {mbps(fetch.speed)} MB/s", flush=True)
        if not fetch.ok(size):
            problems.append(f"direct {i}: status {fetch.status}, {fetch.size:,} of {size:,} B")
        directs.append(fetch)
        procs.check_alive(emulator)

    # -- gateway
    env = harness.gateway_env(emulator_url, scratch / "tiles")
    config = scratch / "gateway.toml"
    token = "ggw_bench_" + secrets.token_urlsafe(24)
    optional = token_override(token)
    applied, _ = harness.write_gateway_config(
        config, env, required=overrides(size, args.range_size), optional=[optional]
    )
    # a gateway with client access control needs the token on /downloads; older ones do not
    auth = {"Authorization": f"Bearer {token}"} if optional.label in applied else {}
    auth_args = [arg for name, value in auth.items() for arg in ("-H", f"{name}: {value}")]
    config_note = f"{harness.BASE_CONFIG.name} + {'; '.join(applied)}"
    gateway = harness.start_gateway(procs, config, env)
    gateway_url = gateway.url
    pids["gateway"] = gateway.pid
    print(f"gateway pid {gateway.pid} on {gateway_url}; config: {config_note}", flush=True)

    status = harness.http_json(f"{gateway_url}/downloads/{job_id}", headers=auth)
    files = {f.get("mosaic_type"): f for f in status.get("files", [])}
    if status.get("status") != "completed" or files.get(MOSAIC, {}).get("size_bytes") != size:
        problems.append(f"GET /downloads/{job_id}: unexpected answer {status}")
    downloads_before = upstream_downloads(emulator_url)
    url = f"{gateway_url}/downloads/{job_id}/{MOSAIC}"

    rss = harness.RssSampler(gateway.pid, RSS_SAMPLE_S, RSS_PIDS_REFRESH_S)
    rss.start()
    cached: list[Fetch] = []
    try:
        baseline_start = time.monotonic()
        time.sleep(RSS_BASELINE_S)
        baseline_window = (baseline_start, time.monotonic())

        cold = run_curl(procs, "cold", url, size, scratch, pids, auth_args)
        print(
            f"cold: {cold.status} {cold.xcache}, {cold.size:,} B, {mbps(cold.speed)} MB/s",
            flush=True,
        )
        if not cold.ok(size) or cold.xcache != "MISS":
            problems.append(
                f"cold: status {cold.status}, X-Cache {cold.xcache}, {cold.size:,} of {size:,} B "
                "(expected 200 MISS, whole file)"
            )
        procs.check_alive(gateway)

        for i in range(1, args.runs + 1):
            fetch = run_curl(procs, f"cached {i}", url, size, scratch, pids, auth_args)
            print(
                f"cached {i}/{args.runs}: {fetch.status} {fetch.xcache}, {fetch.size:,} B, "
                f"{mbps(fetch.speed)} MB/s",
                flush=True,
            )
            if not fetch.ok(size) or fetch.xcache != "HIT":
                problems.append(
                    f"cached {i}: status {fetch.status}, X-Cache {fetch.xcache}, "
                    f"{fetch.size:,} of {size:,} B (expected 200 HIT, whole file)"
                )
            cached.append(fetch)
            procs.check_alive(gateway)
        time.sleep(2 * RSS_SAMPLE_S)
    finally:
        rss.stop()

    # -- checksum (not timed)
    code, received, xcache, sha = curl_sha256(procs, url, size, auth_args)
    checksum_ok = code == 200 and received == size and sha == expected_sha
    print(f"checksum run: {code} {xcache}, {received:,} B, SHA-256 {sha[:16]}...", flush=True)
    if not checksum_ok:
        problems.append(
            f"checksum run: status {code}, {received:,} of {size:,} B, SHA-256 {sha} "
            f"(expected {expected_sha})"
        )
    procs.check_alive(gateway)
    procs.check_alive(emulator)
    upstream = upstream_downloads(emulator_url) - downloads_before
    if upstream != 1:
        problems.append(f"the gateway made {upstream} upstream downloads (expected 1)")

    cold_range, while_running = measure_cold_range(
        procs, emulator_url, gateway_url, args.range_size, scratch, pids, auth, problems
    )
    disk_speed = disk_write_speed(scratch, size)
    report(
        args,
        disk_speed,
        directs,
        cold,
        cached,
        rss,
        baseline_window,
        checksum_ok,
        config_note,
        cold_range,
        args.range_size,
        while_running,
    )
    print(f"upstream {DOWNLOAD_OP} calls from the gateway: {upstream}")
    harness.print_log_findings(procs.log_path(gateway.popen))
    return problems


def measure_cold_range(
    procs: harness.Processes,
    emulator_url: str,
    gateway_url: str,
    size: int,
    scratch: Path,
    pids: dict[str, int],
    auth: dict[str, str],
    problems: list[str],
) -> tuple[Fetch, bool]:
    """Time ``bytes=0-1023`` of a new ``size``-byte clip file that nobody fetched yet (the
    request starts its transfer); whether its transfer was still running when the answer
    had arrived (its ``sha256`` not yet known). Then wait for the stored file through the
    ``.sha256`` URL and check the digest."""
    from gateway.emulator import synthetic_sha256

    job_id = create_job(emulator_url, size)
    url = f"{gateway_url}/downloads/{job_id}/{MOSAIC}"
    auth_args = [arg for name, value in auth.items() for arg in ("-H", f"{name}: {value}")]
    first, last = RANGE
    fetch = run_curl(
        procs, "cold Range", url, last + 1, scratch, pids, [*auth_args, "-r", f"{first}-{last}"]
    )
    status = harness.http_json(f"{gateway_url}/downloads/{job_id}", headers=auth)
    while_running = [f.get("sha256") for f in status.get("files", [])] == [None]
    print(
        f"cold Range: {fetch.status} {fetch.xcache}, {fetch.size:,} B, first byte after "
        f"{fetch.ttfb * 1000:.1f} ms; transfer {'still running' if while_running else 'over'}",
        flush=True,
    )
    if (fetch.status, fetch.size, fetch.xcache) != (206, last - first + 1, "MISS"):
        problems.append(
            f"cold Range: status {fetch.status}, X-Cache {fetch.xcache}, {fetch.size:,} B "
            f"(expected 206 MISS, {last - first + 1} B)"
        )
    line = harness.http_text(url + ".sha256", headers=auth, timeout=curl_timeout(size))
    expected = synthetic_sha256(size)
    if line.split() != [expected, "clip_data.tif"]:
        problems.append(f"{url}.sha256 answered {line!r}, expected {expected}  clip_data.tif")
    return fetch, while_running


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0 measured, 1 broken, 130 interrupted)."""
    return harness.run_main(
        "bench/downloads.py",
        "geopera-bench-downloads-",
        parse_args(argv),
        benchmark,
        discard_when_kept=("tiles-downloads",),
    )


if __name__ == "__main__":
    sys.exit(main())
