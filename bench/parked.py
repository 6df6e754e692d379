"""Parked-frame flood: memory held by partial frames, and whether it is given back.

    python -m bench.parked [--connections 1000] [--rounds 4] [--hold 2] [--json FILE]
                           [-- extra service options ...]

Everything on loopback, bounded in count and time:

1. ``redis-server`` on a free port (no persistence) and ``twistd -n teltonika-ingest``
   (defaults, except ports, ``--frame-timeout 0`` so that nothing but the attacker closes
   the connections, and whatever follows ``--``);
2. a warm-up round, then ``--rounds`` rounds: ``--connections`` connections each send an IMEI
   handshake, then a frame header declaring the largest data field (65,536 bytes) and all
   but one byte of it, and park there; once the service holds them (its
   ``teltonika_buffered_bytes`` gauge, where the service has it, else the RSS stops rising),
   the attacker closes them all;
3. the service's RSS (``VmRSS``) before any round, at each round's peak, and ``--settle``
   (2) seconds after each round's connections closed.

"Back near baseline" is judged as in RELIABILITY.md: the first (warm-up) round raises the
allocator's high-water mark; what matters is where later rounds end compared with the RSS
before the flood, and that they do not climb.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.soak import BIN, free_port, proc_status, scrape, wait_ready

IMEI = "356307042441013"
DATA_LENGTH = 65536


def handshake(n: int) -> bytes:
    imei = f"99{n:013d}"
    return struct.pack(">H", 15) + imei.encode()


def parked_frame() -> bytes:
    """A frame header declaring DATA_LENGTH bytes, and all but one byte of them."""
    return b"\x00" * 4 + struct.pack(">I", DATA_LENGTH) + b"\x08" + b"\x00" * (DATA_LENGTH - 2)


def park(port: int, count: int, frame: bool = True, timeout: float = 60.0) -> list[socket.socket]:
    """Open ``count`` connections, each handshaken and parked on a partial frame."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    for n in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(handshake(n))
        socks.append(s)
        sel.register(s, selectors.EVENT_READ)
        if n % 100 == 99:
            time.sleep(0.01)
    accepted = 0
    deadline = time.monotonic() + timeout
    pending = set(socks)
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            reply = s.recv(1)
            sel.unregister(s)
            pending.discard(s)
            accepted += reply == b"\x01"
    if accepted != count:
        raise RuntimeError(f"only {accepted} of {count} handshakes accepted")
    if frame:
        data = parked_frame()
        for s in socks:
            s.sendall(data)
    return socks


def held(http_port: int, pid: int, expected: int, timeout: float = 60.0) -> int:
    """Wait until the service holds the parked bytes; returns the peak RSS seen."""
    deadline = time.monotonic() + timeout
    peak, last, still = 0, -1, 0
    while time.monotonic() < deadline:
        rss = proc_status(pid)["VmRSS"]
        peak = max(peak, rss)
        buffered = scrape(http_port).get("teltonika_buffered_bytes")
        if buffered is not None and buffered >= expected:
            return max(peak, proc_status(pid)["VmRSS"])
        # an older service (no gauge) or a budget that stops short: until nothing moves
        value = buffered if buffered is not None else rss
        still = still + 1 if value == last else 0
        if still >= 10:
            return peak
        last = value
        time.sleep(0.1)
    raise RuntimeError("the service did not take the parked bytes in time")


def raise_open_files() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_open_files()
    work = Path(tempfile.mkdtemp(prefix="parked-"))
    redis_port, device_port, http_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[Any]] = []
    result: dict[str, Any] = {
        "connections": args.connections, "rounds": args.rounds,
        "parked_bytes_per_connection": 0 if args.no_frame else len(parked_frame()),
        "service_options": args.extra,
    }  # fmt: skip
    try:
        redis = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(redis)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TELTONIKA_", "REDIS_"))}
        service = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "teltonika-ingest",
             "--listen", f"tcp:{device_port}:interface=127.0.0.1",
             "--metrics", f"tcp:{http_port}:interface=127.0.0.1",
             "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--instance-id", "parked",
             "--frame-timeout", "0", "--config", "", *args.extra],
            cwd=work, env=env, stdout=(work / "service.log").open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(service)
        wait_ready(http_port, service)
        time.sleep(1.0)
        result["rss_before_kib"] = proc_status(service.pid)["VmRSS"]
        rounds = []
        for r in range(args.rounds + 1):
            started = time.monotonic()
            socks = park(device_port, args.connections, frame=not args.no_frame)
            expected = 0 if args.no_frame else args.connections * len(parked_frame())
            peak = held(http_port, service.pid, expected)
            time.sleep(args.hold)
            peak = max(peak, proc_status(service.pid)["VmRSS"])
            for s in socks:
                with contextlib.suppress(OSError):
                    s.close()
            # a connection the service no longer reads (--max-buffered-bytes) does not see
            # its peer close; the frame deadline closes it (pass --frame-timeout after --)
            closed_at = time.monotonic()
            deadline = closed_at + 90
            while scrape(http_port).get("teltonika_connections_active", 0) != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("the service kept connections open for 90 s")
                time.sleep(0.1)
            close_s = time.monotonic() - closed_at
            time.sleep(args.settle)
            after = proc_status(service.pid)["VmRSS"]
            buffered = scrape(http_port)
            rounds.append({
                "round": "warm-up" if r == 0 else r, "peak_kib": peak, "after_kib": after,
                "memory_pauses": buffered.get("teltonika_memory_pauses_total"),
                "seconds": round(time.monotonic() - started, 1), "closed_s": round(close_s, 1),
            })  # fmt: skip
            if args.verbose:
                print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
        result["rounds"] = rounds
        after = [x["after_kib"] for x in rounds[1:]]
        result["after_minus_before_kib"] = [a - result["rss_before_kib"] for a in after]
        final = scrape(http_port)
        result["service_errors"] = final.get("teltonika_unhandled_errors_total", 0) + final.get(
            "teltonika_session_errors_total", 0
        )
        service.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.wait(60)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
                p.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--hold", type=float, default=2.0, help="seconds parked per round")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds after the closes until the RSS is read"
    )
    parser.add_argument(
        "--no-frame",
        action="store_true",
        help="connections only handshake (the cost of the connections alone, for comparison)",
    )
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("extra", nargs="*", help="service options (after --)")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result.get("service_errors") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
