"""End to end through the processor: ``python -m bench.processor_e2e [--devices N] ...``.

simulator -> ingest (``twistd -n teltonika-ingest``) -> Redis -> processor
(``twistd -n teltonika-processor``) -> PostgreSQL, every piece a real process on loopback
(Redis and PostgreSQL started here, never the machine's shared ones). Paced devices: each
sends one packet of ``--records`` records every second for ``--duration`` seconds.

Measured: the processor's ``processor_commit_delay_seconds`` histogram (from the ingest
receiving a record to its row's COMMIT, an upper bound of "ACK sent to the device -> row
visible"; the bucket holding p50/p99), ``processor_consumer_lag`` sampled every second (max,
last), the simulator's ACK latency, and at the end that PostgreSQL holds exactly the
records the devices were ACKed for (distinct (device_id, ts) = rows = records ACKed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.e2e import (
    BIN,
    ROOT,
    _stop,
    free_port,
    histogram_quantiles,
    redis_server,
    run_simulator,
    scrape,
    service,
    simulator_argv,
)

sys.path.insert(0, str(ROOT / "tests"))
from pgproc import PgProcess


def _ready(http: int) -> bool:
    with (
        contextlib.suppress(OSError, urllib.error.URLError),
        urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=2) as r,
    ):
        return bool(r.status == 200)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.processor_e2e")
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--records", type=int, default=10)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--ramp-up", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=1, help="simulator processes")
    args = parser.parse_args(argv)

    import psycopg

    result: dict[str, Any] = {"devices": args.devices, "records": args.records,
                              "duration": args.duration, "cpus": os.cpu_count()}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="proc-e2e-") as tmp:
        workdir = Path(tmp)
        pg = PgProcess().start()
        try:
            url = pg.create_database("e2e")
            with (
                redis_server(workdir) as (_redis, redis_port),
                service(workdir, redis_port) as (
                    _ingest,
                    port,
                    _ingest_http,
                ),
            ):
                http = free_port()
                log = open(workdir / "processor.log", "wb")  # noqa: SIM115
                processor = subprocess.Popen(
                    [str(BIN / "twistd"), "-n", "--pidfile=", "teltonika-processor",
                     "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--database-url", url,
                     "--metrics", f"tcp:{http}:interface=127.0.0.1", "--consumer", "bench",
                     "--config", ""],
                    cwd=workdir, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    deadline = time.monotonic() + 60
                    while not _ready(http):
                        if time.monotonic() > deadline or processor.poll() is not None:
                            raise RuntimeError("processor not ready")
                        time.sleep(0.1)
                    lags: list[float] = []
                    stop = threading.Event()

                    def sample() -> None:
                        while not stop.is_set():
                            with contextlib.suppress(OSError, urllib.error.URLError):
                                lags.append(scrape(http).get("processor_consumer_lag", -1.0))
                            stop.wait(1.0)

                    sampler = threading.Thread(target=sample, daemon=True)
                    sampler.start()
                    sim = {"devices": args.devices, "records": args.records, "codec": "8E",
                           "ios": 22, "rate": 1, "ramp-up": args.ramp_up,
                           "duration": args.duration}  # fmt: skip
                    summary, _cpu, _wall = run_simulator(
                        simulator_argv(port, sim, args.processes),
                        timeout=args.ramp_up + args.duration + 180,
                    )
                    acked = int(summary.get("records_acked", 0))
                    # drain: everything ACKed to the devices must reach PostgreSQL
                    drain_started = time.monotonic()
                    rows = 0
                    while time.monotonic() - drain_started < 120:
                        with psycopg.connect(url) as conn:
                            row = conn.execute("SELECT count(*) FROM positions").fetchone()
                            rows = int(row[0]) if row else 0
                        if rows >= acked:
                            break
                        time.sleep(0.5)
                    result["drain_after_s"] = round(time.monotonic() - drain_started, 1)
                    stop.set()
                    sampler.join(5)
                    metrics = scrape(http)
                    with psycopg.connect(url) as conn:
                        row = conn.execute(
                            "SELECT count(*), count(DISTINCT (device_id, ts)) FROM positions"
                        ).fetchone()
                    result.update(
                        {
                            "records_acked": acked,
                            "rows": row[0] if row else None,
                            "distinct_rows": row[1] if row else None,
                            "sim": {
                                k: v
                                for k, v in summary.items()
                                if "latency" in k or k.endswith("_per_s") or k == "resends"
                            },
                            "commit_delay": histogram_quantiles(
                                metrics, "processor_commit_delay_seconds"
                            ),
                            "lag_max": max(lags) if lags else None,
                            "lag_samples": len(lags),
                            "lag_last_during_run": lags[-1] if lags else None,
                            "load_average": os.getloadavg(),
                        }
                    )
                finally:
                    _stop(processor)
                    log.close()
        finally:
            pg.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
