"""Tail latency, workers and fleet size: ``python -m bench.scale tail|workers|fleet ...``.

* ``tail``: ONE service process (and one ACK-only sink), three rounds of: saturating load
  (500 devices back-to-back) against the service, then the paced load (2,000 devices x one
  10-record packet/s) against the service, then the same paced load against the sink (the
  machine's floor in that minute). Reports each paced p99 and, from the service's own metrics
  over each paced window, reactor lag, GC pauses by generation, frame -> publish call and Redis
  reply -> ACK.
* ``workers``: the same saturating load against ``--workers 1`` and ``--workers 2``,
  alternating (1, 2, 1, 2, ...), each a fresh service: throughput ratio within one run.
* ``fleet``: N connected devices (``--sizes``, default 10000,30000), each one 10-record
  packet every 60 s, start times spread over the minute; workers and simulator processes as
  the open-files limit needs (20,000 per process here), source addresses spread over
  127.0.0.0/8. Memory per connection (RSS of all workers over their idle baseline) and CPU per
  packet (all workers, steady window), p99 ACK latency, stream length against records ACKed.

Everything on loopback, bounded in time (each run stops by itself); only processes started
here are signalled, by pid. ``--json FILE`` keeps the raw results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import e2e

PACED = {"records": 10, "codec": "8E", "ios": 22, "rate": 1, "ramp-up": 5, "duration": 20,
         "devices": 2000}  # fmt: skip
SATURATE = {"records": 10, "codec": "8E", "ios": 22, "rate": 0, "ramp-up": 2, "duration": 10,
            "devices": 500}  # fmt: skip
FILES_PER_PROCESS = 20_000  # RLIMIT_NOFILE hard limit on these machines
DEVICES_PER_PROCESS = 17_000  # below it, with room for Redis, HTTP, logs and an uneven spread


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- process tree


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def service_pids(pid: int) -> list[int]:
    """The service: the twistd process and (with --workers) the fork server and the worker
    processes it forked: the whole process tree."""
    out = [pid]
    for child in children(pid):
        out.extend(service_pids(child))
    return out


def tree_rss_kib(pid: int) -> int:
    total = 0
    for p in service_pids(pid):
        with contextlib.suppress(OSError):
            total += e2e.rss_kib(p)[0]
    return total


def tree_pss_kib(pid: int) -> int:
    """Proportional set size of the service's processes: shared pages (the interpreter and
    libraries every worker maps) counted once in total, not once per process as RSS does."""
    total = 0
    for p in service_pids(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in service_pids(pid):
        with contextlib.suppress(OSError):
            total += e2e.cpu_seconds(p)
    return total


# --------------------------------------------------------------------------- metrics


def summed(metrics: dict[str, float], name: str) -> dict[str, float]:
    """Histogram ``name`` summed over every label but ``le`` (workers, generations): {le: n},
    plus "count" and "sum"."""
    out: dict[str, float] = {"count": 0.0, "sum": 0.0}
    for key, value in metrics.items():
        if key.startswith(name + "_bucket{"):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            out[le] = out.get(le, 0.0) + value
        elif key.startswith(name + "_count"):
            out["count"] += value
        elif key.startswith(name + "_sum"):
            out["sum"] += value
    return out


def by_label(metrics: dict[str, float], name: str, label: str) -> dict[str, dict[str, float]]:
    """Histogram ``name`` summed per value of ``label``."""
    values: set[str] = set()
    for key in metrics:
        if key.startswith(name) and f'{label}="' in key:
            values.add(key.split(f'{label}="', 1)[1].split('"', 1)[0])
    return {
        v: summed({k: x for k, x in metrics.items() if f'{label}="{v}"' in k}, name)
        for v in sorted(values)
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def quantile_bound(hist: dict[str, float], q: float) -> float | None:
    """Upper bound (ms) of the bucket holding quantile ``q``; None without observations."""
    count = hist.get("count", 0.0)
    if count <= 0:
        return None
    buckets = sorted(
        (float("inf") if k == "+Inf" else float(k), v)
        for k, v in hist.items()
        if k not in ("count", "sum")
    )
    for le, cumulative in buckets:
        if cumulative >= q * count:
            return le * 1000
    return None


def largest_bound(hist: dict[str, float]) -> float | None:
    """Lower bound (ms) of the highest non-empty bucket: the worst observation was above it."""
    buckets = sorted(
        (float("inf") if k == "+Inf" else float(k), v)
        for k, v in hist.items()
        if k not in ("count", "sum")
    )
    previous_le, previous_n = 0.0, 0.0
    worst = None
    for le, cumulative in buckets:
        if cumulative > previous_n:
            worst = previous_le * 1000
        previous_le, previous_n = le, cumulative
    return worst


def window_view(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    d = delta(after, before)
    out: dict[str, Any] = {}
    for short, name in (
        ("reactor_lag", "teltonika_reactor_lag_seconds"),
        ("frame_to_publish", "teltonika_frame_to_publish_seconds"),
        ("publish", "teltonika_publish_duration_seconds"),
        ("reply_to_ack", "teltonika_reply_to_ack_seconds"),
        ("ack", "teltonika_ack_latency_seconds"),
    ):
        h = summed(d, name)
        out[short] = {
            "count": h["count"],
            "p99_le_ms": quantile_bound(h, 0.99),
            "worst_above_ms": largest_bound(h),
        }
    out["gc"] = {
        gen: {
            "count": h["count"],
            "total_ms": round(h["sum"] * 1000, 1),
            "worst_above_ms": largest_bound(h),
        }
        for gen, h in by_label(d, "teltonika_gc_pause_seconds", "generation").items()
    }
    return out


# --------------------------------------------------------------------------- tail


def run_tail(rounds: int, service_args: list[str]) -> dict[str, Any]:
    sim_paced = dict(PACED)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-tail-") as tmp:
        workdir = Path(tmp)
        with (
            e2e.redis_server(workdir) as (rproc, rport),
            e2e.service(workdir, rport, service_args) as (sproc, port, http),
            e2e.sink(workdir) as (_kproc, sink_port),
        ):
            for index in range(rounds):
                sat, _, _ = e2e.run_simulator(
                    e2e.simulator_argv(port, SATURATE), e2e._sim_time_bound(SATURATE)
                )
                before = e2e.scrape(http)
                cpu0 = (tree_cpu(sproc.pid), e2e.cpu_seconds(rproc.pid))
                busy0, redis0 = e2e.machine_busy_seconds(), _evalsha_stats(rport)
                svc, sim_cpu, elapsed = e2e.run_simulator(
                    e2e.simulator_argv(port, sim_paced), e2e._sim_time_bound(sim_paced)
                )
                after = e2e.scrape(http)
                busy = e2e.machine_busy_seconds() - busy0
                redis1 = _evalsha_stats(rport)
                service_cpu = tree_cpu(sproc.pid) - cpu0[0]
                redis_cpu = e2e.cpu_seconds(rproc.pid) - cpu0[1]
                calls = redis1[0] - redis0[0]
                cpu = {
                    "service": service_cpu / elapsed,
                    "redis": redis_cpu / elapsed,
                    "simulator": sim_cpu / elapsed,
                    "other": max(0.0, (busy - service_cpu - redis_cpu - sim_cpu) / elapsed),
                }
                sink, _, _ = e2e.run_simulator(
                    e2e.simulator_argv(sink_port, sim_paced), e2e._sim_time_bound(sim_paced)
                )
                row = {
                    "round": index + 1,
                    "saturating_records_per_s": sat["records_per_s"],
                    "service": _lat(svc),
                    "sink": _lat(sink),
                    "metrics": window_view(before, after),
                    "cpu": cpu,
                    "redis_us_per_script": (redis1[1] - redis0[1]) / calls if calls else None,
                    "stream_len": int(
                        e2e._redis_cmd(rport, "XLEN", "telemetry:teltonika").decode().strip(":\r\n")
                    ),
                }
                results.append(row)
                log(
                    f"tail round {index + 1}: service p99 {row['service']['p99']:.2f} ms, "
                    f"sink p99 {row['sink']['p99']:.2f} ms, gc "
                    + ", ".join(
                        f"gen{g} {v['count']:.0f}x {v['total_ms']} ms"
                        for g, v in row["metrics"]["gc"].items()
                    )
                    + f", lag p99 <= {row['metrics']['reactor_lag']['p99_le_ms']} ms, publish "
                    f"p99 <= {row['metrics']['publish']['p99_le_ms']} ms, Redis "
                    f"{row['redis_us_per_script']} us/script, CPU "
                    + " ".join(f"{k} {v * 100:.0f}%" for k, v in cpu.items())
                )
            rss = tree_rss_kib(sproc.pid) / 1024
    service_p99 = statistics.median(r["service"]["p99"] for r in results)
    sink_p99 = statistics.median(r["sink"]["p99"] for r in results)
    return {
        "rounds": results,
        "median_service_p99_ms": service_p99,
        "median_sink_p99_ms": sink_p99,
        "service_minus_sink_ms": service_p99 - sink_p99,
        "service_rss_end_mib": rss,
        "service_args": service_args,
    }


def _by_reason(metrics: dict[str, float], name: str) -> dict[str, float]:
    """Counter ``name`` summed per ``reason`` over the workers (non-zero ones)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(name + "{") and 'reason="' in key:
            reason = key.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0.0) + value
    return {k: v for k, v in sorted(out.items()) if v}


