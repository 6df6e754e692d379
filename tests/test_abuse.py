"""Abuse resistance (issue 12): no device, peer or command starves the others.

Unit tests drive the protocol with ``StringTransport`` and ``task.Clock``; the integration
tests attack a real ``twistd -n teltonika-ingest`` (the harness of ``test_faults.py``) and
check what a well-behaved device or command gets meanwhile.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.web.client import Agent, ResponseNeverReceived, readBody

from teltonika_ingest.codec import encode_imei
from teltonika_ingest.config import check_server_endpoint, with_backlog
from teltonika_ingest.server.budget import DeviceBudget, RepeatLimiter
from teltonika_ingest.server.protocol import PRESSURE_READ_SIZE, READ_SIZE

from device import connect_device, deferLater, wait_for
from redisproc import RedisProcess
from support import HANDSHAKE, Harness, avl_frame
from test_faults import ServiceProcess
from test_hostile import attack_imei, closed_within, open_peer

#: a frame header declaring 1,024 data bytes: what a trickling peer starts with
PARTIAL_HEADER = b"\x00\x00\x00\x00" + struct.pack(">I", 1024)


# --------------------------------------------------------------------------- frame deadline


def test_frame_deadline_closes_a_trickled_frame() -> None:
    h = Harness(frame_timeout=10, idle_timeout=600)
    proto, transport = h.handshaken()
    proto.dataReceived(PARTIAL_HEADER)
    for _ in range(9):  # a byte a second: the idle timer never fires, the deadline does
        h.clock.advance(1)
        proto.dataReceived(b"\x08")
    assert not transport.disconnecting
    h.clock.advance(1)
    assert transport.disconnecting
    assert h.sample("teltonika_disconnects_total", reason="frame_timeout") == 1
    assert transport.value() == b""  # nothing was ACKed


def test_frame_deadline_is_per_frame() -> None:
    """A device sending whole frames, each in slow pieces, is never closed: the deadline
    restarts with each frame, even when a frame's last bytes and the next one's first
    arrive together."""
    h = Harness(frame_timeout=10)
    proto, transport = h.handshaken()
    frame = avl_frame(1)
    half = len(frame) // 2
    proto.dataReceived(frame[:half])
    for i in range(5):
        h.clock.advance(8)
        proto.dataReceived(frame[half:] + frame[:half])  # ends one, starts the next
        h.publisher.calls[i][2].callback(1)
    assert not transport.disconnecting
    assert transport.value() == struct.pack(">I", 1) * 5
    h.clock.advance(10)
    assert transport.disconnecting  # the last half-frame never completed


def test_frame_deadline_waits_while_we_do_not_read() -> None:
    """Publishing (the device waits for our ACK) and back-pressure (we do not read) are not
    the device's fault: no frame deadline then."""
    h = Harness(frame_timeout=10)
    proto, transport = h.handshaken()
    frame = avl_frame(1)
    proto.dataReceived(frame + frame[:5])  # a packet and the start of the next
    h.clock.advance(30)  # still publishing: the 5 bytes wait in the buffer
    assert not transport.disconnecting
    h.factory.publish_pressure(True)
    h.publisher.calls[0][2].callback(1)
    h.clock.advance(30)  # idle with a partial frame, but reading is paused
    assert not transport.disconnecting
    h.factory.publish_pressure(False)
    h.clock.advance(10)
    assert transport.disconnecting


def test_frame_deadline_off() -> None:
    h = Harness(frame_timeout=0, idle_timeout=600)
    proto, transport = h.handshaken()
    proto.dataReceived(PARTIAL_HEADER)
    h.clock.advance(300)
    assert not transport.disconnecting


def test_keepalives_do_not_hold_a_frame_open() -> None:
    h = Harness(frame_timeout=10)
    proto, transport = h.handshaken()
    for _ in range(30):
        proto.dataReceived(b"\xff")
        h.clock.advance(1)
    assert not transport.disconnecting  # nothing buffered: no deadline


# --------------------------------------------------------------------------- per-address limit


