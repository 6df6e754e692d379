"""A fleet that drops at once: one service process's memory across a mass disconnect.

``python -m bench.disconnect_storm [--devices 15000] [--rounds 1] [--json FILE]``: a Redis
and ONE service process (``--workers 1``) started here; N devices connect over 10 s, each
sends one 10-record packet every 20 s, and after 20 s the simulator closes every connection
in the same moment (a cell outage looks like this to the service). The service's RSS is
sampled every 0.25 s. Reports, per round: RSS connected, the peak during the close, RSS
after; and CPU per packet over a 12 s steady window (the low-rate regime of the 100k
benchmark, at a size one process holds). Loopback only, bounded in time (each round stops
by itself, ~45 s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import e2e
from bench.scale import tree_rss_kib


def records_total(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("teltonika_records_total"))


def one_round(devices: int) -> dict[str, Any]:
    sim = {
        "records": 10, "codec": "8E", "ios": 22, "rate": 1 / 20, "ramp-up": 10,
        "duration": 20, "devices": devices, "ack-timeout": 30,
        "source-addresses": max(1, devices // 10_000 + 1), "imei-base": 35_200_000_000_000,
    }  # fmt: skip
    args = ["--stream-maxlen", "0", "--idle-timeout", "600"]
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        workdir = Path(tmp)
        with (
            e2e.redis_server(workdir) as (_rproc, rport),
            e2e.service(workdir, rport, args) as (sproc, port, http),
        ):
            samples: list[tuple[float, float]] = []
            halt = threading.Event()
            started = time.monotonic()

            def sample() -> None:
                while not halt.is_set():
                    samples.append((time.monotonic() - started, tree_rss_kib(sproc.pid) / 1024))
                    halt.wait(0.25)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            sim_proc = subprocess.Popen(
                e2e.simulator_argv(port, sim), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
            )
            try:
                time.sleep(14.0)  # ramp-up (10 s) and the first packets
                cpu0, m0, t0 = e2e.cpu_seconds(sproc.pid), e2e.scrape(http), time.monotonic()
                time.sleep(12.0)
                cpu1, m1, t1 = e2e.cpu_seconds(sproc.pid), e2e.scrape(http), time.monotonic()
                closing_from = time.monotonic() - started
                out, _ = sim_proc.communicate(timeout=120)
            finally:
                if sim_proc.poll() is None:
                    sim_proc.kill()
            time.sleep(5.0)  # the close and what it leaves
            halt.set()
            sampler.join(5)
    summary = json.loads(out.decode().strip().splitlines()[-1])
    before = [rss for t, rss in samples if t < closing_from]
    after_close = [rss for t, rss in samples if t >= closing_from]
    packets = (records_total(m1) - records_total(m0)) / 10
    return {
        "devices": devices,
        "connected_at_close": summary.get("connects"),
        "records_acked": summary.get("records_acked"),
        "errors": summary.get("errors"),
        "rss_connected_mib": round(before[-1], 1) if before else None,
        "rss_peak_during_close_mib": round(max(after_close), 1) if after_close else None,
        "rss_after_mib": round(after_close[-1], 1) if after_close else None,
        "cpu_us_per_packet": round((cpu1 - cpu0) / packets * 1e6) if packets else None,
        "packets_per_s": round(packets / (t1 - t0), 1),
        "p99_ack_ms": summary.get("steady_ack_latency_ms", {}).get("p99"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=15_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the rounds here as a JSON list")
    opts = parser.parse_args(argv)
    rounds = []
    for _ in range(opts.rounds):
        rounds.append(one_round(opts.devices))
        print(json.dumps(rounds[-1]), flush=True)
    if opts.json is not None:
        opts.json.write_text(json.dumps(rounds, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
