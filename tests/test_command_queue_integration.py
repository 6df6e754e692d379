"""Queued commands end to end: a real redis-server, two instances (in-process, and a twistd
process for the SIGKILL case), devices over TCP moving between them."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue

from teltonika_ingest.codec import decode_command_frame, encode_imei
from teltonika_ingest.config import RedisTarget
from teltonika_ingest.redis.client import RedisClient
from teltonika_ingest.server.commands.delivery import QueuedCommands
from teltonika_ingest.server.commands.entries import GROUP
from teltonika_ingest.server.commands.queue import (
    ACCEPT,
    EXPIRY_KEY,
    QUEUE_KEY,
    device_key,
    queued_key,
)

import test_service_integration as service_integration
from device import DeviceProtocol, connect_device, expect_frame, wait_for
from redisproc import RedisProcess
from support import Harness, avl_frame
from test_commands_integration import answer, console_script, outcome, outcomes_of, results
from test_shutdown import TwistdProcess

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
    one, two = await outcome(redis_proc, first), await outcome(redis_proc, second)
    assert [(r["response"], r["attempts"]) for r in (one, two)] == [("INFO", "1"), ("STATUS", "1")]
    assert a.sample("teltonika_commands_delivered_total") == 2
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_a_command_stored_elsewhere_wakes_the_instance_holding_the_device(
    pair: tuple[Running, Running], redis_proc: RedisProcess
) -> None:
    """Another instance (here: the test, running the same script as inst-x) stores a command
    for a device A holds: its wake makes A deliver at once (nothing polls)."""
    a, _b = pair
    dev = await a.device()
    queue = a.svc.queue
    await wait_for(lambda: queue.claims_answered == 1 and queue.claims_in_flight == 0)
    # (the handshake's claim found nothing)
    seconds, _micros = redis_proc.cmd("TIME")
    # (an entry id of no stream entry, and no such group: nothing to acknowledge)
    args = ["no-group", f"{seconds}000-0", 1000, "-", "inst-x", "w1", IMEI, "", 32, 1000, "text"]
    args += ["getver", "12", 30_000, 600_000, 3]
    stored = redis_proc.cmd("EVAL", ACCEPT.source, 1, QUEUE_KEY, *args)
    assert stored == ["queued", "inst-a", 1]
    assert await received(dev) == b"getver"
    dev.send(answer(b"Ver:1"))
    assert (await outcome(redis_proc, "w1"))["instance_id"] == "inst-a"
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
    unread = enqueue(redis_proc, "setdigout 0", ttl_s="1")  # added while nobody runs
    ((entry_id, _fields),) = redis_proc.cmd("XRANGE", QUEUE_KEY, "-", "+")
    expires = max(expires, int(entry_id.split("-")[0]) + 1000)

    def redis_ms() -> int:
        seconds, micros = redis_proc.cmd("TIME")
        return int(seconds) * 1000 + int(micros) // 1000

    await wait_for(lambda: redis_ms() > expires, timeout=5)  # both expired meanwhile
    assert outcomes_of(redis_proc, command_id) == outcomes_of(redis_proc, unread) == []
    a = await start(redis_proc, tmp_path, "inst-a")
    b = await start(redis_proc, tmp_path, "inst-b")
    try:
        result = await outcome(redis_proc, command_id)
        assert result["status"] == "expired"
        late = await outcome(redis_proc, unread)
        assert (late["status"], late["attempts"]) == ("expired", "0")
        assert late["response"].startswith("expired before it was stored")
        await counted((a, b), 2, "teltonika_commands_total", status="expired")
    finally:
        await a.svc.stopService()
        await b.svc.stopService()
    assert len(outcomes_of(redis_proc, command_id)) == len(outcomes_of(redis_proc, unread)) == 1
    assert redis_proc.cmd("EXISTS", queued_key(unread)) == 0


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
async def test_an_entry_redis_cannot_store_is_refused_and_the_queue_goes_on(
    pair: tuple[Running, Running], redis_proc: RedisProcess
) -> None:
    redis_proc.cmd("SET", device_key(IMEI), "in the way")  # a key of the wrong type
    bad = enqueue(redis_proc, "getver")
    result = await outcome(redis_proc, bad)
    assert result["status"] == "invalid"
    assert result["response"].startswith("Redis refused to store the command: WRONGTYPE")
    good = enqueue(redis_proc, "getver", imei=OTHER)
    await queued(redis_proc, good)
    assert redis_proc.cmd("XLEN", QUEUE_KEY) == 0


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


@pytest_twisted.ensureDeferred
async def test_answer_recorded_after_redis_comes_back(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    a = await start(redis_proc, tmp_path, "inst-a")
    try:
        command_id = enqueue(redis_proc, "getver", timeout_s="60")
        await queued(redis_proc, command_id)
        dev = await a.device()
        assert await received(dev) == b"getver"
        redis_proc.stop()  # AOF on: the queue survives
        await wait_for(lambda: not a.svc.redis.connected)
        dev.send(answer(b"Ver:9"))  # settled while Redis is away: kept and retried
        await wait_for(lambda: a.svc.queue._writes > 0)
        redis_proc.start()
        result = await outcome(redis_proc, command_id, timeout=20)
        assert (result["status"], result["response"]) == ("ok", "Ver:9")
        await wait_for(lambda: redis_proc.cmd("ZCARD", EXPIRY_KEY) == 0, timeout=10)
        assert len(outcomes_of(redis_proc, command_id)) == 1
        await dev.close()
    finally:
        await a.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_device_connecting_while_redis_is_away_gets_its_commands_once_it_is_back(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    a = await start(redis_proc, tmp_path, "inst-a")
    try:
        command_id = enqueue(redis_proc, "getver")
        await queued(redis_proc, command_id)
        redis_proc.stop()
        await wait_for(lambda: not a.svc.redis.connected)
        dev = await a.device()  # accepted (no authority), its claim fails and is retried
        await wait_for(lambda: a.svc.queue.claims_in_flight == 0)
        assert a.svc.queue.claims_answered == 0
        redis_proc.start()
        assert await received(dev) == b"getver"
        dev.send(answer(b"Ver:1"))
        assert (await outcome(redis_proc, command_id, timeout=20))["status"] == "ok"
        await dev.close()
    finally:
        await a.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_delivery_waits_for_the_ack_of_the_packet_in_hand(redis_proc: RedisProcess) -> None:
    """The session holds a claimed command while a packet waits for Redis, and writes it
    right after that packet's ACK (a fake publisher decides when the publish is done)."""
    harness = Harness()
    writer = RedisClient(RedisTarget.parse(f"redis://127.0.0.1:{redis_proc.port}/0"))
    writer.startService()
    try:
        await wait_for(lambda: writer.connected)
        queue = QueuedCommands(
            harness.factory, instance_id="inst-h", writer=writer, reader=writer,
            clock=harness.clock,
        )  # fmt: skip
        redis_proc.cmd("XGROUP", "CREATE", QUEUE_KEY, GROUP, "0", "MKSTREAM")
        entry = redis_proc.cmd("XADD", QUEUE_KEY, "*", "id", "h1")
        redis_proc.cmd("XREADGROUP", "GROUP", GROUP, "inst-h", "STREAMS", QUEUE_KEY, ">")
        args = [GROUP, entry, 1000, "-", "inst-h", "h1", IMEI, "", 32, 1000, "text", "getver"]
        args += ["12", 30_000, 600_000, 3]
        assert redis_proc.cmd("EVAL", ACCEPT.source, 1, QUEUE_KEY, *args)[0] == "queued"
        proto, transport = harness.handshaken()  # the claim goes out now ...
        proto.dataReceived(avl_frame(1))  # ... and a packet arrives before it is answered
        assert harness.publisher.calls
        await wait_for(lambda: queue.claims_answered == 1)  # claimed, handed to the session
        assert queue.claims_in_flight == 0
        assert transport.value() == b""
        harness.publisher.calls[0][2].callback(1)  # Redis took the packet
        written = transport.value()
        assert written[:4] == (1).to_bytes(4, "big")  # the ACK first ...
        assert decode_command_frame(written[4:]).payload == b"getver"  # ... then the command
        assert harness.sample("teltonika_commands_delivered_total") == 1
        assert harness.factory.queue is queue
    finally:
        await writer.stopService()


