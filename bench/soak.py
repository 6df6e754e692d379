"""Soak: many devices for a long, bounded time; memory over time and the invariant.

    python -m bench.soak [--minutes 10] [--devices 2000] [--rate 0.2] [--records 2]
                         [--idle-storm 0] [--quick] [--json FILE]

Everything runs on loopback and stops by itself:

1. ``redis-server`` on a free port in a temporary directory (no persistence: nothing is
   killed here, and the stream must hold every record for the check at the end);
2. the service: ``twistd -n teltonika-ingest`` (defaults, except ports, ``--instance-id
   soak`` and ``--handshake-timeout 5``);
3. the simulator, ``teltonika-ingest simulate --devices N --rate R --duration ...
   --ack-log FILE``: every ACK it receives is logged;
4. optionally, every ``--storm-every`` seconds, ``--idle-storm`` connections that never
   send (closed by the service's handshake timeout), to see whether such storms leave
   memory behind over many rounds.

While it runs, the service's RSS (``/proc/<pid>/status``) and its metrics are sampled every
``--interval`` s. At the end: ``teltonika-ingest verify``'s check (zero ACKed records
missing; duplicates counted), the RSS trend over the steady part (least-squares slope after
the warm-up), the simulator's summary (ACK latency), and a clean SIGTERM stop.

``--quick``: 1 minute, 200 devices (a smoke run; nothing in CI uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            sums[sample.name] = sums.get(sample.name, 0.0) + float(sample.value)
    return sums


def wait_ready(port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the service exited during start-up")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("the service did not become ready")


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return 0.0
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    return sxy / sxx * 60.0


def idle_storm(port: int, count: int, hold: float) -> int:
    """Open ``count`` connections that never send; wait until the service closed them."""
    socks = []
    for i in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
        if i % 50 == 49:
            time.sleep(0.03)
    deadline = time.monotonic() + hold
    import selectors

    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    closed = 0
    while closed < count and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            with contextlib.suppress(OSError):
                if sock.recv(64):
                    continue
            sel.unregister(sock)
            sock.close()
            closed += 1
    for s in socks:
        s.close()
    return closed


def check_simulator() -> None:
    """The simulator must be able to log its ACKs (``--ack-log``)."""
    out = subprocess.run(
        [sys.executable, "-m", "teltonika_ingest.cli.simulate", "--help"],
        capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    if "--ack-log" not in out.stdout:
        raise SystemExit("bench.soak: this simulator has no --ack-log option; nothing to verify")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from teltonika_ingest.config import RedisTarget
    from teltonika_ingest.sim.invariant import verify

    check_simulator()

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    redis_port, device_port, http_port = free_port(), free_port(), free_port()
    ack_log = work / "acks.log"
    duration = args.minutes * 60.0
    procs: list[subprocess.Popen[Any]] = []
    samples: list[dict[str, Any]] = []
    storms: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "devices": args.devices, "rate_per_device": args.rate, "records_per_packet": args.records,
        "ios": args.ios, "minutes": args.minutes, "idle_storm": args.idle_storm,
    }  # fmt: skip
    try:
        redis = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(redis)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TELTONIKA_", "REDIS_"))}
        service_log = (work / "service.log").open("wb")
        service = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "teltonika-ingest",
             "--listen", f"tcp:{device_port}:interface=127.0.0.1",
             "--metrics", f"tcp:{http_port}:interface=127.0.0.1",
             "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--instance-id", "soak",
             "--handshake-timeout", "5", "--config", ""],
            cwd=work, env=env, stdout=service_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(service)
        wait_ready(http_port, service)
        sim_argv = [
            sys.executable, "-m", "teltonika_ingest.cli.simulate",
            "--port", str(device_port), "--devices", str(args.devices),
            "--rate", str(args.rate), "--records", str(args.records), "--ios", str(args.ios),
            "--codec", "mix", "--ramp-up", str(args.ramp_up), "--duration", str(duration),
            "--processes", str(args.processes), "--ack-log", str(ack_log), "--json", "--quiet",
        ]  # fmt: skip
        sim_out = work / "simulate.json"
        started = time.monotonic()
        with sim_out.open("wb") as out:
            sim = subprocess.Popen(sim_argv, stdout=out, stderr=subprocess.STDOUT, cwd=work)
        procs.append(sim)

        storm_thread: threading.Thread | None = None
        next_storm = started + args.ramp_up + args.storm_every
        next_sample = started
        while sim.poll() is None:
            now = time.monotonic()
            if now >= next_sample:
                next_sample += args.interval
                status = proc_status(service.pid)
                try:
                    m = scrape(http_port)
                except OSError:
                    m = {}
                samples.append({
                    "t": round(now - started, 1), "rss_kib": status["VmRSS"],
                    "hwm_kib": status["VmHWM"],
                    "connections": m.get("teltonika_connections_active"),
                    "records": m.get("teltonika_records_total"),
                    "publish_failures": m.get("teltonika_publish_failures_total"),
                    "errors": (m.get("teltonika_unhandled_errors_total", 0)
                               + m.get("teltonika_session_errors_total", 0)),
                })  # fmt: skip
                if args.verbose:
                    print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
            if (
                args.idle_storm
                and now >= next_storm
                and now < started + args.ramp_up + duration - 20
                and (storm_thread is None or not storm_thread.is_alive())
            ):
                next_storm = now + args.storm_every
                box: dict[str, Any] = {"t": round(now - started, 1), "size": args.idle_storm}

                def storm(box: dict[str, Any] = box) -> None:
                    box["closed_by_service"] = idle_storm(device_port, args.idle_storm, 30.0)

                storm_thread = threading.Thread(target=storm, daemon=True)
                storm_thread.start()
                storms.append(box)
            time.sleep(0.2)
        if storm_thread is not None:
            storm_thread.join(60)
        result["simulator"] = _sim_summary(sim_out)
        time.sleep(1.0)
        status = proc_status(service.pid)
        result["rss_end_kib"] = status["VmRSS"]
        result["hwm_kib"] = status["VmHWM"]
        final = scrape(http_port)
        result["service_errors"] = final.get("teltonika_unhandled_errors_total", 0) + final.get(
            "teltonika_session_errors_total", 0
        )
        result["publish_failures"] = final.get("teltonika_publish_failures_total", 0)
        report = verify(RedisTarget.parse(f"redis://127.0.0.1:{redis_port}/0"), [ack_log])
        result["invariant"] = report.as_dict()
        service.send_signal(signal.SIGTERM)
        try:
            result["service_exit"] = service.wait(60)
        except subprocess.TimeoutExpired:
            result["service_exit"] = "did not stop in 60 s"
        result["shutdown_complete"] = "shutdown complete" in (work / "service.log").read_text(
            errors="replace"
        )
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["workdir"] = str(work)
    warm = args.ramp_up + args.warmup
    steady = [(s["t"], s["rss_kib"]) for s in samples if s["t"] >= warm]
    result["rss_kib"] = {
        "after_warmup": steady[0][1] if steady else None,
        "end_of_load": samples[-1]["rss_kib"] if samples else None,
        "max": max(s["rss_kib"] for s in samples) if samples else None,
        "slope_kib_per_min_after_warmup": round(slope_per_minute(steady), 1),
    }
    result["storms"] = storms
    result["samples"] = samples[:: max(1, len(samples) // 40)]
    return result


def _sim_summary(path: Path) -> dict[str, Any]:
    text = path.read_text(errors="replace").strip()
    for line in reversed(text.splitlines()):
        with contextlib.suppress(ValueError):
            summary = json.loads(line)
            keep = (
                "packets_acked", "records_acked", "reconnects", "errors", "errors_total",
                "incomplete", "ack_latency_ms", "steady_ack_latency_ms", "connected_at_end",
            )  # fmt: skip
            return {k: summary[k] for k in keep if k in summary}
    return {"output": text[-2000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=0.2, help="packets/s per device")
    parser.add_argument("--records", type=int, default=2, help="records per packet")
    parser.add_argument("--ios", type=int, default=10, help="IO elements per record")
    parser.add_argument("--ramp-up", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=60.0, help="s after ramp-up")
    parser.add_argument("--processes", type=int, default=1, help="simulator processes")
    parser.add_argument("--interval", type=float, default=5.0, help="sampling interval, s")
    parser.add_argument("--idle-storm", type=int, default=0, metavar="N",
                        help="every --storm-every s, N connections that never send")  # fmt: skip
    parser.add_argument("--storm-every", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="1 minute, 200 devices")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the result here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--verbose", action="store_true", help="print samples as they come")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.devices, args.ramp_up, args.warmup = 1.0, 200, 5.0, 10.0
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    inv = result["invariant"]
    rss = result["rss_kib"]
    sim = result.get("simulator", {})
    print(text if not args.json else f"result written to {args.json}")
    print(
        f"\nsoak: {args.devices} devices, {args.minutes:g} min: "
        f"{inv['acked_records']:,} records ACKed, missing {inv['missing']}, "
        f"duplicates {inv['duplicates']}; RSS {rss['after_warmup']} -> {rss['end_of_load']} KiB "
        f"(max {rss['max']}, slope {rss['slope_kib_per_min_after_warmup']} KiB/min); "
        f"ACK p99 {sim.get('steady_ack_latency_ms', {}).get('p99')} ms; "
        f"service errors {result.get('service_errors')}",
        file=sys.stderr,
    )
    ok = inv["missing"] == 0 and not result.get("service_errors")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