def test_connections_per_address() -> None:
    h = Harness(max_connections_per_address=2)
    a1 = h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
    a2 = h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 2))
    assert a1 is not None and a2 is not None
    # a third from that address is refused (counted at buildProtocol: same reactor turn)
    assert h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 3)) is None
    assert h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 1)) is not None
    assert h.sample("teltonika_connections_refused_total", limit="per_address") == 1
    assert h.sample("teltonika_connections_refused_total", limit="max_connections") == 0


def test_connections_per_address_released_on_close() -> None:
    from twisted.internet.testing import StringTransport

    h = Harness(max_connections_per_address=1)
    addr = IPv4Address("TCP", "192.0.2.1", 1)
    proto = h.factory.buildProtocol(addr)
    assert proto is not None
    proto.makeConnection(StringTransport(peerAddress=addr))
    assert h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 2)) is None
    proto.connectionLost()
    assert h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 3)) is not None


def test_connections_per_address_off_by_default() -> None:
    h = Harness()
    protos = [h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", p)) for p in range(50)]
    assert all(p is not None for p in protos)


# --------------------------------------------------------------------------- listen backlog


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("tcp:5027", "tcp:5027:backlog=1024"),
        ("tcp:5027:interface=127.0.0.1", "tcp:5027:interface=127.0.0.1:backlog=1024"),
        ("tcp:5027:backlog=50", "tcp:5027:backlog=50"),  # the endpoint string wins
        ("tcp:5027:127.0.0.1:50", "tcp:5027:127.0.0.1:50"),  # positional backlog
        ("tcp6:5027", "tcp6:5027:backlog=1024"),
        ("unix:/run/t.sock", "unix:/run/t.sock:backlog=1024"),
        ("haproxy:tcp:5027", "haproxy:tcp:5027:backlog=1024"),
        ("haproxy:tcp:5027:backlog=7", "haproxy:tcp:5027:backlog=7"),
        ("ssl:5027:privateKey=k.pem", "ssl:5027:privateKey=k.pem:backlog=1024"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_with_backlog(given: str, expected: str) -> None:
    out = with_backlog(given, 1024)
    assert out == expected
    check_server_endpoint(out)  # still a valid endpoint string


def test_backlog_reaches_the_listening_socket() -> None:
    """Twisted takes ``backlog=`` into ``listen(2)``: the port object keeps it."""
    from twisted.internet import endpoints

    endpoint = endpoints.serverFromString(reactor, with_backlog("tcp:0:interface=127.0.0.1", 777))
    assert endpoint._backlog == 777  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- budgets


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def seconds(self) -> float:
        return self.now


def test_device_budget_per_key_per_minute() -> None:
    clock = _Clock()
    budget = DeviceBudget(clock, 3)
    assert [budget.spend("a") for _ in range(5)] == [True, True, True, False, False]
    assert budget.spend("b")  # another device has its own budget
    clock.now += 60
    assert budget.spend("a")  # a new minute
    assert all(DeviceBudget(clock, 0).spend("a") for _ in range(1000))  # 0 = unlimited


def test_device_budget_memory_is_bounded() -> None:
    clock = _Clock()
    budget = DeviceBudget(clock, 1, max_keys=100)
    for i in range(10_000):
        budget.spend(i)
    assert len(budget._windows._keys) == 100


def test_repeat_limiter_counts_what_it_suppresses() -> None:
    clock = _Clock()
    limiter = RepeatLimiter(clock, burst=2)
    assert [limiter.allow("k")[0] for _ in range(5)] == [True, True, False, False, False]
    clock.now += 60
    assert limiter.allow("k") == (True, 3)  # the next line logged says 3 were suppressed
    assert limiter.allow("k") == (True, 0)
    limiter.allow("k")
    assert limiter.take_suppressed() == {"k": 1}
    assert limiter.suppressed_total == 4


# --------------------------------------------------------------------------- readiness probe


class _ProbeRedis:
    """Answers each probe with a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[defer.Deferred[Any]] = []

    def execute(self, *args: Any, timeout: float | None = None) -> defer.Deferred[Any]:
        assert args[0] == "SET" and timeout is not None
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append(d)
        return d


def test_write_probe_cached_state() -> None:
    from twisted.internet.task import Clock

    from teltonika_ingest.redis.client import RedisReplyError, RedisTimeout
    from teltonika_ingest.server.readiness import RedisWriteProbe

    clock, redis = Clock(), _ProbeRedis()
    probe = RedisWriteProbe(redis, instance_id="i", clock=clock, interval=0.5, timeout=0.8)
    probe.startService()
    assert probe.reason() == "redis has not taken a write yet"
    redis.calls[0].callback("OK")
    assert probe.reason() is None
    clock.advance(0.5)
    redis.calls[1].errback(
        RedisReplyError("OOM command not allowed when used memory > 'maxmemory'.")
    )
    assert "OOM" in (probe.reason() or "")
    clock.advance(0.5)
    redis.calls[2].errback(RedisReplyError("READONLY You can't write against a read only replica."))
    assert "READONLY" in (probe.reason() or "")
    clock.advance(0.5)
    redis.calls[3].callback("OK")
    assert probe.reason() is None
    # a probe that never comes back: no second one piles up, and the state goes stale
    clock.advance(0.5)
    assert len(redis.calls) == 5
    clock.advance(1.0)
    assert len(redis.calls) == 5
    assert "not taken a write for" in (probe.reason() or "")
    redis.calls[4].errback(RedisTimeout("no reply"))
    assert "did not answer" in (probe.reason() or "")
    probe.stopService()


# --------------------------------------------------------------------------- integration


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_trickling_peers_closed_by_the_frame_deadline(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """50 peers take every connection (--max-connections 50), each trickling a frame one
    byte every 0.2 s (the idle timer never fires). The frame deadline closes them all and a
    real device then connects and is ACKed."""
    frame_timeout = 2.0
    svc = ServiceProcess(
        redis_proc, tmp_path, "abuse",
        "--max-connections", "50", "--frame-timeout", str(frame_timeout),
        "--idle-timeout", "60", "--handshake-timeout", "5",
    ).start()  # fmt: skip
    peers: list[Any] = []
    calls: list[Any] = []
    try:
        await svc.ready()
        for n in range(50):
            peer = await open_peer(svc.device_port)
            peer.send(encode_imei(attack_imei(n)) + PARTIAL_HEADER)
            peers.append(peer)

        def trickle() -> None:
            for peer in peers:
                peer.send(b"\x08")
            if not all(p.closed.called for p in peers):
                calls.append(reactor.callLater(0.2, trickle))

        calls.append(reactor.callLater(0.2, trickle))
        # every connection is taken: a real device is turned away
        turned_away = await open_peer(svc.device_port)
        turned_away.send(HANDSHAKE)
        assert await closed_within(turned_away, 5.0) is not None
        assert b"\x01" not in turned_away.received
        # the deadline closes every trickling peer (bounded wait: a hang fails here)
        for peer in peers:
            assert await closed_within(peer, frame_timeout + 8) is not None, "peer kept open"
            assert bytes(peer.received) in (b"", b"\x01")  # the handshake reply, no ACK
        dev = await connect_device(svc.device_port)
        dev.send(HANDSHAKE)
        assert await dev.expect(1) == b"\x01"
        dev.send(avl_frame(2))
        assert await dev.expect(4) == struct.pack(">I", 2)
        dev.transport.loseConnection()
        closed = await svc.sample("teltonika_disconnects_total", reason="frame_timeout")
        assert closed == 50
        await svc.assert_no_errors()
    finally:
        for call in calls:
            if call.active():
                call.cancel()
        for peer in peers:
            if not peer.closed.called:
                peer.transport.abortConnection()
        svc.kill()


# --------------------------------------------------------------------------- /readyz


#: every /readyz request must be answered within this (the client gives up: the test fails)
READYZ_CLIENT_TIMEOUT_S = 1.0


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    """GET /readyz with a 1 s client timeout: an answer later than that fails the test."""
    agent = Agent(reactor, connectTimeout=READYZ_CLIENT_TIMEOUT_S)
    d = agent.request(b"GET", f"http://127.0.0.1:{port}/readyz".encode())
    d.addTimeout(READYZ_CLIENT_TIMEOUT_S, reactor)
    try:
        response = await d
        body = readBody(response)
        body.addTimeout(READYZ_CLIENT_TIMEOUT_S, reactor)
        data = await body
    except (defer.TimeoutError, ResponseNeverReceived):
        raise AssertionError(f"/readyz did not answer within {READYZ_CLIENT_TIMEOUT_S} s") from None
    return response.code, orjson.loads(data)


async def readyz_becomes(port: int, code: int, within: float) -> dict[str, Any]:
    """Poll /readyz (each answer within 1 s) until it answers ``code``; fail after ``within``."""
    deadline = reactor.seconds() + within
    while True:
        got, body = await readyz(port)
        if got == code:
            return body
        if reactor.seconds() > deadline:
            raise AssertionError(f"/readyz still {got} {body} after {within} s")
        await deferLater(0.05)


@pytest_twisted.async_yield_fixture
async def plain_service(redis_proc: RedisProcess, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    svc = ServiceProcess(redis_proc, tmp_path, "abuse").start()
    try:
        await svc.ready()
        yield svc
    finally:
        svc.kill()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_readyz_503_while_redis_refuses_writes(
    plain_service: ServiceProcess, redis_proc: RedisProcess
) -> None:
    """Out of memory with noeviction: Redis answers PING but refuses every write."""
    port = plain_service.http_port
    assert (await readyz(port))[0] == 200
    redis_proc.cmd("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis_proc.cmd("CONFIG", "SET", "maxmemory", "1")  # below what it uses: OOM
    try:
        body = await readyz_becomes(port, 503, within=5.0)
        assert "OOM" in body["reason"], body
        # a device's packet is not ACKed meanwhile (nothing can be stored)
        dev = await connect_device(plain_service.device_port)
        dev.send(HANDSHAKE)
        assert await dev.expect(1) == b"\x01"
        dev.send(avl_frame(1))
        await wait_closed(dev, 10.0)
        assert bytes(dev.received) == b""
    finally:
        redis_proc.cmd("CONFIG", "SET", "maxmemory", "0")
    await readyz_becomes(port, 200, within=5.0)
    await plain_service.assert_no_errors()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_readyz_answers_at_once_during_client_pause(
    plain_service: ServiceProcess, redis_proc: RedisProcess
) -> None:
    """Redis stalled (CLIENT PAUSE): /readyz answers within its 1 s deadline every time, and
    turns 503 while the stall lasts, then 200 again."""
    port = plain_service.http_port
    assert (await readyz(port))[0] == 200
    redis_proc.cmd("CLIENT", "PAUSE", "4000", "ALL")
    paused_at = reactor.seconds()
    body = await readyz_becomes(port, 503, within=3.5)
    assert reactor.seconds() - paused_at < 4.0, "only saw 503 after the pause ended"
    assert "redis" in body["reason"], body
    await readyz_becomes(port, 200, within=8.0)
    await plain_service.assert_no_errors()


async def wait_closed(dev: Any, seconds: float) -> None:
    """The service closes ``dev`` within ``seconds`` (else the test fails)."""
    d = dev.closed
    d.addTimeout(seconds, reactor)
    try:
        await d
    except defer.TimeoutError:
        raise AssertionError(f"connection not closed within {seconds} s") from None


# --------------------------------------------------------------------------- per-device budgets


def test_invalid_entry_echoes_are_cut_short() -> None:
    from teltonika_ingest.server.commands.entries import (
        ECHO_IMEI_LENGTH,
        MAX_ID_LENGTH,
        InvalidCommand,
        parse_entry,
    )

    huge = "i" * 1_000_000
    for fields, message in [
        (["id", huge, "imei", "356307042441013", "text", "getver"], "'id' is 1000000 characters"),
        (["id", "c", "imei", "7" * 1_000_000, "text", "getver"], "'imei' must be 15"),
        (["id", huge, "imei", huge], "'id' is 1000000 characters"),
    ]:
        with pytest.raises(InvalidCommand) as e:
            parse_entry(fields, max_length=512, default_timeout=30)
        assert message in str(e.value)
        assert len(e.value.id) <= MAX_ID_LENGTH
        assert len(e.value.imei) <= ECHO_IMEI_LENGTH
        assert len(str(e.value)) < 200


def codec13(n: int) -> bytes:
    from teltonika_ingest.codec import CommandMessage, encode_command_message

    text = f"flood message {n:06d} ".encode() * 4
    return encode_command_message(CommandMessage("13", 0x05, text, timestamp_ms=1_700_000_000_000))


def results(redis: RedisProcess) -> list[dict[str, str]]:
    out = []
    for _id, flat in redis.cmd("XRANGE", "commands:results", "-", "+"):
        items = [v if isinstance(v, str) else repr(v) for v in flat]
        out.append(dict(zip(items[0::2], items[1::2], strict=True)))
    return out


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_codec13_flood_leaves_other_outcomes_in_results(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """One device sends 3,000 Codec 13 messages at once. With its budget (20 a minute) only
    20 reach commands:results; the others are counted and dropped, so the outcome of
    another device's command stays in the stream (bounded here to 64 KiB, which the flood
    alone would overrun ~10 times) and that device's next command still works."""
    from twisted.internet import endpoints, protocol

    from test_hostile import CommandDevice

    budget, flood = 20, 3000
    svc = ServiceProcess(
        redis_proc, tmp_path, "abuse",
        "--device-message-budget", str(budget), "--results-max-bytes", "65536",
        "--idle-timeout", "60",
    ).start()  # fmt: skip
    try:
        await svc.ready()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", svc.device_port)
        victim: CommandDevice = await endpoint.connect(protocol.Factory.forProtocol(CommandDevice))
        victim_imei = "352093081452251"
        victim.send(encode_imei(victim_imei))
        assert await victim.expect(1) == b"\x01"
        serving = defer.ensureDeferred(victim.serve())
        await wait_for(lambda: redis_proc.cmd("HGET", "connections:registry", victim_imei))
        key = "commands:instance:abuse"
        redis_proc.cmd("XADD", key, "*", "id", "before", "imei", victim_imei, "text", "getver")
        await wait_for(lambda: any(r["id"] == "before" for r in results(redis_proc)), 10)

        flooder = await connect_device(svc.device_port)
        flooder.send(HANDSHAKE)
        assert await flooder.expect(1) == b"\x01"
        flooder.send(b"".join(codec13(n) for n in range(flood)))

        async def all_seen() -> bool:
            m = await svc.metrics()
            written = m.get(("teltonika_commands_total", frozenset({("status", "message")})), 0)
            dropped = m.get(
                ("teltonika_budget_exceeded_total", frozenset({("budget", "device_messages")})), 0
            )
            return written + dropped >= flood

        await wait_for(all_seen, timeout=20)
        redis_proc.cmd("XADD", key, "*", "id", "after", "imei", victim_imei, "text", "getver")
        await wait_for(lambda: any(r["id"] == "after" for r in results(redis_proc)), 10)
        got = results(redis_proc)
        by_id = {r["id"]: r for r in got}
        assert by_id["before"]["status"] == "ok", "the flood trimmed another command's outcome"
        assert by_id["after"]["status"] == "ok"
        messages = [r for r in got if r["status"] == "message"]
        assert len(messages) == budget
        assert all(r["imei"] == "356307042441013" for r in messages)
        dropped = await svc.sample("teltonika_budget_exceeded_total", budget="device_messages")
        assert dropped == flood - budget
        assert not flooder.closed.called  # dropped, not disconnected: its telemetry goes on
        flooder.send(avl_frame(1))
        assert await flooder.expect(4) == struct.pack(">I", 1)
        # the log says so a few times, then how many lines it suppressed (not 2,980 lines)
        warned = svc.log_path.read_text().count("over its device_messages budget")
        assert 1 <= warned <= 5, warned
        victim.transport.loseConnection()
        flooder.transport.loseConnection()
        await serving
        await svc.assert_no_errors()
    finally:
        svc.kill()


def junk_frame(n: int, size: int = 50_000) -> bytes:
    """A CRC-valid frame of an unknown codec id: dead-lettered whole, then ACKed with 1."""
    from test_hostile import crc_valid_frame

    return crc_valid_frame(b"\x42\x01" + n.to_bytes(4, "big") + b"\xaa" * size + b"\x01")


async def junk_rounds(port: int, attempts: int) -> tuple[int, int]:
    """A device sending ``attempts`` junk frames one at a time, reconnecting when closed;
    returns (ACKs received, connections closed by the service)."""
    acks = closes = 0
    dev = None
    for n in range(attempts):
        if dev is None or dev.closed.called:
            dev = await connect_device(port)
            dev.send(HANDSHAKE)
            assert await dev.expect(1) == b"\x01"
        dev.send(junk_frame(n))
        try:
            reply = await dev.expect(4, timeout=5)
        except Exception:
            await wait_closed(dev, 5.0)  # not ACKed: the service closed it (or the test fails)
            closes += 1
            continue
        assert reply == struct.pack(">I", 1)
        acks += 1
    if dev is not None and not dev.closed.called:
        dev.transport.loseConnection()
    return acks, closes


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_dead_letter_flood_stops_at_the_budget(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """One device sends 30 CRC-valid undecodable 50 KB frames. Only its budget (5 a minute)
    reaches the dead-letter stream, each ACKed; every later one is neither stored nor ACKed
    (its connection is closed, it reconnects and tries again)."""
    budget, attempts = 5, 30
    svc = ServiceProcess(redis_proc, tmp_path, "abuse", "--dead-letter-budget", str(budget)).start()
    try:
        await svc.ready()
        acks, closes = await junk_rounds(svc.device_port, attempts)
        assert redis_proc.cmd("XLEN", "telemetry:teltonika:dlq") == budget
        assert (acks, closes) == (budget, attempts - budget)
        exceeded = await svc.sample("teltonika_budget_exceeded_total", budget="dead_letters")
        assert exceeded == attempts - budget
        assert await svc.sample("teltonika_disconnects_total", reason="dead_letter_budget") == (
            attempts - budget
        )
        # another device is not affected
        dev = await connect_device(svc.device_port)
        dev.send(encode_imei("352093081452251"))
        assert await dev.expect(1) == b"\x01"
        dev.send(avl_frame(1))
        assert await dev.expect(4) == struct.pack(">I", 1)
        dev.transport.loseConnection()
        await svc.assert_no_errors()
    finally:
        svc.kill()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_dead_letter_stream_bounded_by_bytes(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """No budget, a 400 KB byte bound: 20 dead letters of 50 KB (~67 KB of Redis memory each)
    are all ACKed, and the stream keeps only the newest that fit."""
    bound = 400_000
    svc = ServiceProcess(
        redis_proc, tmp_path, "abuse", "--dead-letter-budget", "0", "--dlq-max-bytes", str(bound)
    ).start()
    try:
        await svc.ready()
        acks, closes = await junk_rounds(svc.device_port, 20)
        assert (acks, closes) == (20, 0)
        dlq = "telemetry:teltonika:dlq"
        used = redis_proc.cmd("MEMORY", "USAGE", dlq)
        length = redis_proc.cmd("XLEN", dlq)
        assert used <= bound, (used, length)
        assert 1 <= length < 20
        newest = redis_proc.cmd("XREVRANGE", dlq, "+", "-", "COUNT", "1")[0][1]
        fields = dict(zip(newest[0::2], newest[1::2], strict=True))
        import base64

        assert base64.b64decode(fields["raw_b64"]) == junk_frame(19)
        await svc.assert_no_errors()
    finally:
        svc.kill()


def test_suppressed_warnings_are_reported() -> None:
    from twisted.logger import globalLogPublisher

    from teltonika_ingest.server.tap import report_suppressed

    clock = _Clock()
    limiter = RepeatLimiter(clock, burst=1)
    for _ in range(4):
        limiter.allow(("bad_frame", "356307042441013"))
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        report_suppressed([limiter])
        report_suppressed([limiter])  # nothing new: no line
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if "repeated warnings suppressed" in e.get("log_format", "")]
    assert len(lines) == 1 and lines[0]["total"] == 3
    assert "356307042441013 x3" in lines[0]["top"]


# --------------------------------------------------------------------------- buffer memory


def partial(size: int) -> bytes:
    """A handshake's worth of nothing: a frame header declaring 60,000 data bytes and
    ``size - 8`` of them (never complete)."""
    return b"\x00\x00\x00\x00" + struct.pack(">I", 60_000) + b"\x08" * (size - 8)


def test_buffer_budget_stops_reading_the_biggest_buffers() -> None:
    h = Harness(max_buffered_bytes=100_000, frame_timeout=0)
    conns = [h.handshaken(port=p, imei=f"35{p:013d}") for p in range(1, 6)]
    sizes = [10_000, 40_000, 30_000, 5_000, 14_000]  # 99,000: within the budget
    for (proto, _t), size in zip(conns, sizes, strict=True):
        proto.dataReceived(partial(size))
    assert h.factory.buffered_total == 99_000
    assert h.sample("teltonika_buffered_bytes") == 99_000
    assert all(t.producerState == "producing" for _p, t in conns)
    conns[3][0].dataReceived(b"\x00" * 2_000)  # 101,000: over it
    paused = [t.producerState == "paused" for _p, t in conns]
    # the biggest first, until those still read hold at most half the budget
    assert paused == [False, True, True, False, False]
    assert h.sample("teltonika_memory_pauses_total") == 2
    # the others are read in small pieces now, and one whose buffer grows stops too
    assert conns[4][1].bufferSize == PRESSURE_READ_SIZE  # type: ignore[attr-defined]
    conns[4][0].dataReceived(b"\x00" * 1_000)
    assert conns[4][1].producerState == "paused"
    proto6, t6 = h.handshaken(port=6, imei=f"35{6:013d}")
    proto6.dataReceived(avl_frame(1))  # a whole frame: taken, ACKed, not paused
    h.publisher.calls[-1][2].callback(1)
    assert t6.producerState == "producing" and t6.value() == struct.pack(">I", 1)
    assert h.sample("teltonika_memory_pauses_total") == 3
    # the paused ones stay paused while the total is above 3/4 of the budget ...
    conns[0][0].connectionLost()
    assert [t.producerState for _p, t in conns[1:3]] == ["paused", "paused"]
    # ... and read again (in whole reads) once it is below
    conns[1][0].connectionLost()
    assert h.factory.buffered_total == 30_000 + 7_000 + 15_000
    assert [conns[i][1].producerState for i in (2, 3, 4)] == ["producing"] * 3
    assert conns[4][1].bufferSize == READ_SIZE  # type: ignore[attr-defined]


def test_buffer_budget_off() -> None:
    h = Harness(max_buffered_bytes=0, frame_timeout=0)
    proto, transport = h.handshaken()
    proto.dataReceived(partial(60_000))
    assert transport.producerState == "producing"
    assert h.factory.buffered_total == 60_000


def test_buffer_released_on_close() -> None:
    h = Harness(frame_timeout=0)
    proto, _t = h.handshaken()
    proto.dataReceived(partial(50_000))
    assert proto.session is not None and proto.session.buffered == 50_000
    proto.connectionLost()
    assert proto.session.buffered == 0 and len(proto.session._framer._buf) == 0
    assert h.factory.buffered_total == 0
    assert h.sample("teltonika_buffered_bytes") == 0


def test_buffer_total_follows_consumed_frames() -> None:
    h = Harness(frame_timeout=0)
    proto, _transport = h.handshaken()
    frame = avl_frame(2)
    proto.dataReceived(frame + frame[:10])  # one whole frame and the start of the next
    assert h.factory.buffered_total == 10  # the first frame was taken whole
    h.publisher.calls[0][2].callback(2)
    assert h.factory.buffered_total == 10
    proto.dataReceived(frame[10:50])
    assert h.factory.buffered_total == 50
    proto.dataReceived(frame[50:])
    h.publisher.calls[1][2].callback(2)
    assert h.factory.buffered_total == 0


def test_malloc_trim_after_many_closed_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    import teltonika_ingest.server.protocol as protocol_module

    trims: list[float] = []
    monkeypatch.setattr(protocol_module, "malloc_trim", lambda: trims.append(1) or True)
    h = Harness(frame_timeout=0)
    for p in range(200):  # 200 x 60 KB = 12 MB of buffers closed
        proto, _t = h.handshaken(port=p + 1, imei=f"35{p:013d}")
        proto.dataReceived(partial(60_000))
        proto.connectionLost()
    assert trims == []  # not at once: after the burst
    h.clock.advance(1.0)
    assert trims == [1]
    for p in range(200):
        proto, _t = h.handshaken(port=p + 1, imei=f"36{p:013d}")
        proto.dataReceived(partial(60_000))
        proto.connectionLost()
    h.clock.advance(1.0)
    assert trims == [1]  # at most every TRIM_EVERY_S (2 s)
    h.clock.advance(1.0)
    assert trims == [1, 1]


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_buffer_budget_holds_parked_frames_off(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """20 peers park 60 KB partial frames against a 256 KB budget: the service stops reading
    them (the kernel holds the rest), its buffers stay near the budget, a real device is
    still ACKed, and the frame deadline closes the parked peers."""
    budget = 256_000
    svc = ServiceProcess(
        redis_proc, tmp_path, "abuse",
        "--max-buffered-bytes", str(budget), "--frame-timeout", "3",
    ).start()  # fmt: skip
    peers: list[Any] = []
    try:
        await svc.ready()
        for n in range(20):
            peer = await open_peer(svc.device_port)
            peer.send(encode_imei(attack_imei(n)) + partial(60_000))
            peers.append(peer)

        async def paused() -> bool:
            return await svc.sample("teltonika_memory_pauses_total") >= 1

        await wait_for(paused, timeout=10)
        buffered = await svc.sample("teltonika_buffered_bytes")
        # the budget, the read that crossed it, and at most one small read per connection
        assert buffered <= budget + READ_SIZE + 20 * PRESSURE_READ_SIZE, buffered
        dev = await connect_device(svc.device_port)
        dev.send(HANDSHAKE)
        assert await dev.expect(1) == b"\x01"
        dev.send(avl_frame(3))
        assert await dev.expect(4) == struct.pack(">I", 3)
        for peer in peers:  # paused or not, the frame deadline closes them
            assert await closed_within(peer, 10.0) is not None
        dev.transport.loseConnection()

        async def released() -> bool:
            return await svc.sample("teltonika_buffered_bytes") == 0

        await wait_for(released, timeout=10)
        await svc.assert_no_errors()
    finally:
        for peer in peers:
            if not peer.closed.called:
                peer.transport.abortConnection()
        svc.kill()


# --------------------------------------------------------------------------- stop without Redis


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_stop_with_redis_refusing_connections_is_clean_and_quick(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """OPERATIONS.md: with Redis refusing connections (stopped), every step that needs it
    fails at once, so a stop is a clean one and does not run out --shutdown-timeout."""
    import signal

    svc = ServiceProcess(redis_proc, tmp_path, "abuse").start()
    try:
        await svc.ready()
        dev = await connect_device(svc.device_port)
        dev.send(HANDSHAKE)
        assert await dev.expect(1) == b"\x01"
        redis_proc.stop()  # connections are refused from now on
        status = await svc.terminate(timeout=15.0)  # far below the 30 s budget (or fails)
        log = svc.log_path.read_text()
        assert status in (0, -signal.SIGTERM), log[-2000:]
        assert "shutdown complete" in log
        assert "exiting with status 1" not in log
    finally:
        svc.kill()
