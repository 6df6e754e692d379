"""Live feed benchmark: ``python -m bench.live run [--clients N] [--devices D] [--seconds S]``.

Everything on loopback, every process started here and stopped again (by its pid):

1. ``redis-server`` on a free port (no persistence);
2. the feed under test: ``--target processor`` (default) runs the real
   ``twistd -n teltonika-processor --live ...`` against a PostgreSQL this script starts
   (``initdb``/``pg_ctl`` as the ``postgres`` user when run as root); ``--target live``
   runs the live feed alone (``python -m bench.live serve``: LiveService + /metrics);
3. a feeder (``python -m bench.live feed``) that adds entries to the telemetry stream in
   the ingest's exact shape (contract.md §3) at ``--rate`` entries/s for ``--devices``
   devices (each device one entry per ``devices/rate`` s; by default 2,000 devices at one
   packet a second). It stands in for the ingest + devices: on a 2-core machine the real
   ingest and 2,000 simulated devices would take the CPU the measurement needs;
4. ``--client-procs`` client processes (``python -m bench.live clients``) holding
   ``--clients`` WebSocket connections in all, each subscribed to ``--per-client`` devices
   (client i: devices i*per .. i*per+per-1, modulo the fleet, so each device has
   clients*per/devices subscribers).

Phases on the same processes: no clients, then each count of ``--clients`` (e.g.
``250,1000``), then no clients again, each ``--seconds`` long after a warm-up. Measured per
phase: durable throughput (``processor_position_writes_total`` rate) and consumer lag, the
feed's CPU time and RSS, and with clients: broadcast lag at the clients (receive time -
``received_at``; the feeder sets ``received_at`` to the moment it adds the entry)
p50/p99/max, the server's ``processor_live_broadcast_lag_seconds`` histogram, messages
received, positions dropped, closes by code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import gcwatch
from bench.e2e import (
    PYTHON,
    _stop,
    _wait_tcp,
    cpu_seconds,
    free_port,
    histogram_quantiles,
    machine_busy_seconds,
    redis_server,
    rss_kib,
    scrape,
)

BIN = Path(sys.executable).parent
TOKEN = "bench-token"


# --------------------------------------------------------------------------- feeder


def feed(args: argparse.Namespace) -> int:
    import socket

    from teltonika_ingest.codec import AvlRecord, format_timestamp, record_payload
    from teltonika_ingest.redis.resp import encode_command

    sock = socket.create_connection(("127.0.0.1", args.redis_port), 10)
    reader = sock.makefile("rb")
    imeis = [f"35{i:013d}" for i in range(args.devices)]
    tick = 0.05
    per_tick = max(1, round(args.rate * tick))
    stop_at = time.monotonic() + args.seconds
    next_at = time.monotonic()
    cursor = 0
    sent = 0
    step = 0
    while time.monotonic() < stop_at:
        now_ms = int(time.time() * 1000)
        received_at = format_timestamp(now_ms)
        cmds = []
        for _ in range(per_tick):
            i = cursor % args.devices
            cursor += 1
            if i == 0:
                step += 1
            lon = 252_000_000 + (i % 50) * 20_000 + step * 50
            lat = 546_000_000 + (i // 50) * 20_000 + step * 30
            rec = AvlRecord(
                timestamp_ms=now_ms, priority=0, longitude=lon, latitude=lat, altitude=100,
                angle=90, satellites=9, speed=40 + i % 30, event_io_id=0, io1={21: 3, 1: 1},
                io2={66: 24079},
            )  # fmt: skip
            payload = record_payload(rec, imeis[i], "8E", received_at)
            args_ = [b"XADD", args.stream.encode(), b"MAXLEN", b"~", b"200000", b"*",
                     b"imei", imeis[i].encode(), b"codec", b"8E", b"ts", b"%d" % now_ms,
                     b"payload", payload]  # fmt: skip
            cmds.append(encode_command(args_))
        sock.sendall(b"".join(cmds))
        for _ in cmds:
            line = reader.readline()
            if not line.startswith(b"$"):
                raise SystemExit(f"XADD failed: {line!r}")
            reader.readline()
        sent += len(cmds)
        next_at += tick
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"sent": sent}))
    return 0


# --------------------------------------------------------------------------- clients


def clients(args: argparse.Namespace) -> int:
    import orjson
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    from twisted.internet import reactor

    lags: list[int] = []
    state = {"open": 0, "messages": 0, "positions": 0, "measuring": False}
    closes: dict[str, int] = {}
    iso_ms: dict[str, int] = {}

    def to_ms(iso: str) -> int:
        ms = iso_ms.get(iso)
        if ms is None:
            from datetime import datetime

            ms = round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
            if len(iso_ms) > 100_000:
                iso_ms.clear()
            iso_ms[iso] = ms
        return ms

    class Client(WebSocketClientProtocol):
        devices: list[str]

        def onOpen(self) -> None:
            state["open"] += 1
            self.sendMessage(orjson.dumps({"type": "subscribe", "devices": self.devices}))

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            state["messages"] += 1
            if not state["measuring"]:
                return
            msg = orjson.loads(payload)
            if msg.get("type") == "position" and not msg.get("snapshot"):
                state["positions"] += 1
                lags.append(int(time.time() * 1000) - to_ms(msg["received_at"]))

        def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
            closes[str(code)] = closes.get(str(code), 0) + 1

    imeis = [f"35{i:013d}" for i in range(args.devices)]

    def connect(i: int) -> None:
        factory = WebSocketClientFactory(
            f"ws://127.0.0.1:{args.port}/ws", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        factory.setProtocolOptions(autoPingInterval=0)
        first = (args.offset + i) * args.per_client

        def build(addr: Any) -> Client:
            p = Client()
            p.factory = factory
            p.devices = [imeis[(first + k) % args.devices] for k in range(args.per_client)]
            return p

        factory.buildProtocol = build  # type: ignore[method-assign]
        reactor.connectTCP("127.0.0.1", args.port, factory, timeout=10)

    for i in range(args.clients):  # 50 new connections a 20 ms
        reactor.callLater(0.02 * (i // 50), connect, i)
    ramp = 0.02 * (args.clients // 50) + 1.0

    def start_measuring() -> None:
        state["measuring"] = True
        reactor.callLater(args.seconds, finish)

    def finish() -> None:
        state["measuring"] = False
        lags.sort()
        n = len(lags)

        def q(p: float) -> int | None:
            return lags[min(n - 1, int(p * n))] if n else None

        print(json.dumps({
            "open": state["open"], "messages": state["messages"], "positions": n,
            "lag_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": lags[-1] if n else None,
                       "mean": statistics.fmean(lags) if n else None},
            "closes": closes,
        }))  # fmt: skip
        sys.stdout.flush()
        reactor.stop()

    reactor.callLater(ramp + args.warmup, start_measuring)
    reactor.run()
    return 0


# --------------------------------------------------------------------------- live alone


def serve(args: argparse.Namespace) -> int:
    """The live feed alone (no durable path): LiveService + /metrics."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.twisted import MetricsResource
    from twisted.internet import defer, reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from teltonika_ingest.config import RedisTarget
    from teltonika_ingest.processor.decode import decode_entry
    from teltonika_ingest.processor.live import LiveService, LiveSettings

    registry = CollectorRegistry()
    svc = LiveService(
        LiveSettings(endpoint=f"tcp:{args.port}:interface=127.0.0.1:backlog=1024",
                     tokens_file=args.tokens,
                     stream=args.stream),
        redis_target=RedisTarget(host="127.0.0.1", port=args.redis_port),
        decode=decode_entry, snapshot=lambda devices: defer.succeed([]), registry=registry,
    )  # fmt: skip
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    reactor.listenTCP(args.metrics_port, Site(root), interface="127.0.0.1")
    svc.startService()
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    reactor.run()
    return 0


