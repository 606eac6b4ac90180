"""The benchmarks' harness: start the emulator and the gateway, watch processes and the machine,
report.

Every benchmark in this directory (``tiles.py``, ``downloads.py``, ``egress_limits.py``) is a
``benchmark(args, scratch, procs)`` function handed to :func:`run_main`, which owns the rest:

- **Processes.** :class:`Processes` starts children in their own session (a Ctrl-C reaches
  only the benchmark, which then stops them in order) and stops each one by PID exactly once:
  SIGTERM, SIGKILL after a grace period, then SIGKILL for any descendant left behind.
  :func:`start_emulator` and :func:`start_gateway` start the two servers on free ports of
  127.0.0.1 and wait until they answer; :func:`write_gateway_config` writes the gateway's
  config from ``tiles.toml`` and the overrides of ``gwconfig.py``.
- **Watching.** With psutil: the CPU time of process groups, of every core (steal kept apart)
  and of every other process (:func:`cpu_snapshot`, :func:`cpu_usage`; a run where something
  else was busy is DISTURBED), and the resident memory of a process tree
  (:class:`RssSampler`).
- **Reporting.** Markdown tables (:func:`table`), PASS/MISS (:func:`verdict`), the targets
  table (:func:`print_targets`), counters (:func:`fmt_counter`) and the gateway log's warnings
  (:func:`print_log_findings`).
- **main().** Options shared by the benchmarks (:func:`add_server_options`,
  :func:`parse_options`) and :func:`run_main`: signals, a scratch directory, stopping every
  process, and the exit status (0 measured, 1 broken, 130 interrupted).

The emulator's HTTP API is reached with :func:`http_json`, :func:`emulator_stats`,
:func:`emulator_calls` and :func:`reset_emulator`. What each benchmark measures, and how it
reports it, stays in its own script.

Units: times in seconds unless a name says ``_ms``; CPU in % of one core (100 = one core busy
the whole time); memory in bytes unless a name says ``_mib``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import psutil
except ImportError:  # pragma: no cover - a helpful message instead of a traceback
    sys.exit("bench: psutil is missing; run the benchmarks with the project's venv python")

import gwconfig  # bench/gwconfig.py: the benchmark's directory is first on sys.path

HERE = Path(__file__).resolve().parent
BASE_CONFIG = HERE / "tiles.toml"
"""The gateway config every benchmark starts from (the bahamas layer)."""

HOST = "127.0.0.1"
API_KEY = "gpra_bench_key_123"
"""The Geopera API key the gateway sends to the emulator (which accepts any)."""
LAYER = "bahamas"
"""The layer of :data:`BASE_CONFIG`."""
RENDER_OP = "cog.tile.render"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

STOP_GRACE_S = 10.0
"""Seconds a process gets between SIGTERM and SIGKILL."""
START_TIMEOUT_S = 30.0
"""Seconds a server gets to answer after it was started."""
DISTURBED_OTHER_CPU_PCT = 10.0
"""Busy CPU that no measured process used, % of one core, above which a run is DISTURBED."""
BUSY_OTHER_MIN_PCT = 2.0
"""CPU, % of one core, from which another process is named as one of the busiest."""

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(Exception):
    """Something broke: the benchmark cannot go on (the message says what)."""


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[psutil.Process]:
    """Every living descendant of ``pid`` (children, grandchildren...); [] when it is gone."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def process_tree(pid: int) -> list[int]:
    """``pid`` and the PIDs of its living descendants."""
    return [pid, *(p.pid for p in _descendants(pid))]


def _alive(process: psutil.Process) -> bool:
    """Whether ``process`` (the same one, not a reused PID) runs and is not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


Output = Literal["log", "text", "bytes", "terminal"]
"""Where a child's output goes: ``<logdir>/<name>.log``, a text or a bytes pipe (stdout and
stderr apart), or this process's own terminal."""


@dataclass
class Child:
    """One process started by the benchmark, and its log file (None unless ``output="log"``)."""

    name: str
    popen: subprocess.Popen
    log: Path | None


