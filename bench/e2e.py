"""End-to-end load benchmarks: ``python -m bench.e2e SCENARIO... [--repeat N] [--quick]``.

Each run starts everything from scratch and stops it again, all on loopback:

1. ``redis-server`` on a free 127.0.0.1 port (its own temporary directory; no RDB
   snapshots, no AOF: the benchmark measures ingest, not the disk);
2. the service as a real process: ``twistd -n teltonika-ingest --redis-url ...
   --listen tcp:PORT:interface=127.0.0.1 --metrics tcp:PORT:interface=127.0.0.1``
   (every other option at its default), ready when ``/readyz`` answers 200;
3. the simulator (``python -m teltonika_ingest.cli.simulate ... --json``) as its own
   process, bounded in count and time; its JSON summary is the result.

Meanwhile the service's RSS is sampled from ``/proc`` (and its peak, ``VmHWM``), the CPU
time of service, Redis and simulator is taken from ``/proc``/``getrusage``, and at the
end ``/metrics`` gives the service's own view (records, ACK latency histogram).

Scenarios (``--list``): the targets of issue 6, the ceilings (simulator against the
ACK-only ``bench.sink``; Redis XADD with ``redis-benchmark``, pipelined) and the idle
memory per connection. ``--profile DIR`` also records the service with py-spy
(collapsed stacks) during the steady window and prints where the time goes.

Only processes started here are ever signalled, by their pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teltonika_ingest.codec import format_timestamp, record_payload
from teltonika_ingest.redis.resp import encode_command
from teltonika_ingest.sim.traffic import build_packet

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    kind: str  # "service" | "sink" | "idle" | "redis"
    sim: dict[str, Any] = field(default_factory=dict)
    quick: dict[str, Any] = field(default_factory=dict)  # overrides for --quick
    target: str = ""


_B2B10 = {"records": 10, "codec": "8E", "ios": 22, "rate": 0, "ramp-up": 2, "duration": 20}
_B2B1 = {**_B2B10, "records": 1}

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "b2b10",
            "500 devices back-to-back, 10-record Codec 8E packets (22 IOs)",
            "service",
            {**_B2B10, "devices": 500},
            {"duration": 8},
            ">= 50,000 records/s",
        ),
        Scenario(
            "b2b10-1000",
            "1,000 devices back-to-back, 10-record Codec 8E packets (22 IOs)",
            "service",
            {**_B2B10, "devices": 1000},
            {"duration": 8},
            ">= 50,000 records/s",
        ),
        Scenario(
            "b2b1",
            "500 devices back-to-back, 1-record Codec 8E packets (22 IOs)",
            "service",
            {**_B2B1, "devices": 500},
            {"duration": 8},
            ">= 10,000 packets/s",
        ),
        Scenario(
            "paced",
            "2,000 devices, one 10-record packet per second each, starts spread over 1 s",
            "service",
            {**_B2B10, "devices": 2000, "rate": 1, "ramp-up": 5, "duration": 30},
            {"duration": 10},
            "p99 ACK latency <= 20 ms",
        ),
        Scenario(
            "scale",
            "10,000 devices, one 10-record packet every 10 s each",
            "service",
            {**_B2B10, "devices": 10000, "rate": 0.1, "ramp-up": 20, "duration": 60},
            {"devices": 3000, "ramp-up": 6, "duration": 20},
            "p99 ACK latency <= 20 ms and service RSS <= 128 MB",
        ),
        Scenario(
            "idle",
            "10,000 devices connected, handshake only, no packets",
            "idle",
            {"devices": 10000, "packets": 0, "ramp-up": 10, "duration": 8},
            {"devices": 2000, "ramp-up": 3, "duration": 4},
            "memory per idle connection",
        ),
        Scenario(
            "sink10",
            "ceiling: simulator against the ACK-only sink, 500 devices, 10-record packets",
            "sink",
            {**_B2B10, "devices": 500, "duration": 10},
            {"duration": 5},
        ),
        Scenario(
            "sink1",
            "ceiling: simulator against the ACK-only sink, 500 devices, 1-record packets",
            "sink",
            {**_B2B1, "devices": 500, "duration": 10},
            {"duration": 5},
        ),
        Scenario(
            "redis-xadd",
            "ceiling: Redis XADD of one record entry, redis-benchmark -P 16 -c 50",
            "redis",
            {"requests": 1_000_000},
            {"requests": 300_000},
        ),
    )
}


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[Any] | None, timeout: float = 30.0) -> None:
    """SIGTERM one process we started, wait, SIGKILL past ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait_tcp(port: int, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not listening on {port} after {timeout} s")


def _redis_cmd(port: int, *args: str) -> bytes:
    payload = encode_command(args)
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(payload)
        return s.recv(65536)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[tuple[subprocess.Popen[Any], int]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not on PATH")
    port = free_port()
    rdir = workdir / "redis"
    rdir.mkdir()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(rdir), "--logfile", str(rdir / "redis.log"), "--daemonize", "no"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_tcp(port, proc, 10, "redis-server")
        deadline = time.monotonic() + 10
        while b"PONG" not in _redis_cmd(port, "PING"):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server does not answer PING")
            time.sleep(0.05)
        yield proc, port
    finally:
        _stop(proc)


@contextlib.contextmanager
def service(
    workdir: Path, redis_port: int, extra: list[str] | None = None
) -> Iterator[tuple[subprocess.Popen[Any], int, int]]:
    """``twistd -n teltonika-ingest`` as a real process; yields (proc, device port, http port)."""
    port, http = free_port(), free_port()
    sdir = workdir / "service"
    sdir.mkdir()
    argv = [
        str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(sdir / "service.log"),
        "teltonika-ingest",
        "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--metrics", f"tcp:{http}:interface=127.0.0.1",
        "--instance-id", "bench",
        *(extra or []),
    ]  # fmt: skip
    # no stray configuration from this shell; TELTONIKA_PURE_PYTHON (not an option: the
    # compiled path on/off) does pass, for A/B runs
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TELTONIKA_", "REDIS_")) or k == "TELTONIKA_PURE_PYTHON"
    }
    with open(sdir / "stdout.log", "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=sdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                tail = (sdir / "stdout.log").read_text(errors="replace")[-2000:]
                log = sdir / "service.log"
                tail += log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"service exited with status {proc.returncode}:\n{tail}")
            url = f"http://127.0.0.1:{http}/readyz"
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=2) as r,
            ):
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("service not ready after 60 s")
            time.sleep(0.1)
        yield proc, port, http
    finally:
        _stop(proc, timeout=40)


