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
from teltonika_ingest.sim.traffic import build_packet  # noqa: E402

from pgproc import PgProcess  # noqa: E402
from redisproc import RedisProcess  # noqa: E402

STREAM = "telemetry:teltonika"


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
    redis: RedisProcess, url: str, group: str, mode: str, limit: int, batch: int, timeout: float
) -> dict[str, Any]:
    from twisted.internet import reactor, task

    from teltonika_ingest.config import ProcessorConfig
    from teltonika_ingest.processor.tap import ProcessorService
    from teltonika_ingest.processor.writer import write_batch, write_plain

    config = ProcessorConfig.from_args(
        ["--redis-url", f"redis://127.0.0.1:{redis.port}/0", "--database-url", url,
         "--metrics", "tcp:0:interface=127.0.0.1", "--group", group, "--consumer", "bench",
         "--batch-size", str(batch), "--claim-idle", "3600", "--log-level", "warn",
         "--config", ""],
        environ={},
    )  # fmt: skip
    svc = ProcessorService(config, reactor=reactor)
    svc.consumer.write_fn = write_plain if mode == "plain" else write_batch
    svc.consumer.lag_interval = 3600.0
    registry = svc.metrics.registry
    svc.startService()
    while not svc.migrated.called:
        await task.deferLater(reactor, 0.02, lambda: None)
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
    await svc.stopService()
    return {
        "mode": mode,
        "records": int(acked),
        "seconds": round(elapsed, 2),
        "records_per_s": round(acked / elapsed),
        "processor_cpu_s": round(cpu, 2),
        "write_s": round(writes, 2),
        "batches": int(batches),
        "complete": acked >= limit,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.processor_drain")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--plain-records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=300.0, help="per run, seconds")
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
                for mode in ("copy", "plain"):
                    limit = (
                        args.records if mode == "copy" else min(args.plain_records, args.records)
                    )
                    url = pg.create_database(f"bench_{mode}_{r}")
                    result = await drain(redis, url, f"{mode}-{r}", mode, limit,
                                         args.batch_size, args.timeout)  # fmt: skip
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
    ratios = [c / p for c, p in zip(copy, plain, strict=False) if p]
    summary = {
        "records": args.records,
        "plain_records": min(args.plain_records, args.records),
        "batch_size": args.batch_size,
        "copy_median_records_per_s": statistics.median(copy) if copy else None,
        "plain_median_records_per_s": statistics.median(plain) if plain else None,
        "ratio_median": round(statistics.median(ratios), 1) if ratios else None,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
