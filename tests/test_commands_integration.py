"""GPRS commands end to end: real redis-server, the service in-process, devices over TCP, and
the ``teltonika-ingest command`` console script as a separate process."""

from __future__ import annotations

import base64
import itertools
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue

from teltonika_ingest.codec import (
    TYPE_COMMAND,
    TYPE_RESPONSE,
    CommandMessage,
    decode_command_frame,
    encode_command_message,
)
from teltonika_ingest.server.commands.entries import GROUP, RESULTS_KEY
from teltonika_ingest.server.commands.outcomes import RECORD_OUTCOME
from teltonika_ingest.server.commands.router import CommandRouter

import test_service_integration as service_integration
from device import expect_frame, http_get, wait_for
from redisproc import RedisProcess
from support import avl_frame

pytestmark = pytest.mark.integration

IMEI = "356307042441013"
NOBODY = "352093081452251"  # an IMEI no device uses in these tests
STREAM = "commands:instance:test-a"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
_ids = itertools.count(1)


class Running(service_integration.Running):
    """The in-process service, with its command router at hand."""

    @property
    def router(self) -> CommandRouter:
        router: CommandRouter = self.svc.commands
        return router

    async def stop(self) -> None:
        await self.svc.stopService()


async def start(redis: RedisProcess, tmp_path: Path, *args: str, **overrides: Any) -> Running:
    running = await service_integration.start(
        redis, tmp_path, *args, running_cls=Running, **overrides
    )
    assert isinstance(running, Running)
    return running


@pytest_twisted.async_yield_fixture
async def service(redis_proc: RedisProcess, tmp_path: Path) -> AsyncIterator[Running]:
    running = await start(redis_proc, tmp_path)
    yield running
    await running.stop()


# --------------------------------------------------------------------------- helpers


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def results(redis: RedisProcess) -> list[dict[str, str]]:
    out = []
    for _id, flat in redis.cmd("XRANGE", RESULTS_KEY, "-", "+"):
        items = [_text(v) for v in flat]
        out.append(dict(zip(items[0::2], items[1::2], strict=True)))
    return out


def outcomes_of(redis: RedisProcess, command_id: str) -> list[dict[str, str]]:
    return [r for r in results(redis) if r["id"] == command_id]


async def outcome(redis: RedisProcess, command_id: str, timeout: float = 10.0) -> dict[str, str]:
    """The one outcome of ``command_id`` (waits for it; fails if there are two)."""
    await wait_for(lambda: outcomes_of(redis, command_id), timeout=timeout)
    found = outcomes_of(redis, command_id)
    assert len(found) == 1, found
    return found[0]


def add(redis: RedisProcess, imei: str = IMEI, text: str | None = "getver", **fields: Any) -> str:
    """XADD a command to test-a's stream as the business plane does; returns its id."""
    command_id = f"cmd-{next(_ids)}"
    flat: list[Any] = ["id", command_id, "imei", imei]
    if text is not None:
        flat += ["text", text]
    for name, value in fields.items():
        flat += [name, value]
    redis.cmd("XADD", STREAM, "*", *flat)
    return command_id


def pending_count(redis: RedisProcess) -> int:
    summary = redis.cmd("XPENDING", STREAM, GROUP)
    return int(summary[0])


async def settled(redis: RedisProcess) -> None:
    """Wait until the router handled everything added so far (it handles entries in order,
    its own pending ones first): add a sentinel command and wait for its outcome."""
    await outcome(redis, add(redis, NOBODY, "sentinel"))


def answer(text: bytes, codec: str = "12", imei: str | None = None) -> bytes:
    return encode_command_message(CommandMessage(codec, TYPE_RESPONSE, text, imei))


# --------------------------------------------------------------------------- round trips