class Processes:
    """Starts child processes and stops every one of them, by PID, exactly once.

    Children get their own session, so a Ctrl-C in the terminal reaches only the benchmark,
    which then stops them in order.
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int | None = None,
        env: Mapping[str, str] | None = None,
        output: Output = "log",
    ) -> subprocess.Popen:
        """Start ``argv`` (pinned to CPU ``cpu`` with taskset when given).

        taskset execs the command, so the returned PID is the command's own. stdin is
        /dev/null unless ``output="terminal"``.
        """
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        options: dict[str, Any] = {"env": env, "start_new_session": True}
        log = None
        if output == "terminal":
            popen = subprocess.Popen(argv, **options)
        elif output == "log":
            log = self.logdir / f"{name}.log"
            with log.open("ab") as out:
                popen = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **options
                )
        else:
            popen = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=output == "text",
                **options,
            )
        self.children.append(Child(name, popen, log))
        return popen

    def _child(self, popen: subprocess.Popen) -> Child | None:
        return next((c for c in self.children if c.popen is popen), None)

    def stop(self, popen: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM ``popen``, SIGKILL it after ``grace_s`` seconds; then wait up to
        ``grace_s`` for the descendants it had and SIGKILL those still running.

        Does nothing for a process that is not registered (or already stopped).
        """
        child = self._child(popen)
        if child is None:
            return
        self.children.remove(child)
        kids = _descendants(popen.pid)
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                print(f"  {child.name} (pid {popen.pid}) ignored SIGTERM; SIGKILL", flush=True)
                popen.kill()
                popen.wait(timeout=grace_s)
        deadline = time.monotonic() + grace_s
        while any(_alive(kid) for kid in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for kid in kids:
            if _alive(kid):
                print(f"  {child.name}: child pid {kid.pid} still running; SIGKILL", flush=True)
                with contextlib.suppress(psutil.Error):
                    kid.kill()  # psutil checks that the PID was not reused
        for stream in (popen.stdout, popen.stderr):
            if stream is not None:
                stream.close()

    def stop_all(self) -> None:
        """Stop every child still registered, newest first."""
        for child in reversed(list(self.children)):
            self.stop(child.popen)

    def log_path(self, popen: subprocess.Popen) -> Path | None:
        """The log file of ``popen`` (None when it has none or is not registered)."""
        child = self._child(popen)
        return None if child is None else child.log

    def log_tail(self, popen: subprocess.Popen, lines: int = 30) -> str:
        """The last ``lines`` lines of the log of ``popen`` ('' when there is none)."""
        log = self.log_path(popen)
        if log is None or not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self, server: Server) -> None:
        """Raise :class:`BenchError` with its log tail if ``server`` has exited."""
        popen = server.popen
        if popen.poll() is not None:
            raise BenchError(
                f"the {server.name} exited with {popen.returncode}:\n{self.log_tail(popen)}"
            )

    def wait_ready(
        self, url: str, popen: subprocess.Popen, timeout_s: float = START_TIMEOUT_S
    ) -> None:
        """Poll ``url`` until it answers 200, for at most ``timeout_s`` seconds.

        Raises:
            BenchError: the process exited, or ``timeout_s`` passed.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise BenchError(
                    f"{shlex.join(popen.args)} exited with {popen.returncode}:\n"
                    + self.log_tail(popen)
                )
            try:
                with _NO_PROXY.open(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise BenchError(f"{url} not ready after {timeout_s:g} s:\n{self.log_tail(popen)}")


# --------------------------------------------------------------------------- the two servers


@dataclass(frozen=True)
class Server:
    """The emulator or the gateway, started by :func:`start_emulator` / :func:`start_gateway`."""

    name: str
    url: str
    """Base URL, ``http://127.0.0.1:PORT``."""
    port: int
    popen: subprocess.Popen

    @property
    def pid(self) -> int:
        """The server's (main) process ID."""
        return self.popen.pid


def start_emulator(procs: Processes, *options: str, cpu: int | None = None) -> Server:
    """Start ``python -m gateway emulator`` with ``options`` on a free loopback port (pinned
    to CPU ``cpu`` when given) and wait until it answers ``/_emulator/stats``."""
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "emulator", "--host", HOST, "--port", str(port)]
    popen = procs.start("emulator", [*argv, *options], cpu=cpu)
    server = Server("emulator", f"http://{HOST}:{port}", port, popen)
    procs.wait_ready(server.url + "/_emulator/stats", popen)
    return server


