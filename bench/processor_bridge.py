"""psycopg 3 under Twisted, two ways: ``python -m bench.processor_bridge [--repeat R]``.

* ``thread``: the blocking API on a one-thread pool (``deferToThreadPool``), what
  ``teltonika_ingest.processor.pg.PgWorker`` does (and ``twisted.enterprise.adbapi``);
* ``asyncio``: Twisted's asyncio reactor and ``psycopg.AsyncConnection``, bridged with
  ``Deferred.fromFuture``.

Each mode runs in its own process (a reactor is chosen once per process) against one
PostgreSQL started here, and measures, from the reactor: ``SELECT 1`` round trips (the
per-call cost of the bridge) and batch writes of 1000 decoded rows (the processor's binary
COPY straight into ``positions``). Prints one JSON line per run and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CALLS = 2000
BATCHES = 30


def _rows(k: int) -> list[Any]:
    import random

    import attrs

    from teltonika_ingest.codec import record_payload
    from teltonika_ingest.processor.decode import decode_entry
    from teltonika_ingest.sim.traffic import build_packet

    packet = build_packet("8E", 10, 12, random.Random(7))
    now = int(time.time() * 1000) - 3_600_000
    out = []
    for i in range(1000):
        device = f"3500{i % 100:011d}"
        record = attrs.evolve(packet.records[i % 10], timestamp_ms=now + k * 10_000 + i)
        body = record_payload(record, device, "8E", "2026-12-01T10:00:00.000Z")
        out.append(decode_entry("1-0", {"imei": device, "codec": "8E", "ts": "", "payload": body}))
    return out


def child(mode: str, url: str) -> None:
    if mode == "asyncio":
        from twisted.internet import asyncioreactor

        asyncioreactor.install()
    from twisted.internet import defer, reactor, task

    from teltonika_ingest.processor import writer

    batches = [_rows(k) for k in range(BATCHES)]
    result: dict[str, Any] = {"mode": mode}

    async def thread_mode() -> None:
        from teltonika_ingest.processor.pg import PgWorker

        worker = PgWorker(url, reactor=reactor, name="bench")
        worker.start()

        def select_one(conn: Any) -> None:
            conn.execute("SELECT 1")
            conn.commit()

        await worker.run(select_one)
        t = time.perf_counter()
        for _ in range(CALLS):
            await worker.run(select_one)
        result["select1_per_s"] = round(CALLS / (time.perf_counter() - t))
        t = time.perf_counter()
        for rows in batches:
            await worker.run(writer.write_batch, rows, [])
        result["rows_per_s"] = round(BATCHES * 1000 / (time.perf_counter() - t))
        await worker.stop()

    async def asyncio_mode() -> None:
        import asyncio

        import psycopg

        conn = await defer.Deferred.fromFuture(
            asyncio.ensure_future(psycopg.AsyncConnection.connect(url))
        )

        async def select_one() -> None:
            await conn.execute("SELECT 1")
            await conn.commit()

        async def write(rows: list[Any]) -> None:
            async with conn.cursor() as cur, cur.copy(writer._COPY_DIRECT) as copy:
                copy.set_types(list(writer._TYPES))
                for row in rows:
                    await copy.write_row(writer._values(row))
            await conn.commit()

        def bridge(coro: Any) -> defer.Deferred[Any]:
            return defer.Deferred.fromFuture(asyncio.ensure_future(coro))

        writer._adapt(conn)  # type: ignore[arg-type]
        await bridge(select_one())
        t = time.perf_counter()
        for _ in range(CALLS):
            await bridge(select_one())
        result["select1_per_s"] = round(CALLS / (time.perf_counter() - t))
        t = time.perf_counter()
        for rows in batches:
            await bridge(write(rows))
        result["rows_per_s"] = round(BATCHES * 1000 / (time.perf_counter() - t))
        await bridge(conn.close())

    body = thread_mode if mode == "thread" else asyncio_mode

    async def run() -> None:
        await body()
        print(json.dumps(result), flush=True)

    task.react(lambda _r: defer.ensureDeferred(run()))  # exits the process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.processor_bridge")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "URL"))
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    from pgproc import PgProcess

    pg = PgProcess().start()
    results: list[dict[str, Any]] = []
    try:
        for r in range(args.repeat):
            for mode in ("thread", "asyncio"):
                url = pg.create_database(f"bridge_{mode}_{r}")
                with __import__("psycopg").connect(url) as conn:
                    from teltonika_ingest.processor import migrate

                    migrate.migrate(conn)
                    migrate.ensure_partitions(conn, -1, 7)
                out = subprocess.run(
                    [sys.executable, "-m", "bench.processor_bridge", "--child", mode, url],
                    capture_output=True, text=True, timeout=300, cwd=ROOT,
                )  # fmt: skip
                line = [x for x in out.stdout.splitlines() if x.startswith("{")]
                if not line:
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                result = json.loads(line[-1])
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        pg.close()
    summary = {}
    for mode in ("thread", "asyncio"):
        mine = [x for x in results if x["mode"] == mode]
        if mine:
            summary[mode] = {
                key: statistics.median(x[key] for x in mine)
                for key in ("select1_per_s", "rows_per_s")
            }
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