@pytest_twisted.ensureDeferred
async def test_command_round_trip(service: Running, redis_proc: RedisProcess) -> None:
    dev = await service.device()
    command_id = add(redis_proc, text="getver")
    frame = await expect_frame(dev)
    message = decode_command_frame(frame)  # checks the CRC
    assert (message.codec, message.type, message.payload) == ("12", TYPE_COMMAND, b"getver")
    dev.send(answer(b"Ver:03.27.07_00 GPS:AXN_5.10 Hw:FMB920"))
    result = await outcome(redis_proc, command_id)
    entry_id = _text(redis_proc.cmd("XRANGE", STREAM, "-", "+")[0][0])
    assert result == {
        "id": command_id,
        "imei": IMEI,
        "status": "ok",
        "response": "Ver:03.27.07_00 GPS:AXN_5.10 Hw:FMB920",
        "instance_id": "test-a",
        "at": result["at"],
        "entry_id": entry_id,
    }
    assert ISO_MS.match(result["at"])
    assert pending_count(redis_proc) == 0  # acknowledged with the outcome
    assert service.sample("teltonika_commands_total", status="ok") == 1
    assert service.sample("teltonika_commands_inflight") == 0
    assert service.sample("teltonika_command_roundtrip_seconds_count") == 1
    code, body = await http_get(f"http://127.0.0.1:{service.http_port}/metrics")
    assert code == 200
    text = body.decode()
    assert 'teltonika_commands_total{status="ok"} 1.0' in text
    assert "teltonika_commands_inflight 0.0" in text
    assert "teltonika_command_roundtrip_seconds_count 1.0" in text
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_codec14_binary_command(service: Running, redis_proc: RedisProcess) -> None:
    dev = await service.device()
    command_id = add(redis_proc, text=None, hex="0102ff", codec="14")
    message = decode_command_frame(await expect_frame(dev))
    assert (message.codec, message.imei, message.payload) == ("14", IMEI, b"\x01\x02\xff")
    dev.send(answer(b"\x00\x10\xfe", codec="14", imei=IMEI))
    result = await outcome(redis_proc, command_id)
    assert result["status"] == "ok"
    assert base64.b64decode(result["response_b64"]) == b"\x00\x10\xfe"
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_command_waits_for_the_ack_and_telemetry_flows_meanwhile(
    service: Running, redis_proc: RedisProcess
) -> None:
    from support import avl_frame

    dev = await service.device()
    command_id = add(redis_proc, text="getinfo")
    assert decode_command_frame(await expect_frame(dev)).payload == b"getinfo"
    dev.send(avl_frame(2))  # a packet while the command is in flight: handled normally
    assert await dev.expect(4) == (2).to_bytes(4, "big")
    assert redis_proc.cmd("XLEN", "telemetry:teltonika") == 2
    dev.send(answer(b"RTC:..."))
    assert (await outcome(redis_proc, command_id))["response"] == "RTC:..."
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_unknown_imei_is_not_connected(service: Running, redis_proc: RedisProcess) -> None:
    command_id = add(redis_proc, NOBODY)
    result = await outcome(redis_proc, command_id)
    assert result["status"] == "not_connected"
    assert result["imei"] == NOBODY
    assert pending_count(redis_proc) == 0
    assert service.sample("teltonika_commands_total", status="not_connected") == 1


@pytest_twisted.ensureDeferred
async def test_malformed_entries_are_invalid(service: Running, redis_proc: RedisProcess) -> None:
    dev = await service.device()
    bad = {
        add(redis_proc, text=None): "missing field 'text'",
        add(redis_proc, text="get\u00e9"): "not ASCII",
        add(redis_proc, text="x" * 513): "longer than --max-command-length 512",
        add(redis_proc, codec="13"): "'codec' must be 12 or 14",
        add(redis_proc, timeout_s="0"): "'timeout_s'",
        add(redis_proc, text="a", hex="00"): "both 'text' and 'hex'",
        add(redis_proc, "1234"): "15 decimal digits",
    }
    redis_proc.cmd("XADD", STREAM, "*", "imei", IMEI, "text", "getver")  # no id at all
    for command_id, reason in bad.items():
        result = await outcome(redis_proc, command_id)
        assert result["status"] == "invalid"
        assert reason in result["response"], result
    await wait_for(lambda: len(results(redis_proc)) == len(bad) + 1)
    (no_id,) = outcomes_of(redis_proc, "")
    assert no_id["status"] == "invalid" and "missing field 'id'" in no_id["response"]
    assert pending_count(redis_proc) == 0
    assert dev.received == b""  # nothing reached the device
    assert service.sample("teltonika_commands_total", status="invalid") == len(bad) + 1
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_timeout(service: Running, redis_proc: RedisProcess) -> None:
    dev = await service.device()
    command_id = add(redis_proc, text="getver", timeout_s="0.5")
    await expect_frame(dev)  # the device never answers
    result = await outcome(redis_proc, command_id)
    assert result["status"] == "timeout"
    assert service.sample("teltonika_commands_total", status="timeout") == 1
    assert service.sample("teltonika_commands_inflight") == 0
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_device_closing_fails_its_commands(
    service: Running, redis_proc: RedisProcess
) -> None:
    dev = await service.device()
    first = add(redis_proc, text="getinfo")
    second = add(redis_proc, text="getver")
    await expect_frame(dev)
    await dev.close()
    assert (await outcome(redis_proc, first))["status"] == "not_connected"
    assert (await outcome(redis_proc, second))["status"] == "not_connected"


