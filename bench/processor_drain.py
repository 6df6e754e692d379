"""Processor drain benchmark: ``python -m bench.processor_drain [--records N] [--repeat R]``.

A stream pre-filled with N realistic records (10-record Codec 8E packets as the simulator
builds them, 100 devices, today's timestamps so rows land in the daily partitions) is
drained into PostgreSQL (with its unique index) by the processor, in-process, twice per
round and side by side:

* ``copy``: the service's writer (COPY into a staging table + INSERT ... ON CONFLICT DO
  NOTHING, one transaction per batch);
* ``plain``: the same consumer with one INSERT ... ON CONFLICT DO NOTHING per record through
  the same driver (still one transaction per batch), on at most ``--plain-records`` of the
  entries (it is much slower; its rate is what is compared).

Each uses its own consumer group on the same stream and its own fresh database on one
PostgreSQL (fsync off: the disk is not what is measured), started here with Redis (tests'
``pgproc``/``redisproc`` helpers, never the machine's shared servers). Prints one JSON line
per run and a summary with medians. Bounded in count and time (``--timeout`` per run).
Each run also reports the share of one core used by the processor (this process), Redis and
PostgreSQL (postmaster + backends), from /proc. ``--compare-txredisapi`` adds a third drain
per round with txredisapi's own reply parser instead of RedisClient's (the A/B of that change).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from teltonika_ingest.codec import record_payload  # noqa: E402
from teltonika_ingest.codec.payload import format_timestamp  # noqa: E402
from teltonika_ingest.processor.embedded import postmaster_pid  # noqa: E402
from teltonika_ingest.sim.traffic import build_packet  # noqa: E402

from pgproc import PgProcess  # noqa: E402
from redisproc import RedisProcess  # noqa: E402

STREAM = "telemetry:teltonika"
_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int | None, with_children: bool = False) -> float:
    """CPU seconds of ``pid`` (and of its children, live or reaped, if asked)."""
    if pid is None:
        return 0.0
    try:
        fields = _stat(pid)
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if with_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime (reaped children)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    child = _stat(int(entry))
                except OSError:
                    continue
                if int(child[1]) == pid:  # ppid
                    ticks += int(child[11]) + int(child[12])
    return ticks / _TICK


def fill(redis: RedisProcess, records: int, devices: int = 100) -> float:
    """XADD ``records`` entries (pipelined); returns the seconds it took."""
    import attrs

    rnd = random.Random(7)
    packet = build_packet("8E", 10, 12, rnd)
    received = format_timestamp(int(time.time() * 1000))
    start_ms = int(time.time() * 1000) - records // devices * 1000
    started = time.perf_counter()
    chunk: list[list[Any]] = []
    with redis.client(timeout=60) as c:
        for i in range(records):
            device = f"35000000{i % devices:07d}"
            record = attrs.evolve(
                packet.records[i % 10], timestamp_ms=start_ms + (i // devices) * 1000
            )
            body = record_payload(record, device, "8E", received)
            ts = format_timestamp(record.timestamp_ms)
            chunk.append(["XADD", STREAM, "*", "imei", device, "codec", "8E", "ts", ts,
                          "payload", body])  # fmt: skip
            if len(chunk) == 5000:
                c.pipeline(chunk)
                chunk = []
        if chunk:
            c.pipeline(chunk)
    return time.perf_counter() - started


async def drain(
    redis: RedisProcess,
    url: str,
    group: str,
    mode: str,
    limit: int,
    batch: int,
    timeout: float,
    pg: PgProcess | None = None,
) -> dict[str, Any]:
    from twisted.internet import reactor, task

    from teltonika_ingest.config import ProcessorConfig
    from teltonika_ingest.processor.tap import ProcessorService
    from teltonika_ingest.processor.writer import write_batch, write_plain
    from teltonika_ingest.redis import client as redis_client

    config = ProcessorConfig.from_args(
        ["--redis-url", f"redis://127.0.0.1:{redis.port}/0", "--database-url", url,
         "--metrics", "tcp:0:interface=127.0.0.1", "--group", group, "--consumer", "bench",
         "--batch-size", str(batch), "--claim-idle", "3600", "--log-level", "warn",
         "--config", ""],
        environ={},
    )  # fmt: skip
    svc = ProcessorService(config, reactor=reactor)
    svc.consumer.write_fn = write_plain if mode == "plain" else write_batch
    # "copy-txredisapi": the service's writer with txredisapi's own reply parser (the A/B of
    # RedisClient's hiredis decoding, in the same run)
    saved_protocol = redis_client._PoolFactory.protocol
    if mode == "copy-txredisapi":
        import txredisapi

        redis_client._PoolFactory.protocol = txredisapi.HiredisProtocol
    svc.consumer.lag_interval = 3600.0
    registry = svc.metrics.registry
    svc.startService()
    while not svc.migrated.called:
        await task.deferLater(reactor, 0.02, lambda: None)
    redis_pid = redis.proc.pid if redis.proc is not None else None
    pg_pid = postmaster_pid(pg.pgdata) if pg is not None else None
    redis_cpu0, pg_cpu0 = cpu_seconds(redis_pid), cpu_seconds(pg_pid, with_children=True)
    started = time.perf_counter()
    cpu0 = time.process_time()
    acked = 0.0
    while acked < limit:
        await task.deferLater(reactor, 0.05, lambda: None)
        acked = registry.get_sample_value("processor_acks_total") or 0.0
        if time.perf_counter() - started > timeout:
            break
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    writes = registry.get_sample_value("processor_write_duration_seconds_sum") or 0.0
    batches = registry.get_sample_value("processor_write_duration_seconds_count") or 0.0
    redis_cpu = cpu_seconds(redis_pid) - redis_cpu0
    await svc.stopService()
    redis_client._PoolFactory.protocol = saved_protocol
    await task.deferLater(reactor, 0.3, lambda: None)  # the backend exits and is reaped
    pg_cpu = cpu_seconds(pg_pid, with_children=True) - pg_cpu0
    return {
        "mode": mode,
        "records": int(acked),
        "seconds": round(elapsed, 2),
        "records_per_s": round(acked / elapsed),
        "processor_cpu_s": round(cpu, 2),
        # share of ONE core over the drain (2.0 = both cores of this machine)
        "processor_cores": round(cpu / elapsed, 2),
        "redis_cores": round(redis_cpu / elapsed, 2),
        "postgres_cores": round(pg_cpu / elapsed, 2),
        "processor_us_per_record": round(cpu / max(acked, 1) * 1e6, 1),
        "write_s": round(writes, 2),
        "batches": int(batches),
        "complete": acked >= limit,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.processor_drain")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--plain-records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4000)  # the processor's default
    parser.add_argument("--timeout", type=float, default=300.0, help="per run, seconds")
    parser.add_argument(
        "--compare-txredisapi",
        action="store_true",
        help="also drain with txredisapi's own reply parser each round (A/B)",
    )
    args = parser.parse_args(argv)

    from twisted.internet import defer, task

    redis = RedisProcess().start()
    pg = PgProcess().start()
    results: list[dict[str, Any]] = []
    try:
        filled = fill(redis, args.records)
        print(json.dumps({"filled": args.records, "seconds": round(filled, 1)}), flush=True)

        async def rounds(reactor: Any) -> None:
            for r in range(args.repeat):
                modes = ["copy", "plain"] + (["copy-txredisapi"] if args.compare_txredisapi else [])
                for mode in modes:
                    limit = (
                        min(args.plain_records, args.records) if mode == "plain" else args.records
                    )
                    url = pg.create_database(f"bench_{mode.replace('-', '_')}_{r}")
                    result = await drain(redis, url, f"{mode}-{r}", mode, limit,
                                         args.batch_size, args.timeout, pg)  # fmt: skip
                    result["round"] = r
                    results.append(result)
                    print(json.dumps(result), flush=True)

        task.react(lambda reactor: defer.ensureDeferred(rounds(reactor)))
    except SystemExit:
        pass
    finally:
        pg.close()
        redis.close()
    copy = [x["records_per_s"] for x in results if x["mode"] == "copy"]
    plain = [x["records_per_s"] for x in results if x["mode"] == "plain"]
    old = [x["records_per_s"] for x in results if x["mode"] == "copy-txredisapi"]
    ratios = [c / p for c, p in zip(copy, plain, strict=False) if p]

    def med(key: str, mode: str) -> float | None:
        values = [x[key] for x in results if x["mode"] == mode]
        return round(statistics.median(values), 2) if values else None

    summary = {
        "records": args.records,
        "plain_records": min(args.plain_records, args.records),
        "batch_size": args.batch_size,
        "copy_median_records_per_s": statistics.median(copy) if copy else None,
        "plain_median_records_per_s": statistics.median(plain) if plain else None,
        "ratio_median": round(statistics.median(ratios), 1) if ratios else None,
        "copy_txredisapi_median_records_per_s": statistics.median(old) if old else None,
        "copy_processor_us_per_record_median": med("processor_us_per_record", "copy"),
        "copy_txredisapi_processor_us_per_record_median": med(
            "processor_us_per_record", "copy-txredisapi"
        ),
        "copy_cores_median": {
            p: med(f"{p}_cores", "copy") for p in ("processor", "redis", "postgres")
        },
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