def gateway_env(upstream_url: str | None = None, cache_dir: Path | None = None) -> dict[str, str]:
    """This process's environment without any ``GEOPERA_*``, plus the bench API key and, when
    given, ``upstream_url`` as ``GEOPERA_BASE_URL`` and ``cache_dir`` as ``GEOPERA_CACHE_DIR``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOPERA_")}
    env["GEOPERA_API_KEY"] = API_KEY
    if upstream_url is not None:
        env["GEOPERA_BASE_URL"] = upstream_url
    if cache_dir is not None:
        env["GEOPERA_CACHE_DIR"] = str(cache_dir)
    return env


def write_gateway_config(
    path: Path,
    env: Mapping[str, str],
    required: Sequence[gwconfig.Override],
    optional: Sequence[gwconfig.Override] = (),
    base: str | None = None,
) -> tuple[list[str], list[str]]:
    """Write ``base`` (default: :data:`BASE_CONFIG`) plus the overrides to ``path``.

    Every ``required`` override must be accepted by the installed gateway's config loader;
    an ``optional`` one is kept only when it is (see ``gwconfig.write_config``).

    Returns:
        ``(applied, skipped)``: labels of the overrides written, and ``label: reason`` for
        the optional ones left out.

    Raises:
        BenchError: the config does not load, or a required override was refused.
    """
    text = BASE_CONFIG.read_text() if base is None else base
    try:
        applied, skipped = gwconfig.write_config(text, path, env, [*required, *optional])
    except Exception as exc:  # ConfigError, or a gateway that does not even import
        raise BenchError(f"the benchmark config does not load: {exc}") from exc
    optional_labels = tuple(o.label + ":" for o in optional)
    refused = [reason for reason in skipped if not reason.startswith(optional_labels)]
    if refused:
        raise BenchError("the gateway refused config overrides: " + "; ".join(refused))
    return applied, skipped


def gateway_argv(config: Path, port: int, workers: int = 1) -> list[str]:
    """The command that serves the gateway with ``config`` on 127.0.0.1:``port``."""
    return [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(config),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def start_gateway(
    procs: Processes,
    config: Path,
    env: Mapping[str, str],
    workers: int = 1,
    cpu: int | None = None,
) -> Server:
    """Start ``python -m gateway serve`` on a free loopback port (pinned to CPU ``cpu`` when
    given) and wait for ``/healthz`` and, with several workers, for all of them."""
    port = free_port()
    popen = procs.start("gateway", gateway_argv(config, port, workers), cpu=cpu, env=env)
    server = Server("gateway", f"http://{HOST}:{port}", port, popen)
    procs.wait_ready(server.url + "/healthz", popen)
    if workers > 1:  # /healthz answered from one worker; give the others a moment
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(_descendants(popen.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
    return server


# --------------------------------------------------------------------------- HTTP


def http_json(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Any:
    """Send ``method`` to ``url`` (no proxy) with ``body`` as JSON (a POST without a body sends
    none) and decode the JSON answer; ``timeout`` in seconds.

    Raises:
        BenchError: an HTTP error status (with the start of its body) or no connection.
    """
    data = None if body is None else json.dumps(body).encode()
    if data is None and method == "POST":
        data = b""
    all_headers = dict(headers or {})
    if body is not None:
        all_headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode(errors="replace")
        raise BenchError(f"{method} {url}: {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise BenchError(f"{method} {url}: {exc}") from None


def http_text(url: str, headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> str:
    """``GET url`` (no proxy) and its body as text; ``timeout`` in seconds.

    Raises:
        BenchError: an HTTP error status or no connection.
    """
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        raise BenchError(f"GET {url}: {exc}") from None


def emulator_stats(emulator_url: str) -> dict[str, Any]:
    """The emulator's counters (``GET /_emulator/stats``)."""
    return http_json(emulator_url + "/_emulator/stats")


def emulator_calls(emulator_url: str, op: str) -> int:
    """Calls of operation ``op`` the emulator has counted since its last reset."""
    return int(emulator_stats(emulator_url)["calls"].get(op, 0))