@pytest_twisted.ensureDeferred
async def test_codec13_message(service: Running, redis_proc: RedisProcess) -> None:
    dev = await service.device()
    dev.send(
        encode_command_message(
            CommandMessage("13", TYPE_COMMAND, b"Alarm!", timestamp_ms=1_700_000_000_000)
        )
    )
    await wait_for(lambda: results(redis_proc))
    (message,) = results(redis_proc)
    assert message["status"] == "message"
    assert message["imei"] == IMEI
    assert message["response"] == "Alarm!"
    assert message["device_ts"] == "2023-11-14T22:13:20.000Z"
    assert message["instance_id"] == "test-a"
    assert service.sample("teltonika_commands_total", status="message") == 1
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_codec13_type_06_from_a_device_capture(
    service: Running, redis_proc: RedisProcess
) -> None:
    """Codec 13 type 0x06 (the vendor's older documentation, real devices) is a message
    like type 0x05: it reaches commands:results, and the connection stays up."""
    dev = await service.device()
    dev.send(
        bytes.fromhex(
            "000000000000001d0d01060000001564e8328168656c6c6f206c65747320746573740d0a0100003548"
        )
    )
    await wait_for(lambda: results(redis_proc))
    (message,) = results(redis_proc)
    assert message["status"] == "message"
    assert message["imei"] == IMEI
    assert message["response"] == "hello lets test\r\n"
    assert message["device_ts"] == "2023-08-25T04:48:01.000Z"
    assert service.sample("teltonika_commands_total", status="message") == 1
    first = add(redis_proc, text="getinfo")
    await expect_frame(dev)  # still connected: the command reaches the device
    assert first
    await dev.close()


# --------------------------------------------------------------------------- exactly once


@pytest_twisted.ensureDeferred
async def test_outcome_script_never_records_twice(
    service: Running, redis_proc: RedisProcess
) -> None:
    """A retried outcome write (its first reply lost) finds the entry acknowledged."""
    redis_proc.cmd("XGROUP", "CREATE", "commands:instance:other", GROUP, "0", "MKSTREAM")
    entry = _text(redis_proc.cmd("XADD", "commands:instance:other", "*", "id", "x"))
    redis_proc.cmd("XREADGROUP", "GROUP", GROUP, "other", "STREAMS", "commands:instance:other", ">")
    args = [100_000, GROUP, entry, 0, "id", "x", "status", "ok"]
    keys = [RESULTS_KEY, "commands:instance:other"]
    first = await service.svc.redis.run_script(RECORD_OUTCOME, keys, args)
    second = await service.svc.redis.run_script(RECORD_OUTCOME, keys, args)
    assert isinstance(first, str) and first != "0"
    assert second == 0
    assert len(outcomes_of(redis_proc, "x")) == 1
    assert redis_proc.cmd("XPENDING", "commands:instance:other", GROUP)[0] == 0