# --------------------------------------------------------------------------- CLI


async def cli(redis: RedisProcess, cwd: Path, *args: str) -> tuple[str, str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TELTONIKA_"))}
    out, err, code = await getProcessOutputAndValue(
        console_script(),
        [*args, "--redis-url", f"redis://127.0.0.1:{redis.port}/0"],
        env=env,
        path=str(cwd),
        reactor=reactor,
    )
    return out.decode(), err.decode(), code


@pytest_twisted.ensureDeferred
async def test_cli_queue_list_cancel_without_any_instance(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    # nothing runs: --no-wait queues it and returns; the first instance stores it
    out, err, code = await cli(
        redis_proc, tmp_path, "command", IMEI, "setdigout 1", "--queue", "--ttl", "1h",
        "--max-attempts", "2", "--no-wait", "--id", "cli-q1",
    )  # fmt: skip
    assert (out, code) == ("cli-q1\n", 0), err
    a = await start(redis_proc, tmp_path, "inst-a")
    try:
        await queued(redis_proc, "cli-q1")
    finally:
        await a.svc.stopService()
    out, err, code = await cli(redis_proc, tmp_path, "commands", "list", IMEI)
    assert code == 0, err
    header, row, summary = out.splitlines()
    assert header.split() == ["ID", "IMEI", "STATE", "TRIES", "EXPIRES", "COMMAND"]
    assert row.split()[:4] == ["cli-q1", IMEI, "queued", "0/2"]
    assert row.endswith("setdigout 1")
    assert summary == f"1 shown for {IMEI}; 1 queued in all"
    out, err, code = await cli(redis_proc, tmp_path, "commands", "list", "--json")
    (shown,) = [orjson.loads(line) for line in out.splitlines()]
    assert (shown["id"], shown["text"], shown["max_attempts"], shown["state"]) == (
        "cli-q1",
        "setdigout 1",
        2,
        "queued",
    )
    out, err, code = await cli(redis_proc, tmp_path, "commands", "cancel", "cli-q1")
    assert (out, code) == (f"cancelled cli-q1 ({IMEI})\n", 0), err
    (result,) = outcomes_of(redis_proc, "cli-q1")
    assert (result["status"], result["instance_id"]) == ("cancelled", "cli")
    out, err, code = await cli(redis_proc, tmp_path, "commands", "cancel", "cli-q1")
    assert code == 3 and "no queued command cli-q1" in err
    assert len(outcomes_of(redis_proc, "cli-q1")) == 1


@pytest_twisted.ensureDeferred
async def test_cli_queue_waits_for_the_device(
    pair: tuple[Running, Running], redis_proc: RedisProcess, tmp_path: Path
) -> None:
    _a, b = pair
    waiting = defer.ensureDeferred(
        cli(redis_proc, tmp_path, "command", IMEI, "getver", "--queue", "--id", "cli-q2")
    )
    await queued(redis_proc, "cli-q2")  # the device is offline: the CLI waits
    dev = await b.device()
    try:
        assert await received(dev) == b"getver"
    except Exception:
        raise AssertionError(f"no command frame; the CLI said {await waiting}") from None
    dev.send(answer(b"Ver:03.27"))
    out, err, code = await waiting
    assert (out, code) == ("Ver:03.27\n", 0), err
    # expired: exit status 8
    out, err, code = await cli(
        redis_proc, tmp_path, "command", OTHER, "getver", "--queue", "--ttl", "300ms"
    )
    assert (out, code) == ("", 8), err
    assert err.startswith("expired: ")
    # queue options need --queue; a bad --ttl is refused before anything is added
    _out, err, code = await cli(redis_proc, tmp_path, "command", IMEI, "getver", "--ttl", "1h")
    assert code == 1 and "need --queue" in err
    _out, err, code = await cli(
        redis_proc, tmp_path, "command", IMEI, "getver", "--queue", "--ttl", "1 week"
    )
    assert code == 1 and "--ttl: not a duration" in err
    assert redis_proc.cmd("XLEN", QUEUE_KEY) == 0
    await dev.close()
