"""Queued commands end to end: a real redis-server, two instances (in-process, and a twistd
process for the SIGKILL case), devices over TCP moving between them."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from test_commands_integration import answer, outcome, outcomes_of, results
from test_shutdown import TwistdProcess

from teltonika_ingest.codec import decode_command_frame, encode_imei
from teltonika_ingest.server.commands.queue import (
    EXPIRY_KEY,
    QUEUE_KEY,
    device_key,
    queued_key,
)

import test_service_integration as service_integration
from device import DeviceProtocol, connect_device, expect_frame, wait_for
from redisproc import RedisProcess

pytestmark = pytest.mark.integration

IMEI = "356307042441013"
OTHER = "352093081452251"
_ids = itertools.count(1)

Running = service_integration.Running


async def start(redis: RedisProcess, tmp_path: Path, name: str, *args: str) -> Running:
    return await service_integration.start(
        redis, tmp_path, "--instance-id", name, "--command-queue-sweep-interval", "0.2", *args
    )


@pytest_twisted.async_yield_fixture
async def pair(redis_proc: RedisProcess, tmp_path: Path) -> AsyncIterator[tuple[Running, Running]]:
    a = await start(redis_proc, tmp_path, "inst-a")
    b = await start(redis_proc, tmp_path, "inst-b")
    try:
        yield a, b
    finally:
        await a.svc.stopService()
        await b.svc.stopService()


def enqueue(redis: RedisProcess, text: str = "getver", imei: str = IMEI, **fields: Any) -> str:
    """XADD a command to commands:queue as the business plane does; returns its id."""
    command_id = f"q-{next(_ids)}"
    flat: list[Any] = ["id", command_id, "imei", imei, "text", text]
    for name, value in fields.items():
        flat += [name, value]
    redis.cmd("XADD", QUEUE_KEY, "*", *flat)
    return command_id


async def queued(redis: RedisProcess, command_id: str) -> None:
    """Wait until an instance accepted the command into the queue."""
    await wait_for(lambda: redis.cmd("EXISTS", queued_key(command_id)) == 1)


async def device(port: int, imei: str = IMEI) -> DeviceProtocol:
    dev = await connect_device(port)
    dev.send(encode_imei(imei))
    assert await dev.expect(1) == b"\x01"
    return dev


def total(instances: tuple[Running, ...], name: str, **labels: str) -> float:
    return sum(r.sample(name, **labels) for r in instances)


async def counted(instances: tuple[Running, ...], value: float, name: str, **labels: str) -> None:
    """Wait until the instances' metric adds up to ``value`` (an outcome is visible in Redis
    a moment before the instance that wrote it has its reply and counts it)."""
    await wait_for(lambda: total(instances, name, **labels) == value)


async def received(dev: DeviceProtocol) -> bytes:
    frame = await expect_frame(dev, timeout=10)
    return decode_command_frame(frame).payload


# --------------------------------------------------------------------------- delivery


@pytest_twisted.ensureDeferred
async def test_queued_while_offline_then_delivered_on_b(
    pair: tuple[Running, Running], redis_proc: RedisProcess
) -> None:
    a, b = pair
    command_id = enqueue(redis_proc, "getver", ttl_s="600")
    await queued(redis_proc, command_id)
    assert outcomes_of(redis_proc, command_id) == []  # offline: it waits
    dev = await b.device()
    assert await received(dev) == b"getver"
    dev.send(answer(b"Ver:03.27.07"))
    result = await outcome(redis_proc, command_id)
    assert (result["status"], result["response"], result["instance_id"], result["attempts"]) == (
        "ok",
        "Ver:03.27.07",
        "inst-b",
        "1",
    )
    assert redis_proc.cmd("EXISTS", queued_key(command_id), device_key(IMEI)) == 0
    assert redis_proc.cmd("ZCARD", EXPIRY_KEY) == 0
    assert b.sample("teltonika_commands_delivered_total") == 1
    assert b.sample("teltonika_command_queue_delay_seconds_count") == 1
    await counted((b,), 1, "teltonika_commands_total", status="ok")
    assert a.sample("teltonika_commands_delivered_total") == 0
    await wait_for(lambda: b.sample("teltonika_commands_queued") == 0)
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_queued_while_connected_is_delivered_at_once_in_order(
    pair: tuple[Running, Running], redis_proc: RedisProcess
) -> None:
    a, _b = pair
    dev = await a.device()
    await wait_for(lambda: redis_proc.cmd("HGET", "connections:registry", IMEI) == "inst-a")
    first, second = enqueue(redis_proc, "getinfo"), enqueue(redis_proc, "getstatus")
    assert await received(dev) == b"getinfo"
    await queued(redis_proc, second)
    await a.svc.registry.settled()
    assert dev.received == b""  # one at a time: the second waits for the first's answer
    dev.send(answer(b"INFO"))
    assert await received(dev) == b"getstatus"
    dev.send(answer(b"STATUS"))
    assert (await outcome(redis_proc, first))["response"] == "INFO"
    assert (await outcome(redis_proc, second))["response"] == "STATUS"
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_device_hops_from_a_to_b_with_two_queued(
    pair: tuple[Running, Running], redis_proc: RedisProcess
) -> None:
    a, b = pair
    first, second = enqueue(redis_proc, "getinfo"), enqueue(redis_proc, "getver")
    await queued(redis_proc, second)
    dev_a = await a.device()
    assert await received(dev_a) == b"getinfo"
    dev_a.send(answer(b"INFO"))  # answers the first, and drops out of coverage at once
    await dev_a.close()
    dev_b = await b.device()
    assert await received(dev_b) == b"getver"
    dev_b.send(answer(b"Ver:1"))
    one, two = await outcome(redis_proc, first), await outcome(redis_proc, second)
    assert (one["status"], one["instance_id"]) == ("ok", "inst-a")
    assert (two["status"], two["instance_id"], two["response"]) == ("ok", "inst-b", "Ver:1")
    await wait_for(lambda: redis_proc.cmd("ZCARD", EXPIRY_KEY) == 0)
    assert dev_b.received == b""  # B never sent the first one again
    assert len(results(redis_proc)) == 2
    await dev_b.close()


@pytest_twisted.ensureDeferred
async def test_hop_mid_delivery_takes_over_and_the_stale_socket_changes_nothing(
    pair: tuple[Running, Running], redis_proc: RedisProcess
) -> None:
    a, b = pair
    command_id = enqueue(redis_proc, "getver", max_attempts="3")
    await queued(redis_proc, command_id)
    dev_a = await a.device()
    assert await received(dev_a) == b"getver"
    # the device reconnects through B before answering; its old socket on A lingers
    dev_b = await b.device()
    assert await received(dev_b) == b"getver"  # delivery 2: the first can no longer answer
    await dev_a.close()  # A's release of delivery 1 is fenced off
    await wait_for(lambda: a.sample("teltonika_connections_active") == 0)
    dev_b.send(answer(b"Ver:2"))
    result = await outcome(redis_proc, command_id)
    assert (result["status"], result["instance_id"], result["attempts"]) == ("ok", "inst-b", "2")
    await wait_for(lambda: redis_proc.cmd("ZCARD", EXPIRY_KEY) == 0)
    assert len(outcomes_of(redis_proc, command_id)) == 1
    assert a.sample("teltonika_commands_total", status="failed") == 0
    await dev_b.close()


# --------------------------------------------------------------------------- outcomes


@pytest_twisted.ensureDeferred
async def test_ttl_expiry_with_both_instances_up(
    pair: tuple[Running, Running], redis_proc: RedisProcess
) -> None:
    command_id = enqueue(redis_proc, "setdigout 1", ttl_s="0.5")
    keep = enqueue(redis_proc, "getver", imei=OTHER, ttl_s="600")
    result = await outcome(redis_proc, command_id)
    assert result["status"] == "expired"
    assert result["response"] == "not delivered within its TTL"
    await counted(pair, 1, "teltonika_commands_total", status="expired")
    await wait_for(lambda: any(r.sample("teltonika_commands_queued") == 1 for r in pair))
    assert redis_proc.cmd("EXISTS", queued_key(keep)) == 1
    dev = await pair[0].device()  # the expired one is never sent
    await pair[0].svc.registry.settled()
    assert outcomes_of(redis_proc, command_id) == [result]
    await dev.close()
    assert dev.received == b""


@pytest_twisted.ensureDeferred
async def test_ttl_expiry_with_both_instances_restarted(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    a = await start(redis_proc, tmp_path, "inst-a")
    b = await start(redis_proc, tmp_path, "inst-b")
    command_id = enqueue(redis_proc, "setdigout 1", ttl_s="1")
    await queued(redis_proc, command_id)
    await a.svc.stopService()
    await b.svc.stopService()
    expires = int(redis_proc.cmd("HGET", queued_key(command_id), "expires"))

    def redis_ms() -> int:
        seconds, micros = redis_proc.cmd("TIME")
        return int(seconds) * 1000 + int(micros) // 1000

    await wait_for(lambda: redis_ms() > expires, timeout=5)  # it expired while nobody ran
    assert outcomes_of(redis_proc, command_id) == []
    a = await start(redis_proc, tmp_path, "inst-a")
    b = await start(redis_proc, tmp_path, "inst-b")
    try:
        result = await outcome(redis_proc, command_id)
        assert result["status"] == "expired"
        await counted((a, b), 1, "teltonika_commands_total", status="expired")
    finally:
        await a.svc.stopService()
        await b.svc.stopService()
    assert len(outcomes_of(redis_proc, command_id)) == 1


@pytest_twisted.ensureDeferred
async def test_cancel(pair: tuple[Running, Running], redis_proc: RedisProcess) -> None:
    a, _b = pair
    command_id = enqueue(redis_proc, "setdigout 1")
    await queued(redis_proc, command_id)
    redis_proc.cmd("XADD", QUEUE_KEY, "*", "cancel", command_id)
    result = await outcome(redis_proc, command_id)
    assert (result["status"], result["response"]) == ("cancelled", "cancelled before delivery")
    await counted(pair, 1, "teltonika_commands_total", status="cancelled")
    assert redis_proc.cmd("EXISTS", queued_key(command_id), device_key(IMEI)) == 0
    # one being delivered is not cancelled: it gets its own outcome
    busy = enqueue(redis_proc, "getver")
    dev = await a.device()
    assert await received(dev) == b"getver"
    redis_proc.cmd("XADD", QUEUE_KEY, "*", "cancel", busy)
    await wait_for(lambda: redis_proc.cmd("XLEN", QUEUE_KEY) == 0)
    dev.send(answer(b"Ver:1"))
    assert (await outcome(redis_proc, busy))["status"] == "ok"
    await dev.close()
    assert dev.received == b""  # the cancelled one never reached the device


@pytest_twisted.ensureDeferred
async def test_queue_bounds(redis_proc: RedisProcess, tmp_path: Path) -> None:
    a = await start(
        redis_proc, tmp_path, "inst-a",
        "--command-queue-max-per-device", "2", "--command-queue-max-total", "3",
    )  # fmt: skip
    try:
        ok = [enqueue(redis_proc), enqueue(redis_proc)]
        over = enqueue(redis_proc)
        result = await outcome(redis_proc, over)
        assert result["status"] == "invalid"
        assert result["response"] == (
            "queue full: 2 commands already queued for this IMEI (--command-queue-max-per-device 2)"
        )
        third = enqueue(redis_proc, imei=OTHER)
        await queued(redis_proc, third)
        over_all = enqueue(redis_proc, imei="490154203237518")
        result = await outcome(redis_proc, over_all)
        assert result["status"] == "invalid" and "3 commands queued in all" in result["response"]
        bad = enqueue(redis_proc, ttl_s="0")
        assert "'ttl_s' must be > 0" in (await outcome(redis_proc, bad))["response"]
        await counted((a,), 3, "teltonika_commands_total", status="invalid")
        assert [redis_proc.cmd("EXISTS", queued_key(c)) for c in ok] == [1, 1]
    finally:
        await a.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_unanswered_deliveries_fail_after_max_attempts(
    pair: tuple[Running, Running], redis_proc: RedisProcess
) -> None:
    a, _b = pair
    command_id = enqueue(redis_proc, "getver", timeout_s="0.3", max_attempts="2")
    await queued(redis_proc, command_id)
    dev = await a.device()
    assert await received(dev) == b"getver"  # never answered ...
    assert await received(dev) == b"getver"  # ... so delivered again, once
    result = await outcome(redis_proc, command_id)
    assert result["status"] == "failed"
    assert result["response"].startswith("no answer after 2 deliveries (max_attempts 2)")
    assert a.sample("teltonika_commands_delivered_total") == 2
    await counted((a,), 1, "teltonika_commands_total", status="failed")
    await dev.close()
    assert dev.received == b""


@pytest_twisted.ensureDeferred
async def test_instance_killed_between_delivery_and_answer(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    killed = TwistdProcess(
        redis_proc, tmp_path, "--instance-id", "inst-k", "--command-queue-sweep-interval", "0.2"
    )
    try:
        await killed.ready()
        command_id = enqueue(redis_proc, "setdigout 1", max_attempts="3")
        await queued(redis_proc, command_id)
        dev_k = await device(killed.device_port)
        assert await received(dev_k) == b"setdigout 1"
        killed.kill()  # SIGKILL: no release, no outcome, its registry field stays behind
        await dev_k.closed
    finally:
        killed.kill()
    assert redis_proc.cmd("HGET", queued_key(command_id), "state") == "delivering"
    b = await start(redis_proc, tmp_path, "inst-b")
    try:
        dev = await b.device()
        assert await received(dev) == b"setdigout 1"
        dev.send(answer(b"DOUT1:1"))
        result = await outcome(redis_proc, command_id)
        assert (result["status"], result["instance_id"], result["attempts"]) == (
            "ok",
            "inst-b",
            "2",
        )
        await wait_for(lambda: redis_proc.cmd("ZCARD", EXPIRY_KEY) == 0)
        assert len(outcomes_of(redis_proc, command_id)) == 1
        await dev.close()
    finally:
        await b.svc.stopService()