@pytest_twisted.ensureDeferred
async def test_instance_restart_with_a_pending_command(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    # A previous run of test-a read this entry and died before recording its outcome.
    redis_proc.cmd("XGROUP", "CREATE", STREAM, GROUP, "0", "MKSTREAM")
    orphan = add(redis_proc, NOBODY, "setdigout 1")
    redis_proc.cmd("XREADGROUP", "GROUP", GROUP, "test-a", "STREAMS", STREAM, ">")
    assert pending_count(redis_proc) == 1
    running = await start(redis_proc, tmp_path)
    try:
        result = await outcome(redis_proc, orphan)
        assert result["status"] == "not_connected"  # its device has not come back here
        await settled(redis_proc)
    finally:
        await running.stop()
    assert pending_count(redis_proc) == 0
    running = await start(redis_proc, tmp_path)  # and once more: nothing is repeated
    try:
        await settled(redis_proc)
        assert len(outcomes_of(redis_proc, orphan)) == 1
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_pending_command_reaches_the_device_after_the_reader_restarts(
    service: Running, redis_proc: RedisProcess
) -> None:
    dev = await service.device()
    await settled(redis_proc)  # the group exists
    await service.router.stopService()
    # read by this consumer and never answered (the process died right after the read)
    command_id = add(redis_proc, text="getver")
    redis_proc.cmd("XREADGROUP", "GROUP", GROUP, "test-a", "STREAMS", STREAM, ">")
    service.router.startService()
    message = decode_command_frame(await expect_frame(dev))
    assert message.payload == b"getver"
    dev.send(answer(b"Ver:1"))
    assert (await outcome(redis_proc, command_id))["status"] == "ok"
    await settled(redis_proc)
    assert len(outcomes_of(redis_proc, command_id)) == 1
    assert pending_count(redis_proc) == 0
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_graceful_stop_fails_in_flight_and_keeps_unsent_pending(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    running = await start(redis_proc, tmp_path)
    dev = await running.device()
    in_flight = add(redis_proc, text="getinfo", timeout_s="60")
    queued = add(redis_proc, text="getver", timeout_s="60")
    await expect_frame(dev)  # the first is on the device, the second queued behind it
    await wait_for(lambda: running.router.held == 2)
    await running.stop()
    assert (await outcome(redis_proc, in_flight))["status"] == "not_connected"
    assert outcomes_of(redis_proc, queued) == []
    assert pending_count(redis_proc) == 1  # the unsent one waits for the next start
    running = await start(redis_proc, tmp_path)
    try:
        # read again after the restart; its device has not reconnected yet
        assert (await outcome(redis_proc, queued))["status"] == "not_connected"
        await settled(redis_proc)
        assert len(outcomes_of(redis_proc, in_flight)) == 1
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_outcome_recorded_after_redis_comes_back(
    service: Running, redis_proc: RedisProcess
) -> None:
    dev = await service.device()
    command_id = add(redis_proc, text="getver", timeout_s="60")
    await expect_frame(dev)
    redis_proc.stop()  # AOF on: the stream, the group and its pending entry survive
    await wait_for(lambda: not service.svc.redis.connected)
    dev.send(answer(b"Ver:2"))
    await wait_for(lambda: service.router.unwritten == 1)
    redis_proc.start()
    result = await outcome(redis_proc, command_id, timeout=20)
    assert result["response"] == "Ver:2"
    await settled(redis_proc)
    assert len(outcomes_of(redis_proc, command_id)) == 1
    assert pending_count(redis_proc) == 0
    await dev.close()


# --------------------------------------------------------------------------- CLI


def console_script() -> str:
    script = Path(sys.executable).parent / "teltonika-ingest"
    if not script.exists():
        pytest.fail(f"console script {script} missing: install the project (make, or pip install)")
    return str(script)


async def run_cli(redis: RedisProcess, cwd: Path, *args: str) -> tuple[str, str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "TELTONIKA_"))}
    out, err, code = await getProcessOutputAndValue(
        console_script(),
        ["command", *args, "--redis-url", f"redis://127.0.0.1:{redis.port}/0"],
        env=env,
        path=str(cwd),
        reactor=reactor,
    )
    return out.decode(), err.decode(), code


async def cli_ready(service: Running, redis: RedisProcess) -> None:
    """What the CLI checks before adding: the registry field and the instance's heartbeat."""
    await wait_for(lambda: redis.cmd("HGET", "connections:registry", IMEI) == "test-a")
    # Registry.startService beats once at start, usually before Redis is connected, so the
    # key may only appear after --heartbeat-interval (30 s): beat now.
    await service.svc.registry.beat()
    assert redis.cmd("EXISTS", "instance:heartbeat:test-a") == 1


@pytest_twisted.ensureDeferred
async def test_cli_end_to_end(service: Running, redis_proc: RedisProcess, tmp_path: Path) -> None:
    dev = await service.device()
    await cli_ready(service, redis_proc)
    cli = defer.ensureDeferred(run_cli(redis_proc, tmp_path, IMEI, "getver", "--timeout", "10"))
    try:
        message = decode_command_frame(await expect_frame(dev, timeout=20))
    except Exception:
        raise AssertionError(f"no command frame; the CLI said {await cli}") from None
    assert message.payload == b"getver"
    dev.send(answer(b"Ver:03.27.07"))
    out, err, code = await cli
    assert (out, code) == ("Ver:03.27.07\n", 0), err
    (result,) = results(redis_proc)
    assert result["status"] == "ok" and result["id"].startswith("cli-")

    # --json, Codec 14, an id of our choosing
    cli = defer.ensureDeferred(
        run_cli(redis_proc, tmp_path, IMEI, "getinfo", "--codec", "14", "--json", "--id", "j1")
    )
    message = decode_command_frame(await expect_frame(dev, timeout=20))
    assert (message.codec, message.imei) == ("14", IMEI)
    dev.send(answer(b"RTC:x", codec="14", imei=IMEI))
    out, err, code = await cli
    assert code == 0, err
    shown = orjson.loads(out)
    assert (shown["id"], shown["status"], shown["response"]) == ("j1", "ok", "RTC:x")

    # the device never answers: timeout, exit status 4
    cli = defer.ensureDeferred(run_cli(redis_proc, tmp_path, IMEI, "getstatus", "--timeout", "0.5"))
    await expect_frame(dev, timeout=20)
    out, err, code = await cli
    assert (out, code) == ("", 4)
    assert err.startswith("timeout: ")
    await dev.close()


