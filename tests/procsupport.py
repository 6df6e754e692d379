"""Helpers of the processor tests: entries in, rows out, the service in-process or as a
twistd child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import orjson
import psycopg

from teltonika_ingest.codec import record_payload
from teltonika_ingest.config import ProcessorConfig
from teltonika_ingest.processor.tap import ProcessorService

from device import http_get, wait_for
from redisproc import RedisProcess
from support import make_record

IMEI = "356307042441013"
STREAM = "telemetry:teltonika"
GROUP = "teltonika-processor"
DLQ = STREAM + ":processor:dlq"
BASE_MS = 1_700_000_000_000  # 2023-11-14: lands in positions_default


def payload(i: int = 0, device: str = IMEI, codec: str = "8E", **record: Any) -> bytes:
    """A realistic payload (contract §3) for record ``i`` of ``device``."""
    record.setdefault("timestamp_ms", BASE_MS + i * 1000)
    if codec == "16":
        record.setdefault("generation_type", 5)
    return record_payload(make_record(i, **record), device, codec, "2026-11-22T10:00:00.123Z")


def fields(body: bytes, device: str = IMEI, codec: str = "8E") -> list[Any]:
    ts = orjson.loads(body)["timestamp"]
    return ["imei", device, "codec", codec, "ts", ts, "payload", body]


def add(redis: RedisProcess, bodies: list[bytes], device: str = IMEI) -> list[str]:
    with redis.client() as c:
        return [
            str(x) for x in c.pipeline(["XADD", STREAM, "*", *fields(b, device)] for b in bodies)
        ]


def device_id(k: int) -> str:
    return f"35630704244{k:04d}"


def add_many(redis: RedisProcess, n: int, devices: int = 1, start: int = 0) -> list[str]:
    """``n`` entries spread over ``devices`` devices (record i goes to device i % devices)."""
    commands = []
    for i in range(start, start + n):
        dev = device_id(i % devices)
        commands.append(["XADD", STREAM, "*", *fields(payload(i, dev), dev)])
    with redis.client() as c:
        return [str(x) for x in c.pipeline(commands)]


def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description is not None else []


def count_rows(url: str) -> int:
    return int(query(url, "SELECT count(*) FROM positions")[0][0])


def pending(redis: RedisProcess) -> int:
    try:
        return int(redis.cmd("XPENDING", STREAM, GROUP)[0])
    except Exception:
        return 0


def processor_args(redis: RedisProcess, pg_url: str, *args: str) -> list[str]:
    return [
        "--redis-url", f"redis://127.0.0.1:{redis.port}/0",
        "--database-url", pg_url,
        "--metrics", "tcp:0:interface=127.0.0.1",
        "--consumer", "test-a",
        "--block-time", "0.2",
        "--config", "",
        *args,
    ]  # fmt: skip


@attrs.define
class Running:
    svc: ProcessorService
    http_port: int

    def sample(self, name: str, **labels: str) -> float:
        value = self.svc.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value

    async def get(self, path: str) -> tuple[int, bytes]:
        return await http_get(f"http://127.0.0.1:{self.http_port}{path}")


async def start_processor(
    redis: RedisProcess, pg_url: str, tmp_path: Path, *args: str, **overrides: Any
) -> Running:
    config = ProcessorConfig.from_args(
        processor_args(redis, pg_url, *args), environ={}, cwd=tmp_path
    )
    if overrides:
        config = attrs.evolve(config, **overrides)
    svc = ProcessorService(config)
    svc.consumer.lag_interval = 0.1
    svc.startService()
    port = await svc.http._waitingForPort  # type: ignore[misc]
    await wait_for(lambda: svc.migrated.called, timeout=20)
    await wait_for(lambda: svc.redis.connected and svc.reader.connected)
    return Running(svc, port.getHost().port)


def spawn_processor(
    redis: RedisProcess, pg_url: str, tmp_path: Path, consumer: str, *args: str
) -> subprocess.Popen[bytes]:
    """``twistd -n teltonika-processor`` as a child process; its log in tmp_path."""
    log = open(tmp_path / f"{consumer}.log", "ab")  # noqa: SIM115 - handed to the child
    argv = [
        os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
        "teltonika-processor", *processor_args(redis, pg_url, "--consumer", consumer, *args),
    ]  # fmt: skip
    try:
        return subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=log, env=dict(os.environ))
    finally:
        log.close()