def _evalsha_stats(port: int) -> tuple[int, int]:
    """(calls, usec) of EVALSHA in Redis' INFO commandstats."""
    text = e2e._redis_cmd(port, "INFO", "commandstats").decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(part.split("=", 1) for part in line.split(":", 1)[1].split(","))
            return int(fields["calls"]), int(fields["usec"])
    return 0, 0


def _lat(summary: dict[str, Any]) -> dict[str, Any]:
    lat = summary["steady_ack_latency_ms"]
    return {
        "p50": lat["p50"],
        "p99": lat["p99"],
        "max": lat["max"],
        "packets": summary["window_packets_acked"],
        "errors": summary["errors_total"],
        "reconnects": summary["reconnects"],
    }


# --------------------------------------------------------------------------- workers


def run_workers(repeat: int, counts: list[int], service_args: list[str]) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for index in range(repeat):
        for workers in counts:
            e2e.wait_for_quiet(5)
            with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
                workdir = Path(tmp)
                args = [*service_args, "--workers", str(workers)]
                with (
                    e2e.redis_server(workdir) as (rproc, rport),
                    e2e.service(workdir, rport, args) as (sproc, port, http),
                ):
                    time.sleep(1.0)
                    busy0 = e2e.machine_busy_seconds()
                    cpu0, rcpu0 = tree_cpu(sproc.pid), e2e.cpu_seconds(rproc.pid)
                    summary, sim_cpu, elapsed = e2e.run_simulator(
                        e2e.simulator_argv(port, SATURATE), e2e._sim_time_bound(SATURATE)
                    )
                    cpu = tree_cpu(sproc.pid) - cpu0
                    rcpu = e2e.cpu_seconds(rproc.pid) - rcpu0
                    busy = e2e.machine_busy_seconds() - busy0
                    metrics = e2e.scrape(http)
            spread = {
                k.split('worker="', 1)[1].split('"', 1)[0]: v
                for k, v in metrics.items()
                if k.startswith("teltonika_connections_total") and "worker=" in k
            }
            run = {
                "round": index + 1,
                "workers": workers,
                "records_per_s": summary["records_per_s"],
                "p99_ms": summary["steady_ack_latency_ms"]["p99"],
                "errors": summary["errors_total"],
                "cpu": {
                    "service": cpu / elapsed,
                    "redis": rcpu / elapsed,
                    "simulator": sim_cpu / elapsed,
                    "other": max(0.0, (busy - cpu - rcpu - sim_cpu) / elapsed),
                },
                "connections_per_worker": spread,
            }
            runs.append(run)
            log(
                f"workers {workers} round {index + 1}: {run['records_per_s']:,.0f} records/s, "
                f"p99 {run['p99_ms']:.1f} ms, CPU service {cpu / elapsed * 100:.0f}% redis "
                f"{rcpu / elapsed * 100:.0f}% sim {sim_cpu / elapsed * 100:.0f}%, "
                f"spread {spread}"
            )
    medians = {
        n: statistics.median(r["records_per_s"] for r in runs if r["workers"] == n) for n in counts
    }
    return {
        "runs": runs,
        "median_records_per_s": medians,
        "ratio": {n: medians[n] / medians[counts[0]] for n in counts},
        "service_args": service_args,
    }