def reset_emulator(emulator_url: str) -> None:
    """Zero the emulator's counters (``POST /_emulator/reset``)."""
    http_json(emulator_url + "/_emulator/reset", method="POST")


# --------------------------------------------------------------------------- watching: CPU


def _cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (processes that are gone count 0)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _core_seconds() -> dict[str, tuple[float, float, float]]:
    """Per CPU, ``(busy, steal, total)`` seconds since boot.

    busy is user + nice + system + irq + softirq (loopback TCP work mostly lands in softirq);
    steal, time the hypervisor gave to other guests, is kept apart; total adds idle and
    iowait (guest time is already inside user and nice).
    """
    result = {}
    for i, t in enumerate(psutil.cpu_times(percpu=True)):
        busy = t.user + t.nice + t.system + t.irq + t.softirq
        steal = getattr(t, "steal", 0.0)
        result[f"cpu{i}"] = (busy, steal, busy + steal + t.idle + t.iowait)
    return result


def _process_seconds() -> dict[int, tuple[str, float]]:
    """``pid -> (name, user + system CPU seconds)`` for every process on the machine."""
    result = {}
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        if times is not None:  # None: not readable (gone, or another user's on a locked box)
            result[process.pid] = (process.info["name"] or "?", times.user + times.system)
    return result


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU counters at one moment; two of them give a :class:`CpuUsage`."""

    monotonic_s: float
    groups: dict[str, tuple[list[int], float]]
    """Per named group: its PIDs and their CPU seconds so far."""
    children_s: float
    """CPU seconds of this process's children that have ended and been waited for."""
    cores: dict[str, tuple[float, float, float]]
    """Per CPU ``(busy, steal, total)`` seconds since boot; empty unless ``machine``."""
    processes: dict[int, tuple[str, float]] = field(default_factory=dict)
    """Every process's ``(name, CPU seconds)``; empty unless ``machine``."""


def cpu_snapshot(groups: Mapping[str, Iterable[int]], *, machine: bool = False) -> CpuSnapshot:
    """Read the CPU seconds of each group of PIDs and, with ``machine``, of every core and
    every process (which takes a few ms per hundred processes)."""
    processes = _process_seconds() if machine else {}
    pids = {name: list(group) for name, group in groups.items()}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuSnapshot(
        monotonic_s=time.monotonic(),
        groups={name: (group, _cpu_seconds(group)) for name, group in pids.items()},
        children_s=usage.ru_utime + usage.ru_stime,
        cores=_core_seconds() if machine else {},
        processes=processes,
    )


@dataclass(frozen=True)
class CpuUsage:
    """CPU used between two :class:`CpuSnapshot`, each figure in % of one core."""

    wall_s: float
    groups_pct: dict[str, float]
    """Per named group of processes."""
    children_pct: float
    """This process's children that ended and were waited for in between (such as wrk)."""
    core_busy_pct: dict[str, float]
    """Per CPU, busy share of that CPU's time (see ``_core_seconds``)."""
    steal_pct: float
    """The highest steal share of any CPU."""
    others: list[str]
    """The up to 3 busiest processes outside the groups, as ``name[pid] N %``."""

    def other_cpu_pct(self, *measured_pct: float) -> float:
        """Busy CPU (all cores) not used by ``measured_pct`` (the processes measured)."""
        return sum(self.core_busy_pct.values()) - sum(measured_pct)

    def note(self, *measured_pct: float) -> str:
        """``other CPU +N %``, then steal when >= 2 % and ``DISTURBED: ...`` with the busiest
        other processes when the other CPU is above :data:`DISTURBED_OTHER_CPU_PCT`."""
        other = self.other_cpu_pct(*measured_pct)
        note = f"other CPU {other:+.0f} %"
        if self.steal_pct >= 2:
            note += f", steal {self.steal_pct:.0f} %"
        if other > DISTURBED_OTHER_CPU_PCT:
            note += " DISTURBED"
            if self.others:
                note += ": " + ", ".join(self.others)
        return note


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot, exclude: Iterable[int] = ()) -> CpuUsage:
    """What was used between ``before`` and ``after`` (taken with the same groups).

    The busiest others leave out the groups' PIDs, ``exclude`` and this process; processes
    that started in between count from 0, ones that ended are not seen.
    """
    wall = max(after.monotonic_s - before.monotonic_s, 1e-6)

    def pct(seconds: float) -> float:
        return 100.0 * seconds / wall

    groups = {
        name: pct(after.groups[name][1] - seconds) for name, (_, seconds) in before.groups.items()
    }
    busy, steal = {}, 0.0
    for cpu, (busy_after, steal_after, total_after) in after.cores.items():
        busy_before, steal_before, total_before = before.cores[cpu]
        total = max(1e-6, total_after - total_before)
        busy[cpu] = 100.0 * (busy_after - busy_before) / total
        steal = max(steal, 100.0 * (steal_after - steal_before) / total)
    skip = {os.getpid(), *exclude, *(p for group, _ in before.groups.values() for p in group)}
    used = []
    for pid, (name, seconds) in after.processes.items():
        if pid not in skip:
            share = pct(seconds - before.processes.get(pid, (name, 0.0))[1])
            if share >= BUSY_OTHER_MIN_PCT:
                used.append((share, f"{name}[{pid}] {share:.0f} %"))
    return CpuUsage(
        wall_s=wall,
        groups_pct=groups,
        children_pct=pct(after.children_s - before.children_s),
        core_busy_pct=busy,
        steal_pct=steal,
        others=[text for _, text in sorted(used, reverse=True)[:3]],
    )