# --------------------------------------------------------------------------- orchestration


@contextlib.contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL on a unix socket in ``workdir`` (as ``postgres`` when root)."""
    initdb = shutil.which("initdb") or next(Path("/usr/lib/postgresql").glob("*/bin/initdb"), None)
    if initdb is None:
        raise RuntimeError("initdb not found")
    bindir = Path(initdb).parent
    data = workdir / "pg"
    sock = workdir / "pgsock"
    data.mkdir()
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(data, "postgres")
        shutil.chown(sock, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "bench"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    port = free_port()
    subprocess.run(
        [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(workdir / "pg.log"),
         "-o", f"-k {sock} -p {port} -c listen_addresses='' -c fsync=off", "start"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"postgresql://bench@/postgres?host={sock}&port={port}"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       stdout=subprocess.DEVNULL, check=False)  # fmt: skip


@contextlib.contextmanager
def feed_target(
    args: argparse.Namespace, workdir: Path, redis_port: int
) -> Iterator[dict[str, Any]]:
    port, metrics_port = free_port(), free_port()
    tokens = workdir / "tokens"
    tokens.write_text(f"{TOKEN} *\n")
    env = dict(os.environ)
    log = open(workdir / "target.log", "wb")  # noqa: SIM115
    with contextlib.ExitStack() as stack:
        if args.target == "processor":
            database = stack.enter_context(postgres(workdir))
            # bench.gcwatch: twistd with every collection timed (the processor has no GC metric)
            argv = [PYTHON, "-m", "bench.gcwatch", str(workdir / "gc.json"),
                    "-n", "--pidfile=", "teltonika-processor",
                    "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--database-url", database,
                    "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1",
                    "--live", f"tcp:{port}:interface=127.0.0.1:backlog=1024",
                    "--live-tokens", str(tokens),
                    "--data-dir", str(workdir / "data")]  # fmt: skip
        else:
            argv = [PYTHON, "-m", "bench.live", "serve", "--redis-port", str(redis_port),
                    "--port", str(port), "--metrics-port", str(metrics_port),
                    "--tokens", str(tokens)]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        try:
            _wait_tcp(port, proc, 60, args.target)
            _wait_tcp(metrics_port, proc, 60, args.target)
            yield {"proc": proc, "port": port, "metrics_port": metrics_port}
        finally:
            _stop(proc)
            log.close()


def _rate(before: dict[str, float], after: dict[str, float], key: str, seconds: float) -> float:
    return (after.get(key, 0.0) - before.get(key, 0.0)) / seconds


def _delta_hist(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, Any]:
    diff = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(name)}
    return histogram_quantiles(diff, name)


WRITES = 'processor_position_writes_total{status="inserted"}'


def phase(args: argparse.Namespace, target: dict[str, Any], clients: int) -> dict[str, Any]:
    pid = target["proc"].pid
    procs: list[subprocess.Popen[str]] = []
    with_clients = clients > 0
    if with_clients:
        per_proc = clients // args.client_procs
        for k in range(args.client_procs):
            procs.append(subprocess.Popen(
                [PYTHON, "-m", "bench.live", "clients", "--port", str(target["port"]),
                 "--clients", str(per_proc), "--offset", str(k * per_proc),
                 "--per-client", str(args.per_client), "--devices", str(args.devices),
                 "--seconds", str(args.seconds), "--warmup", str(args.warmup)],
                stdout=subprocess.PIPE, text=True,
            ))  # fmt: skip
        ramp = 0.02 * (per_proc // 50) + 1.0
    else:
        ramp = 0.0
    time.sleep(ramp + args.warmup)
    m0, cpu0, t0 = scrape(target["metrics_port"]), cpu_seconds(pid), time.monotonic()
    busy0 = machine_busy_seconds()
    clients0 = sum(cpu_seconds(p.pid) for p in procs)
    rss_peak = 0
    while time.monotonic() - t0 < args.seconds:
        rss_peak = max(rss_peak, rss_kib(pid)[0])
        time.sleep(0.5)
    m1, cpu1, t1 = scrape(target["metrics_port"]), cpu_seconds(pid), time.monotonic()
    busy1 = machine_busy_seconds()
    clients1 = sum(cpu_seconds(p.pid) for p in procs)
    seconds = t1 - t0
    result: dict[str, Any] = {
        "clients": clients,
        "window": [t0, t1],  # monotonic: GC pauses of the processor cut to this window
        "durable_rows_per_s": round(_rate(m0, m1, WRITES, seconds), 1),
        "consumer_lag_end": m1.get("processor_consumer_lag"),
        "feed_cpu_percent": round(100 * (cpu1 - cpu0) / seconds, 1),
        "clients_cpu_percent": round(100 * (clients1 - clients0) / seconds, 1),
        # the whole machine (2 cores = 200 %): everyone's work, ours and the other sessions'
        "machine_busy_percent": round(100 * (busy1 - busy0) / seconds, 1),
        "rss_mib_peak": round(rss_peak / 1024, 1),
        "live_connections": m1.get("processor_live_connections"),
        "server_lag": _delta_hist(m0, m1, "processor_live_broadcast_lag_seconds"),
        "positions_sent_per_s": round(_rate(
            m0, m1, 'processor_live_messages_sent_total{type="position"}', seconds), 1),
        "dropped": m1.get("processor_live_positions_dropped_total", 0.0)
        - m0.get("processor_live_positions_dropped_total", 0.0),
    }  # fmt: skip
    if procs:
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=args.seconds + 120)
            outs.append(json.loads(out.strip().splitlines()[-1]))
        p99s = [o["lag_ms"]["p99"] for o in outs if o["lag_ms"]["p99"] is not None]
        result["client"] = {
            "open": sum(o["open"] for o in outs),
            "positions": sum(o["positions"] for o in outs),
            "lag_ms_p50": max((o["lag_ms"]["p50"] or 0) for o in outs),
            "lag_ms_p99": max(p99s) if p99s else None,
            "lag_ms_max": max((o["lag_ms"]["max"] or 0) for o in outs),
            "closes": outs[0]["closes"] if len(outs) == 1 else [o["closes"] for o in outs],
        }
        time.sleep(2)  # the clients' closes reach the server
    return result


def run(args: argparse.Namespace) -> int:
    results = []
    for n in range(args.repeat):
        workdir = Path(tempfile.mkdtemp(prefix="bench-live-"))
        try:
            with (
                redis_server(workdir) as (_redis, redis_port),
                feed_target(args, workdir, redis_port) as target,
            ):
                feeder = subprocess.Popen(
                    [PYTHON, "-m", "bench.live", "feed", "--redis-port", str(redis_port),
                     "--devices", str(args.devices), "--rate", str(args.rate),
                     "--seconds", str((len(args.clients) + 2) * (args.seconds + args.warmup + 25))],
                    stdout=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    phases = [phase(args, target, 0)]
                    for count in args.clients:
                        phases.append(phase(args, target, count))
                    phases.append(phase(args, target, 0))
                finally:
                    _stop(feeder)
            gc_file = workdir / "gc.json"
            if gc_file.exists():  # written by the processor every second and at exit
                events = gcwatch.read(gc_file)
                for row in phases:
                    row["gc"] = gcwatch.window(events, *row["window"])
            run_result = {"run": n + 1, "phases": phases}
            print(json.dumps(run_result), flush=True)
            results.append(run_result)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.live")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--target", choices=("processor", "live"), default="processor")
    p.add_argument(
        "--clients",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1000],
        help="client counts, one phase each, e.g. 250,1000 (between phases without clients)",
    )
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--per-client", type=int, default=10)
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--rate", type=float, default=2000.0, help="stream entries per second")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out")
    p = sub.add_parser("feed")
    p.add_argument("--redis-port", type=int, required=True)
    p.add_argument("--stream", default="telemetry:teltonika")
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p = sub.add_parser("clients")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--per-client", type=int, default=10)
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p = sub.add_parser("serve")
    p.add_argument("--redis-port", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--stream", default="telemetry:teltonika")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if args.cmd == "feed" else None
    return {"run": run, "feed": feed, "clients": clients, "serve": serve}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