# --------------------------------------------------------------------------- fleet


class TreeSampler(threading.Thread):
    """Memory and CPU of the service's process tree every ``interval`` s (from /proc: the
    service does nothing for it); its connection count from ``/metrics`` every
    ``scrape_interval`` s. A scrape is work for every worker (each renders its exposition)
    and for the supervisor (the merge), so the default is what a Prometheus server would do
    (15 s is the usual interval), not the once a second this sampler first did. (At 100k the
    two gave 18.7 and 17.9 ms p99 in one run each: no difference shown; BENCHMARKS.md.)"""

    def __init__(
        self, pid: int, http: int, interval: float = 1.0, scrape_interval: float = 15.0
    ) -> None:
        super().__init__(daemon=True)
        self.pid, self.http, self.interval = pid, http, interval
        self.scrape_interval = scrape_interval
        self.samples: list[dict[str, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        connections = -1.0
        next_scrape = started
        while not self._halt.is_set():
            if time.monotonic() >= next_scrape:
                next_scrape += self.scrape_interval
                try:
                    metrics = e2e.scrape(self.http)
                    connections = sum(
                        v
                        for k, v in metrics.items()
                        if k.startswith("teltonika_connections_active")
                    )
                except Exception:
                    connections = -1.0
            self.samples.append(
                {
                    "t": time.monotonic() - started,
                    "rss_kib": tree_rss_kib(self.pid),
                    "pss_kib": tree_pss_kib(self.pid),
                    "cpu_s": tree_cpu(self.pid),
                    "connections": connections,
                }
            )
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def fleet_plan(devices: int, connect_rate: float = 1_000.0) -> dict[str, int]:
    per_process = math.ceil(devices / DEVICES_PER_PROCESS)
    return {
        "workers": max(1, per_process),
        "simulators": max(1, per_process),
        # a third of the ~28,000 ephemeral ports per address at most
        "source_addresses": max(1, math.ceil(devices / 10_000) + 1),
        "ramp_up": max(10, math.ceil(devices / connect_rate)),
    }


def run_fleet(
    devices: int,
    duration: float,
    service_args: list[str],
    connect_rate: float = 1_000.0,
    simulator_nice: int = 0,
    scrape_interval: float = 15.0,
) -> dict[str, Any]:
    plan = fleet_plan(devices, connect_rate)
    sim = {
        "records": 10, "codec": "8E", "ios": 22, "rate": 1 / 60, "ramp-up": plan["ramp_up"],
        "duration": duration, "devices": devices, "ack-timeout": 30,
        "source-addresses": plan["source_addresses"],
        "imei-base": 35_200_000_000_000,
    }  # fmt: skip
    args = [
        *service_args,
        "--workers", str(plan["workers"]),
        "--stream-maxlen", "0",
        "--idle-timeout", "600",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        workdir = Path(tmp)
        with (
            e2e.redis_server(workdir) as (rproc, rport),
            e2e.service(workdir, rport, args) as (sproc, port, http),
        ):
            time.sleep(2.0)
            baseline = tree_rss_kib(sproc.pid)
            baseline_pss = tree_pss_kib(sproc.pid)
            sampler = TreeSampler(sproc.pid, http, scrape_interval=scrape_interval)
            sampler.start()
            rcpu0 = e2e.cpu_seconds(rproc.pid)
            started = time.monotonic()
            argv = e2e.simulator_argv(port, sim, plan["simulators"])
            if simulator_nice:  # the devices' CPU after the service's (they are not on its host)
                argv = ["nice", "-n", str(simulator_nice), *argv]
            summary, sim_cpu, elapsed = e2e.run_simulator(
                argv, float(plan["ramp_up"]) + duration + 180
            )
            sampler.stop()
            rcpu = e2e.cpu_seconds(rproc.pid) - rcpu0
            metrics = {}
            for attempt in range(3):  # the workers may still be closing 100,000 connections
                try:
                    metrics = e2e.scrape(http)
                    break
                except OSError as e:  # a loaded machine: keep the simulator's figures anyway
                    log(f"fleet {devices}: final /metrics scrape {attempt + 1} failed: {e}")
                    time.sleep(5.0)
            xlen = int(e2e._redis_cmd(rport, "XLEN", "telemetry:teltonika").decode().strip(":\r\n"))
            redis_rss = e2e.rss_kib(rproc.pid)[0] / 1024
            hwm = sum(e2e.rss_kib(p)[1] for p in service_pids(sproc.pid)) / 1024
    samples = sampler.samples
    full = [s for s in samples if s["connections"] >= devices * 0.999]
    ramp_end = plan["ramp_up"] + 2.0  # first packets start at the end of the ramp
    steady = [s for s in samples if ramp_end <= s["t"] <= plan["ramp_up"] + duration]
    connected = (
        max(full, key=lambda s: s["rss_kib"])
        if full
        else max(samples, key=lambda s: s["connections"])
    )
    per_conn = (connected["rss_kib"] - baseline) * 1024 / max(connected["connections"], 1)
    cpu_steady = steady[-1]["cpu_s"] - steady[0]["cpu_s"] if len(steady) >= 2 else float("nan")
    span = steady[-1]["t"] - steady[0]["t"] if len(steady) >= 2 else float("nan")
    packets_per_s = summary["packets_per_s"]
    lat = summary["steady_ack_latency_ms"]
    return {
        "devices": devices,
        "plan": plan,
        "sim": sim,
        "connected_max": max(s["connections"] for s in samples) if samples else 0,
        "rss_baseline_mib": baseline / 1024,
        "rss_connected_mib": connected["rss_kib"] / 1024,
        "rss_peak_mib": max([hwm] + [s["rss_kib"] / 1024 for s in samples]),
        "bytes_per_connection": per_conn,
        "pss_baseline_mib": baseline_pss / 1024,
        "pss_connected_mib": connected["pss_kib"] / 1024,
        "pss_peak_mib": max(s["pss_kib"] for s in samples) / 1024 if samples else None,
        "pss_bytes_per_connection": (connected["pss_kib"] - baseline_pss)
        * 1024
        / max(connected["connections"], 1),
        "cpu_service_steady_cores": cpu_steady / span if span == span and span > 0 else None,
        "cpu_us_per_packet": cpu_steady / span / packets_per_s * 1e6
        if span == span and span > 0 and packets_per_s
        else None,
        "packets_per_s": packets_per_s,
        "records_acked": summary["records_acked"],
        "stream_xlen": xlen,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "errors": summary["errors_total"],
        "errors_by_kind": summary["errors"],
        "reconnects": summary["reconnects"],
        "redis_rss_mib": redis_rss,
        "cpu_redis": rcpu / elapsed,
        "cpu_simulator": sim_cpu / elapsed,
        "wall_s": round(time.monotonic() - started, 1),
        "disconnects": _by_reason(metrics, "teltonika_disconnects_total"),
        "publish_failures": _by_reason(metrics, "teltonika_publish_failures_total"),
        "ack_metrics_p99_le_ms": quantile_bound(
            summed(metrics, "teltonika_ack_latency_seconds"), 0.99
        ),
        # the time series: t (s), connections, RSS and PSS (MiB), service CPU (s)
        "samples": [
            [
                round(x["t"], 1),
                x["connections"],
                round(x["rss_kib"] / 1024, 1),
                round(x["pss_kib"] / 1024, 1),
                round(x["cpu_s"], 2),
            ]
            for x in samples
        ],
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", nargs="+", choices=("tail", "workers", "fleet"))
    parser.add_argument("--rounds", type=int, default=3, help="tail rounds / workers repeats")
    parser.add_argument("--workers", default="1,2", help="worker counts compared (1,2)")
    parser.add_argument("--sizes", default="10000,30000", help="fleet sizes (10000,30000)")
    parser.add_argument("--fleet-duration", type=float, default=60.0, help="steady s (60)")
    parser.add_argument(
        "--connect-rate", type=float, default=1_000.0, help="fleet: new connections/s (1000)"
    )
    parser.add_argument(
        "--simulator-nice",
        type=int,
        default=0,
        help="fleet: run the simulators at this nice level (0): the service gets the CPU first",
    )
    parser.add_argument(
        "--scrape-interval",
        type=float,
        default=15.0,
        help="fleet: scrape /metrics for the connection count every this many s (15)",
    )
    parser.add_argument("--service-arg", action="append", default=[], metavar="ARG")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "tail" in args.what:
        out["tail"] = run_tail(args.rounds, args.service_arg)
    if "workers" in args.what:
        counts = [int(n) for n in args.workers.split(",")]
        out["workers"] = run_workers(args.rounds, counts, args.service_arg)
    if "fleet" in args.what:
        out["fleet"] = []
        for size in (int(n) for n in args.sizes.split(",")):
            result = run_fleet(
                size,
                args.fleet_duration,
                args.service_arg,
                args.connect_rate,
                args.simulator_nice,
                args.scrape_interval,
            )
            result["simulator_nice"] = args.simulator_nice
            result["scrape_interval"] = args.scrape_interval
            log(
                f"fleet {size}: connected {result['connected_max']:,.0f}, "
                f"{result['bytes_per_connection']:,.0f} B/connection, "
                f"{result['cpu_us_per_packet']} us CPU/packet, p99 {result['p99_ms']:.1f} ms, "
                f"RSS peak {result['rss_peak_mib']:.0f} MiB, xlen {result['stream_xlen']:,} vs "
                f"acked {result['records_acked']:,}, errors {result['errors']}"
            )
            out["fleet"].append(result)
            if args.json:  # after each size: a later failure keeps the earlier figures
                args.json.write_text(json.dumps(out, indent=2, default=str))
    text = json.dumps(out, indent=2, default=str)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