# --------------------------------------------------------------------------- watching: memory


def _rss_bytes(processes: Iterable[psutil.Process]) -> int:
    """Summed resident set size of ``processes``, bytes (those that are gone count 0)."""
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total


class RssSampler(threading.Thread):
    """Samples the summed RSS of a process and its descendants every ``interval_s`` seconds
    (the list of descendants is refreshed every ``refresh_s``) until :meth:`stop`."""

    def __init__(self, pid: int, interval_s: float = 0.05, refresh_s: float = 1.0) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.refresh_s = refresh_s
        self.samples: list[tuple[float, int]] = []
        """``(monotonic seconds, RSS bytes)`` per sample."""
        self._stop_event = threading.Event()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.pid), *_descendants(self.pid)]
        except psutil.Error:
            return []

    def run(self) -> None:
        """The sampling loop (the thread's body)."""
        tree, refreshed = self._tree(), time.monotonic()
        while True:
            now = time.monotonic()
            if now - refreshed >= self.refresh_s:
                tree, refreshed = self._tree(), now
            self.samples.append((now, _rss_bytes(tree)))
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        """Stop sampling (waits up to 5 s for the thread)."""
        self._stop_event.set()
        self.join(timeout=5)

    def _window(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.samples if start <= t <= end]

    def median_mib(self, start: float, end: float) -> float:
        """Median RSS of the samples taken in ``[start, end]`` (monotonic seconds), MiB."""
        values = self._window(start, end)
        return statistics.median(values) / (1 << 20) if values else float("nan")

    def peak_mib(self, start: float, end: float) -> float:
        """Peak RSS of the samples taken in ``[start, end]`` (monotonic seconds), MiB."""
        values = self._window(start, end)
        return max(values) / (1 << 20) if values else float("nan")


# --------------------------------------------------------------------------- reporting