@pytest_twisted.ensureDeferred
async def test_cli_errors(service: Running, redis_proc: RedisProcess, tmp_path: Path) -> None:
    out, err, code = await run_cli(redis_proc, tmp_path, NOBODY, "getver")
    assert (out, code) == ("", 3)
    assert err.startswith("not_connected: ")
    assert redis_proc.cmd("EXISTS", STREAM) == 0 or redis_proc.cmd("XLEN", STREAM) == 0

    # registered to an instance that has no heartbeat: not added at all
    redis_proc.cmd("HSET", "connections:registry", NOBODY, "gone")
    out, err, code = await run_cli(redis_proc, tmp_path, NOBODY, "getver")
    assert code == 3 and "no heartbeat" in err
    assert redis_proc.cmd("EXISTS", "commands:instance:gone") == 0

    out, err, code = await run_cli(redis_proc, tmp_path, "123", "getver")
    assert code == 1 and "15 decimal digits" in err
    out, err, code = await run_cli(redis_proc, tmp_path, IMEI, "abc", "--hex")
    assert code == 1 and "hex" in err


@pytest_twisted.ensureDeferred
async def test_one_frame_per_command_when_the_reader_reads_its_pending_entries_again(
    service: Running, redis_proc: RedisProcess
) -> None:
    """The production path (the router's own stream reader): its connection drops while a
    command is in flight and another is queued on the device's session; back, it reads its
    pending entries again (``XREADGROUP ... 0``), both of them included. The device must
    still receive exactly one frame per command id."""
    # the queued-command reader blocks on XREADGROUP too: out of the way, so the only
    # blocked reader is the router's
    await service.svc.queue.stopService()
    reader = service.router.reader
    reads: list[tuple[Any, ...]] = []
    execute = reader.execute

    def spy(*args: Any, **kw: Any) -> Any:
        reads.append(args)
        return execute(*args, **kw)

    reader.execute = spy
    dev = await service.device()
    first = add(redis_proc, text="getver", timeout_s="60")
    second = add(redis_proc, text="getinfo", timeout_s="60")
    assert decode_command_frame(await expect_frame(dev)).payload == b"getver"
    assert pending_count(redis_proc) == 2  # both read, one in flight, one queued

    def reader_client() -> dict[str, str] | None:
        """The router's reader connection in CLIENT LIST (by its local address)."""
        if not reader._pool:
            return None
        addr = f"127.0.0.1:{reader._pool[0].transport.getHost().port}"
        for line in _text(redis_proc.cmd("CLIENT", "LIST")).splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("addr") == addr:
                return fields
        return None

    def blocked_reader() -> dict[str, str] | None:
        found = reader_client()
        return found if found and found.get("cmd") == "xreadgroup" else None

    await wait_for(blocked_reader)
    first_reader = blocked_reader()
    assert first_reader is not None
    reads.clear()
    redis_proc.cmd("CLIENT", "KILL", "ID", first_reader["id"])
    # the race provoked: the reader, connected again, read its pending entries again from
    # the start, and blocks on new ones once more
    await wait_for(
        lambda: (
            any(a[0] == "XREADGROUP" and a[-1] == "0" for a in reads)
            and (blocked_reader() or {}).get("id") not in (None, first_reader["id"])
        ),
        timeout=15,
    )
    dev.send(answer(b"Ver:1"))
    assert decode_command_frame(await expect_frame(dev)).payload == b"getinfo"
    dev.send(answer(b"Info:1"))
    assert (await outcome(redis_proc, first))["status"] == "ok"
    assert (await outcome(redis_proc, second))["status"] == "ok"
    # a packet now: its ACK is the next thing the device gets (TCP keeps order), so a
    # command frame sent again would arrive before it
    dev.send(avl_frame(1))
    assert await dev.expect(4) == b"\x00\x00\x00\x01"
    assert pending_count(redis_proc) == 0
    await dev.close()