@contextlib.contextmanager
def sink(workdir: Path) -> Iterator[tuple[subprocess.Popen[Any], int]]:
    proc = subprocess.Popen(
        [PYTHON, "-m", "bench.sink", "--port", "0", "--max-time", "900"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        match = re.match(r"listening tcp (\d+)", line)
        if not match:
            raise RuntimeError(f"sink did not start: {line!r}")
        yield proc, int(match.group(1))
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- measurements


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot, all cores."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK


def wait_for_quiet(max_wait: float, threshold: float = 0.3, log: Any = None) -> float:
    """Wait (up to ``max_wait`` s) until the machine is nearly idle: other work (other
    people's tests) skews a benchmark. Returns the busy fraction (cores) last seen."""
    deadline = time.monotonic() + max_wait
    said = False
    while True:
        before = machine_busy_seconds()
        time.sleep(1.0)
        busy = machine_busy_seconds() - before
        if busy < threshold or time.monotonic() >= deadline:
            return busy
        if log is not None and not said:
            log(f"machine busy ({busy * 100:.0f}% of a core): waiting up to {max_wait:.0f} s")
            said = True


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def scrape(http_port: int) -> dict[str, float]:
    """The service's /metrics as {sample with labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def histogram_quantiles(metrics: dict[str, float], name: str) -> dict[str, float | None]:
    """Bucket upper bounds (ms) holding p50/p99 of a Prometheus histogram, and its count."""
    buckets = []
    for key, value in metrics.items():
        match = re.fullmatch(name + r'_bucket\{le="([^"]+)"\}', key)
        if match:
            buckets.append((float(match.group(1)), value))
    buckets.sort()
    count = metrics.get(name + "_count", 0.0)
    out: dict[str, float | None] = {"count": count}
    for q in (0.5, 0.99):
        bound = None
        for le, cumulative in buckets:
            if count and cumulative >= q * count:
                bound = le * 1000
                break
        out[f"p{int(q * 100)}_le_ms"] = bound
    return out


class Sampler(threading.Thread):
    """Samples the service's RSS (and connection count) every ``interval`` s."""

    def __init__(self, pid: int, http_port: int | None, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.http_port = http_port
        self.interval = interval
        self.samples: list[tuple[float, int, float]] = []  # (t, rss KiB, connections)
        self._stop_event = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self._stop_event.is_set():
            try:
                rss, _ = rss_kib(self.pid)
            except OSError:
                return
            connections = -1.0
            if self.http_port is not None:
                with contextlib.suppress(OSError, urllib.error.URLError):
                    metrics = scrape(self.http_port)
                    connections = metrics.get("teltonika_connections_active", -1.0)
            self.samples.append((time.monotonic() - started, rss, connections))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def simulator_argv(port: int, sim: dict[str, Any], processes: int = 1) -> list[str]:
    argv = [PYTHON, "-m", "teltonika_ingest.cli.simulate", "--port", str(port)]
    for key, value in sim.items():
        argv += [f"--{key}", str(value)]
    if processes > 1:
        argv += ["--processes", str(processes)]
    return [*argv, "--json", "--quiet"]


def run_simulator(argv: list[str], timeout: float) -> tuple[dict[str, Any], float, float]:
    """Run the simulator; return its summary, its CPU seconds (children included) and
    the wall-clock seconds it ran (start-up included, as its CPU time is)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run(
        argv, cwd=ROOT, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if not lines:
        raise RuntimeError(
            f"simulator gave no summary (exit {proc.returncode}): "
            f"{proc.stderr.decode(errors='replace')[-2000:]}"
        )
    return json.loads(lines[-1]), cpu, wall


def _sim_time_bound(sim: dict[str, Any]) -> float:
    return float(sim.get("ramp-up", 0)) + float(sim.get("duration", 60)) + 120.0


def _effective(scenario: Scenario, quick: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    sim = dict(scenario.sim)
    if quick:
        sim.update(scenario.quick)
    sim.update(overrides)
    return sim


# --------------------------------------------------------------------------- one run


def run_once(
    scenario: Scenario,
    *,
    quick: bool = False,
    overrides: dict[str, Any] | None = None,
    processes: int = 1,
    profile_dir: Path | None = None,
    service_args: list[str] | None = None,
) -> dict[str, Any]:
    sim = _effective(scenario, quick, overrides or {})
    with tempfile.TemporaryDirectory(prefix=f"bench-{scenario.name}-") as tmp:
        workdir = Path(tmp)
        if scenario.kind == "redis":
            return _run_redis(workdir, int(sim["requests"]))
        if scenario.kind == "sink":
            return _run_sink(workdir, sim, processes)
        return _run_service(
            scenario, workdir, sim, processes, profile_dir, list(service_args or [])
        )


def _run_sink(workdir: Path, sim: dict[str, Any], processes: int) -> dict[str, Any]:
    with sink(workdir) as (proc, port):
        busy0 = machine_busy_seconds()
        sink_cpu0 = cpu_seconds(proc.pid)
        summary, sim_cpu, elapsed = run_simulator(
            simulator_argv(port, sim, processes), _sim_time_bound(sim)
        )
        sink_cpu = cpu_seconds(proc.pid) - sink_cpu0
        busy1 = machine_busy_seconds()
    return {
        "summary": _slim(summary),
        "sim": sim,
        "cpu": {
            "simulator": sim_cpu / elapsed,
            "sink": sink_cpu / elapsed,
            "other": max(0.0, (busy1 - busy0 - sim_cpu - sink_cpu) / max(elapsed, 1e-9)),
        },
    }


def _run_service(
    scenario: Scenario,
    workdir: Path,
    sim: dict[str, Any],
    processes: int,
    profile_dir: Path | None,
    service_args: list[str],
) -> dict[str, Any]:
    with (
        redis_server(workdir) as (rproc, rport),
        service(workdir, rport, service_args) as (
            sproc,
            port,
            http,
        ),
    ):
        time.sleep(1.0)  # let start-up settle before the baseline
        rss_start, _ = rss_kib(sproc.pid)
        sampler = Sampler(sproc.pid, http if scenario.kind == "idle" else None)
        sampler.start()
        busy0 = machine_busy_seconds()
        svc_cpu0, redis_cpu0 = cpu_seconds(sproc.pid), cpu_seconds(rproc.pid)
        profiler = None
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            delay = float(sim.get("ramp-up", 0)) + 1.0
            seconds = max(2.0, float(sim.get("duration", 10)) - 2.0)
            profiler = threading.Thread(
                target=_py_spy,
                args=(sproc.pid, profile_dir / f"{scenario.name}.collapsed", delay, seconds),
                daemon=True,
            )
            profiler.start()
        summary, sim_cpu, elapsed = run_simulator(
            simulator_argv(port, sim, processes), _sim_time_bound(sim)
        )
        svc_cpu = cpu_seconds(sproc.pid) - svc_cpu0
        redis_cpu = cpu_seconds(rproc.pid) - redis_cpu0
        busy1 = machine_busy_seconds()
        sampler.stop()
        if profiler is not None:
            profiler.join(float(sim.get("duration", 10)) + 60)
        rss_end, hwm = rss_kib(sproc.pid)
        metrics = scrape(http)
        xlen = _redis_cmd(rport, "XLEN", "telemetry:teltonika").decode().strip()
    records_total = sum(v for k, v in metrics.items() if k.startswith("teltonika_records_total{"))
    out: dict[str, Any] = {
        "summary": _slim(summary),
        "sim": sim,
        "service": {
            "rss_start_mib": rss_start / 1024,
            "rss_end_mib": rss_end / 1024,
            "rss_peak_mib": max([hwm] + [s[1] for s in sampler.samples]) / 1024,
            "records_total": records_total,
            "stream_xlen": int(xlen.lstrip(":") or 0),
            "ack_latency": histogram_quantiles(metrics, "teltonika_ack_latency_seconds"),
            "publish_latency": histogram_quantiles(metrics, "teltonika_publish_duration_seconds"),
            "publish_failures": sum(
                v for k, v in metrics.items() if k.startswith("teltonika_publish_failures_total")
            ),
        },
        "cpu": {
            "service": svc_cpu / elapsed,
            "redis": redis_cpu / elapsed,
            "simulator": sim_cpu / elapsed,
            "other": max(0.0, (busy1 - busy0 - svc_cpu - redis_cpu - sim_cpu) / elapsed),
        },
    }
    if scenario.kind == "idle":
        out["idle"] = _idle_memory(sampler.samples, rss_start, int(sim["devices"]))
    if profile_dir is not None:
        collapsed = profile_dir / f"{scenario.name}.collapsed"
        if collapsed.exists():
            out["profile"] = analyse_collapsed(collapsed)
    return out


def _idle_memory(samples: list[tuple[float, int, float]], base_kib: int, devices: int) -> dict:
    full = [s for s in samples if s[2] >= devices]
    best = max(full, key=lambda s: s[1]) if full else max(samples, key=lambda s: s[2])
    connections = int(best[2])
    per_conn = (best[1] - base_kib) * 1024 / connections if connections > 0 else 0.0
    return {
        "connections": connections,
        "rss_idle_mib": base_kib / 1024,
        "rss_connected_mib": best[1] / 1024,
        "bytes_per_connection": per_conn,
    }


def _run_redis(workdir: Path, requests: int) -> dict[str, Any]:
    """redis-benchmark XADD of one realistic entry (imei, codec, ts, ~1 kB payload)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark not on PATH")
    import random

    record = build_packet("8E", 1, 22, random.Random(1)).records[0]
    payload = record_payload(
        record, "350000000000000", "8E", format_timestamp(1_700_000_000_123)
    ).decode()
    ts = format_timestamp(record.timestamp_ms)
    with redis_server(workdir) as (rproc, port):
        cpu0 = cpu_seconds(rproc.pid)
        started = time.monotonic()
        proc = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(port), "-n", str(requests), "-c", "50",
             "-P", "16", "-q", "--csv",
             "XADD", "telemetry:teltonika", "MAXLEN", "~", "1000000", "*",
             "imei", "350000000000000", "codec", "8E", "ts", ts, "payload", payload],
            capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        redis_cpu = cpu_seconds(rproc.pid) - cpu0
    text = proc.stdout.decode(errors="replace")
    rate = 0.0
    # "<command>","rps","avg","min","p50","p95","p99","max" (the command holds JSON and
    # commas: read the numbers from the end of the line).
    for line in text.splitlines():
        match = re.search(r'"([0-9.]+)"' + r',"([0-9.]+)"' * 6 + r"\s*$", line)
        if match:
            rate = float(match.group(1))
    if not rate:
        raise RuntimeError(f"redis-benchmark gave no rate: {text} {proc.stderr.decode()}")
    return {
        "summary": {"xadd_per_s": rate, "payload_bytes": len(payload), "requests": requests},
        "cpu": {"redis": redis_cpu / elapsed},
    }


def _slim(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("histogram", "steady_histogram")}


# --------------------------------------------------------------------------- profile


def _py_spy(pid: int, out: Path, delay: float, seconds: float) -> None:
    spy = BIN / "py-spy"
    if not spy.exists():
        spy = Path(shutil.which("py-spy") or "py-spy")
    time.sleep(delay)
    subprocess.run(
        [str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
         "--rate", "200", "--format", "raw", "--idle", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 60,
    )  # fmt: skip


# Categories, matched leaf-first: a sample belongs to the deepest frame that matches.
_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Twisted's send() wrapper: time in the syscall, which on loopback also runs the peer's
    # TCP receive (the simulator's, Redis'); was counted as "reactor loop" before
    ("socket send (kernel; on loopback the peer's receive too)", ("util.py:untilConcludes",)),
    ("payload JSON (record_payload, format_timestamp)", ("codec/payload.py",)),
    ("decode (framer, CRC, AVL records)", ("teltonika_ingest/codec/", "<teltonika")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("logging (twisted.logger)", ("twisted/logger/", "twisted/python/log.py:msg")),
    ("Redis client (txredisapi, redis.client)", ("txredisapi", "teltonika_ingest/redis/client.py")),
    ("publisher", ("teltonika_ingest/server/publisher.py",)),
    (
        "session + protocol",
        ("teltonika_ingest/server/session.py", "teltonika_ingest/server/protocol.py"),
    ),
    ("Deferred machinery", ("twisted/internet/defer.py",)),
    (
        "Twisted write path (write, doWrite, send)",
        (
            "abstract.py:write",
            "abstract.py:doWrite",
            "tcp.py:writeSomeData",
            "epollreactor.py:addWriter",
            "epollreactor.py:removeWriter",
            "abstract.py:startWriting",
            "abstract.py:stopWriting",
        ),
    ),
    ("Twisted read path (doRead, recv)", ("tcp.py:doRead", "tcp.py:_dataReceived")),
    ("reactor loop, timers, context", ("twisted/internet/", "twisted/python/")),
)


def _frame_key(frame: str) -> tuple[str, str]:
    """'func (path/to/file.py:123)' -> ('func', 'path/to/file.py')."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame, ""
    return match.group(1), match.group(2)


IDLE = "idle (waiting in epoll)"


def _category(frames: list[str]) -> str:
    func, path = _frame_key(frames[-1])
    if func.endswith("doPoll") and path.endswith("epollreactor.py"):
        return IDLE
    for frame in reversed(frames):
        func, path = _frame_key(frame)
        text = f"{path}:{func}"
        for name, needles in _CATEGORIES:
            if any(n in text for n in needles):
                return name
    return "other"


def analyse_collapsed(path: Path, top: int = 25) -> dict[str, Any]:
    """Where the samples of a py-spy raw (collapsed stacks) profile went."""
    categories: dict[str, int] = {}
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if "twistd" not in frames[0]:
            continue  # not the reactor thread (Twisted's thread pool: DNS look-ups)
        total += count
        cat = _category(frames)
        categories[cat] = categories.get(cat, 0) + count
        func, file = _frame_key(frames[-1])
        leaf = f"{func} ({_short(file)})"
        own[leaf] = own.get(leaf, 0) + count
        seen = set()
        for frame in frames:
            func, file = _frame_key(frame)
            key = f"{func} ({_short(file)})"
            if key not in seen:
                seen.add(key)
                inclusive[key] = inclusive.get(key, 0) + count
    busy = total - categories.get(IDLE, 0)

    def share(n: int, of: int) -> float:
        return round(100.0 * n / of, 1) if of else 0.0

    return {
        "samples": total,
        "busy_samples": busy,
        "categories": [
            {"category": k, "pct_all": share(v, total), "pct_busy": share(v, busy)}
            for k, v in sorted(categories.items(), key=lambda kv: -kv[1])
        ],
        "top_self": [
            {"function": k, "pct_busy": share(v, busy)}
            for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:top]
            if "doPoll" not in k
        ],
        "top_inclusive": [
            {"function": k, "pct_busy": share(v, busy)}
            for k, v in sorted(inclusive.items(), key=lambda kv: -kv[1])
            if any(s in k for s in ("teltonika_ingest", "txredisapi", "prometheus", "orjson"))
        ][:top],
    }


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# --------------------------------------------------------------------------- many runs


def median_of(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(float(value))
    return statistics.median(values) if values else float("nan")


def run_many(
    name: str,
    repeat: int,
    *,
    quick: bool = False,
    processes: int = 1,
    log: Any = None,
    profile_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
    service_args: list[str] | None = None,
) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    runs = []
    for index in range(repeat):
        started = time.monotonic()
        load = os.getloadavg()[0]
        result = run_once(
            scenario,
            quick=quick,
            processes=processes,
            overrides=overrides,
            profile_dir=profile_dir if index == 0 else None,
            service_args=service_args,
        )
        result["load_before"] = load
        result["wall_s"] = round(time.monotonic() - started, 1)
        runs.append(result)
        if log is not None:
            log(f"{name} run {index + 1}/{repeat}: {one_line(name, result)}")
    return {
        "scenario": name,
        "title": scenario.title,
        "target": scenario.target,
        "sim": _effective(scenario, quick, overrides or {}),
        "processes": processes,
        "runs": runs,
    }


def one_line(name: str, result: dict[str, Any]) -> str:
    s = result["summary"]
    if "xadd_per_s" in s:
        return f"{s['xadd_per_s']:,.0f} XADD/s"
    lat = s["steady_ack_latency_ms"]
    text = (
        f"{s['records_per_s']:,.0f} records/s, {s['packets_per_s']:,.0f} packets/s, "
        f"p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} max {lat['max']:.1f} ms, "
        f"errors {s['errors_total']}"
    )
    if "service" in result:
        text += f", RSS peak {result['service']['rss_peak_mib']:.0f} MiB"
    if "idle" in result:
        text += f", {result['idle']['bytes_per_connection']:,.0f} B/connection"
    cpu = result.get("cpu", {})
    text += ", CPU " + " ".join(f"{k} {v * 100:.0f}%" for k, v in cpu.items())
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenarios", nargs="*", help="scenario names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the scenarios")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario (default 1)")
    parser.add_argument("--quick", action="store_true", help="smaller, shorter runs")
    parser.add_argument("--processes", type=int, default=1, help="simulator processes")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the service into DIR")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a simulator option, e.g. --set devices=200",
    )
    parser.add_argument(
        "--service-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra service option (repeat; e.g. --service-arg=--log-level=warn)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.list or not args.scenarios:
        for s in SCENARIOS.values():
            print(
                f"{s.name:12} {s.kind:8} {s.title}" + (f"  [target {s.target}]" if s.target else "")
            )
        return 0
    overrides = dict(item.split("=", 1) for item in args.set)
    results = []
    for name in args.scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r} (see --list)")
        result = run_many(
            name,
            args.repeat,
            quick=args.quick,
            processes=args.processes,
            log=lambda text: print(text, file=sys.stderr, flush=True),
            profile_dir=args.profile,
            overrides=overrides,
            service_args=args.service_arg,
        )
        results.append(result)
        for run in result["runs"]:
            if "profile" in run:
                print(format_profile(run["profile"]), file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def format_profile(profile: dict[str, Any]) -> str:
    lines = [f"py-spy: {profile['samples']} samples, {profile['busy_samples']} busy", ""]
    lines.append("| where | % of busy time | % of all samples |")
    lines.append("|---|---:|---:|")
    for c in profile["categories"]:
        lines.append(f"| {c['category']} | {c['pct_busy']} | {c['pct_all']} |")
    lines += ["", "| function (self time) | % of busy |", "|---|---:|"]
    for f in profile["top_self"]:
        lines.append(f"| `{f['function']}` | {f['pct_busy']} |")
    lines += ["", "| function (inclusive) | % of busy |", "|---|---:|"]
    for f in profile["top_inclusive"]:
        lines.append(f"| `{f['function']}` | {f['pct_busy']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