def fmt_counter(counter: Counter) -> str:
    """``{'200': 199, ...}`` as ``200x199 ...``, most common first (``-`` when empty)."""
    return " ".join(f"{k}x{v}" for k, v in counter.most_common()) or "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with aligned columns (first column left, the rest right)."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = [
            row[i].ljust(widths[i]) if i == 0 else row[i].rjust(widths[i]) for i in range(len(row))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def _log_findings(log: Path | None) -> list[str]:
    """Lines of a gateway log at WARNING or above, or tracebacks (at most 10, then a count)."""
    if log is None or not log.exists():
        return []
    keys = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
    lines = [
        ln for ln in log.read_text(errors="replace").splitlines() if any(k in ln for k in keys)
    ]
    return lines[:10] + ([f"... {len(lines) - 10} more"] if len(lines) > 10 else [])


def print_log_findings(log: Path | None) -> None:
    """Print ``gateway log (WARNING and above):`` and those lines of ``log`` (tracebacks too,
    at most 10), or ``none``."""
    findings = _log_findings(log)
    print("gateway log (WARNING and above): " + ("none" if not findings else ""))
    for line in findings:
        print("  " + line)


def print_targets(
    columns: Sequence[str], rows: Sequence[Sequence[str]], *, heading: bool = True
) -> None:
    """Print the targets: a table of ``target``, ``columns`` and ``result`` (each row ends
    with a :func:`verdict`), after the heading ``### Targets (informational)`` unless
    ``heading`` is false; then an empty line."""
    if heading:
        print("### Targets (informational)")
        print()
    print(table(["target", *columns, "result"], rows))
    print(flush=True)


# --------------------------------------------------------------------------- main


SERVER_OPTION_RANGES: dict[str, tuple[float, float, str]] = {
    "--delay-ms": (0, 10_000, ""),
    "--workers": (1, 64, ""),
}
"""The ranges of the options of :func:`add_server_options`."""


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--delay-ms`` (the emulator's delay per upstream call, ms) and ``--workers`` (the
    gateway's worker processes); :func:`parse_options` checks them."""
    parser.add_argument(
        "--delay-ms", type=float, default=50.0, help="emulator delay per upstream call (50)"
    )
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (1)")


def parse_options(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    ranges: Mapping[str, tuple[float, float, str]],
) -> argparse.Namespace:
    """Parse ``argv`` (None: ``sys.argv``) and check the options named in ``ranges``, then
    those of :func:`add_server_options` when the parser has them.

    ``ranges`` maps an option (``"--runs"``) to ``(low, high, unit)``; a value outside
    ``[low, high]`` stops with ``--runs must be 1..20`` plus ``unit`` (such as ``" seconds"``).
    """
    args = parser.parse_args(argv)
    for option, (low, high, unit) in {**ranges, **SERVER_OPTION_RANGES}.items():
        value = getattr(args, option.lstrip("-").replace("-", "_"), None)
        if value is not None and not low <= value <= high:
            parser.error(f"{option} must be {low:g}..{high:g}{unit}")
    return args


Benchmark = Callable[[Any, Path, Processes], list[str]]
"""``benchmark(args, scratch, procs)``: measures and prints its report; returns the problems
found (empty when the run is sound); raises :class:`BenchError` when it cannot go on."""


def run_main(
    script: str,
    prefix: str,
    args: Any,
    benchmark: Benchmark,
    after: Callable[[Any, Processes], None] | None = None,
    discard_when_kept: Sequence[str] = (),
) -> int:
    """The ``main()`` every benchmark shares: signals, a scratch directory, stopping every
    process it started, and the exit status (0 measured, 1 broken, 130 interrupted).

    ``args`` are the parsed options (``args.keep`` is read); the scratch directory is
    ``tempfile.mkdtemp(prefix=prefix)`` with the logs in ``logs/``. ``after`` runs once the
    benchmark's processes are stopped (the anchors). The scratch directory is kept with
    ``--keep`` or after a problem, minus ``discard_when_kept`` (large files) unless ``--keep``
    asked for everything.
    """

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C must stop everything even when started with SIGINT ignored (as `cmd &` in a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    (scratch / "logs").mkdir()
    procs = Processes(scratch / "logs")
    keep = args.keep
    code = 1
    try:
        problems = benchmark(args, scratch, procs)
        procs.stop_all()  # before anything else runs, so nothing of ours competes for CPUs
        if problems:
            keep = True
            print("PROBLEMS (exit status 1):")
            for problem in problems:
                print("  - " + problem)
        if after is not None:
            after(args, procs)
        code = 1 if problems else 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping processes", file=sys.stderr, flush=True)
        code = 130
    except BenchError as exc:
        print(f"{script}: {exc}", file=sys.stderr, flush=True)
        keep = True
    finally:
        procs.stop_all()
        if keep:
            if not args.keep:
                for name in discard_when_kept:
                    shutil.rmtree(scratch / name, ignore_errors=True)
            print(f"scratch dir kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return code
