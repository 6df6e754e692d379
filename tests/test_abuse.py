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

from device import connect_device, deferLater
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
