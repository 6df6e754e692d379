"""The service in-process against a real redis-server; devices over real TCP."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor

from teltonika_ingest.codec import encode_imei
from teltonika_ingest.config import Config
from teltonika_ingest.server.tap import IngestService

from device import DeviceProtocol, connect_device, http_get, wait_for
from redisproc import RedisProcess
from support import VECTORS, avl_frame, vector_bytes

pytestmark = pytest.mark.integration

IMEI = "356307042441013"


def ack(n: int) -> bytes:
    return struct.pack(">I", n)


class Running:
    def __init__(self, svc: IngestService, device_port: int, http_port: int) -> None:
        self.svc = svc
        self.device_port = device_port
        self.http_port = http_port

    async def device(self, imei: str = IMEI) -> DeviceProtocol:
        dev = await connect_device(self.device_port)
        dev.send(encode_imei(imei))
        assert await dev.expect(1) == b"\x01"
        return dev

    async def metrics(self) -> str:
        code, body = await http_get(f"http://127.0.0.1:{self.http_port}/metrics")
        assert code == 200
        return body.decode()

    def sample(self, name: str, **labels: str) -> float:
        value = self.svc.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value


async def start(
    redis: RedisProcess,
    tmp_path: Path,
    *args: str,
    running_cls: type[Running] = Running,
    **overrides: Any,
) -> Running:
    config = Config.from_args(
        [
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--metrics",
            "tcp:0:interface=127.0.0.1",
            "--redis-url",
            f"redis://127.0.0.1:{redis.port}/0",
            "--instance-id",
            "test-a",
            "--publish-timeout",
            "1",
            *args,
        ],
        environ={},
        cwd=tmp_path,
    )
    if overrides:
        config = attrs.evolve(config, **overrides)
    svc = IngestService(config)
    svc.startService()
    device_port, http_port = await svc.listening.addTimeout(10, reactor)
    running = running_cls(svc, device_port.getHost().port, http_port.getHost().port)
    await wait_for(lambda: svc.redis.connected)
    await wait_for(lambda: svc.readiness_probe.reason() is None)  # /readyz 200
    return running


@pytest_twisted.async_yield_fixture
async def service(redis_proc: RedisProcess, tmp_path: Path) -> AsyncIterator[Running]:
    running = await start(redis_proc, tmp_path)
    yield running
    await running.svc.stopService()


def stream_entries(redis: RedisProcess, key: str = "telemetry:teltonika") -> list[dict[str, str]]:
    entries = redis.cmd("XRANGE", key, "-", "+")
    out = []
    for _id, flat in entries:
        fields = [f.decode() if isinstance(f, bytes) else f for f in flat]
        out.append(dict(zip(fields[0::2], fields[1::2], strict=True)))
    return out


@pytest_twisted.ensureDeferred
async def test_vectors_end_to_end(service: Running, redis_proc: RedisProcess) -> None:
    dev = await service.device()
    expected: list[tuple[str, dict[str, Any]]] = []
    for v in VECTORS:
        if v["kind"] != "avl":
            continue
        dev.send(bytes.fromhex(v["hex"]))
        assert await dev.expect(4) == ack(v["expect"]["ack"])
        expected += [(v["expect"]["codec"], r) for r in v["expect"]["records"]]
    entries = stream_entries(redis_proc)
    assert len(entries) == len(expected)
    for entry, (codec, record) in zip(entries, expected, strict=True):
        payload = orjson.loads(entry["payload"])
        assert entry["imei"] == IMEI
        assert entry["codec"] == codec
        assert entry["ts"] == record["timestamp"]
        assert payload["device_id"] == IMEI
        assert payload["codec"] == codec
        assert payload["received_at"].endswith("Z") and len(payload["received_at"]) == 24
        if codec != "16":
            assert payload["generation_type"] is None
        for key, value in record.items():
            assert payload[key] == value, key
        assert set(payload) == {
            "device_id", "timestamp", "received_at", "codec", "priority", "longitude",
            "latitude", "altitude", "angle", "satellites", "speed", "event_io_id",
            "generation_type", "attributes", "gps_valid", "time_valid",
        }  # fmt: skip
    assert service.sample("teltonika_records_total", codec="8") == 4
    assert service.sample("teltonika_records_total", codec="8E") == 1
    assert service.sample("teltonika_records_total", codec="16") == 2
    text = await service.metrics()
    assert 'teltonika_records_total{codec="16"} 2.0' in text
    assert 'teltonika_frames_total{codec="8",result="ok"} 3.0' in text
    assert "teltonika_publish_duration_seconds_count 5.0" in text
    assert "teltonika_ack_latency_seconds_count 5.0" in text
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_registry_set_after_handshake_and_removed_on_close(
    service: Running, redis_proc: RedisProcess
) -> None:
    dev = await connect_device(service.device_port)
    assert redis_proc.cmd("HGET", "connections:registry", IMEI) is None
    dev.send(encode_imei(IMEI))
    assert await dev.expect(1) == b"\x01"
    await wait_for(lambda: redis_proc.cmd("HGET", "connections:registry", IMEI) == "test-a")
    await dev.close()
    await wait_for(lambda: redis_proc.cmd("HEXISTS", "connections:registry", IMEI) == 0)
    assert service.sample("teltonika_connections_active") == 0


@pytest_twisted.ensureDeferred
async def test_heartbeat_ttl_and_refresh(redis_proc: RedisProcess, tmp_path: Path) -> None:
    running = await start(redis_proc, tmp_path, heartbeat_interval=0.2)
    try:
        key = "instance:heartbeat:test-a"
        await wait_for(lambda: redis_proc.cmd("EXISTS", key) == 1)
        first = int(redis_proc.cmd("GET", key))
        ttl = redis_proc.cmd("TTL", key)
        assert 0 < ttl <= 90
        await wait_for(lambda: int(redis_proc.cmd("GET", key) or 0) > first)
    finally:
        await running.svc.stopService()
    assert redis_proc.cmd("EXISTS", key) == 0  # removed on graceful shutdown


@pytest_twisted.ensureDeferred
async def test_redis_down_no_ack_then_resend_after_recovery(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    running = await start(redis_proc, tmp_path)
    try:
        dev = await running.device()
        dev.send(avl_frame(2))
        assert await dev.expect(4) == ack(2)

        redis_proc.stop()
        await wait_for(lambda: not running.svc.redis.connected)
        code, body = await http_get(f"http://127.0.0.1:{running.http_port}/readyz")
        assert code == 503 and b"redis" in body

        frame = avl_frame(3, start=100)
        dev.send(frame)
        await dev.wait_closed()  # no ACK: the service closed the connection
        assert dev.received == b""
        assert (
            running.sample("teltonika_publish_failures_total", reason="unavailable")
            + (running.sample("teltonika_publish_failures_total", reason="timeout"))
            >= 1
        )

        redis_proc.start()
        await wait_for(lambda: running.svc.redis.connected, timeout=15)

        async def ready() -> bool:
            code, _ = await http_get(f"http://127.0.0.1:{running.http_port}/readyz")
            return code == 200

        await wait_for(ready)  # once the background write probe went through
        dev2 = await running.device()  # the device reconnects and resends
        dev2.send(frame)
        assert await dev2.expect(4) == ack(3)
        # appendonly: both ACKed packets survived the restart, the unACKed one came once
        entries = stream_entries(redis_proc)
        assert len(entries) == 5
        assert [e["ts"] for e in entries[2:]] == [
            orjson.loads(e["payload"])["timestamp"] for e in entries[2:]
        ]
        await dev2.close()
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_healthz_and_readyz(service: Running) -> None:
    code, body = await http_get(f"http://127.0.0.1:{service.http_port}/healthz")
    assert code == 200
    code, body = await http_get(f"http://127.0.0.1:{service.http_port}/readyz")
    assert code == 200 and orjson.loads(body) == {"status": "ready"}


@pytest_twisted.ensureDeferred
async def test_crc_failure_over_tcp(service: Running, redis_proc: RedisProcess) -> None:
    dev = await service.device()
    frame = bytearray(vector_bytes("codec8-one-record"))
    frame[20] ^= 0x01
    dev.send(bytes(frame))
    await dev.wait_closed()
    assert dev.received == b""
    assert stream_entries(redis_proc) == []
    assert service.sample("teltonika_frames_total", codec="8", result="crc_fail") == 1


@pytest_twisted.ensureDeferred
async def test_two_instances_racing_on_one_imei(redis_proc: RedisProcess, tmp_path: Path) -> None:
    a = await start(redis_proc, tmp_path, "--instance-id", "inst-a")
    b = await start(redis_proc, tmp_path, "--instance-id", "inst-b")
    try:
        dev_a = await a.device()
        await wait_for(lambda: redis_proc.cmd("HGET", "connections:registry", IMEI) == "inst-a")
        dev_b = await b.device()  # the device hopped to instance b
        await wait_for(lambda: redis_proc.cmd("HGET", "connections:registry", IMEI) == "inst-b")
        await dev_a.close()  # the stale socket on a closes late
        await wait_for(lambda: a.sample("teltonika_connections_active") == 0)
        await a.svc.registry.settled()
        # a's compare-and-delete saw inst-b and left the field alone
        assert redis_proc.cmd("HGET", "connections:registry", IMEI) == "inst-b"
        await dev_b.close()
        await wait_for(lambda: redis_proc.cmd("HEXISTS", "connections:registry", IMEI) == 0)
    finally:
        await a.svc.stopService()
        await b.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_registry_restored_after_redis_reconnect(
    service: Running, redis_proc: RedisProcess
) -> None:
    dev = await service.device()
    await wait_for(lambda: redis_proc.cmd("HGET", "connections:registry", IMEI) == "test-a")
    lost: list[str] = []
    service.svc.redis.connection_lost_hooks.append(lost.append)
    # Redis lost the registry (e.g. restarted empty) and dropped our connections.
    redis_proc.cmd("DEL", "connections:registry", "instance:heartbeat:test-a")
    redis_proc.cmd("CLIENT", "KILL", "TYPE", "normal")
    await wait_for(lambda: redis_proc.cmd("HGET", "connections:registry", IMEI) == "test-a")
    await wait_for(lambda: redis_proc.cmd("EXISTS", "instance:heartbeat:test-a") == 1)
    # the publisher's own connection was killed too: a packet sent before it is back would
    # (rightly) not be ACKed
    await wait_for(lambda: lost and service.svc.redis.connected)
    dev.send(avl_frame(1))
    assert await dev.expect(4) == ack(1)
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_backpressure_when_redis_stalls(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """More packets than --max-inflight while Redis does not answer: they wait (reading
    pauses), none is refused or ACKed early, and all are ACKed once Redis answers."""
    running = await start(redis_proc, tmp_path, "--max-inflight", "2", "--publish-timeout", "20")
    devices: list[DeviceProtocol] = []
    try:
        for i in range(6):
            devices.append(await running.device(f"3563070424410{i:02d}"))
        redis_proc.cmd("CLIENT", "PAUSE", "30000", "WRITE")  # scripts wait, PING answers
        for i, dev in enumerate(devices):
            dev.send(avl_frame(2, start=10 * i))
        await wait_for(lambda: running.sample("teltonika_publish_backpressure_total") >= 1)
        assert running.sample("teltonika_publish_waiting") >= 2
        assert running.svc.factory.reading_paused
        assert running.sample("teltonika_publish_inflight") <= 2
        assert [dev.received for dev in devices] == [b""] * 6  # nothing ACKed yet
        body = await running.metrics()
        assert "teltonika_publish_waiting " in body
        redis_proc.cmd("CLIENT", "UNPAUSE")
        for dev in devices:
            assert await dev.expect(4) == ack(2)
        assert len(stream_entries(redis_proc)) == 12
        await wait_for(lambda: not running.svc.factory.reading_paused)
        assert running.sample("teltonika_publish_overflow_total") == 0
        assert running.sample("teltonika_publish_waiting") == 0
        # reading resumed: the next packets flow as usual
        devices[0].send(avl_frame(1, start=500))
        assert await devices[0].expect(4) == ack(1)
    finally:
        redis_proc.cmd("CLIENT", "UNPAUSE")
        for dev in devices:
            await dev.close()
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_in_process_service_leaves_process_wide_state_alone(
    redis_proc: RedisProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Garbage-collector tuning, the open-files limit and the exit-on-overrun watchdog
    belong to the real twistd start (makeService), not to a service built in a test."""
    import gc
    import os
    import resource

    from teltonika_ingest.server.tap import makeService

    thresholds = gc.get_threshold()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 4096) - 1
    gc.set_threshold(701, 11, 12)
    gc.unfreeze()
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    try:
        running = await start(redis_proc, tmp_path)
        try:
            assert gc.get_threshold() == (701, 11, 12)
            assert gc.get_freeze_count() == 0
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (lowered, hard)
            running.svc._shutdown_overrun()  # what the watchdog calls on an overrun
            assert exits == [] and running.svc.exit_code == 1
        finally:
            await running.svc.stopService()
    finally:
        gc.set_threshold(*thresholds)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    config = running.svc.config
    assert makeService({"config": config}).process_wide is True  # type: ignore[attr-defined]
