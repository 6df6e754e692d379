"""Hostile input against a real ``twistd -n teltonika-ingest`` process (issue 7).

Each test starts ``redis-server`` and the service, keeps a few well-behaved *canary*
devices sending all along, attacks, and then checks that

* the service stayed up (``/healthz``), counted no unhandled or session error (no input
  may reach an unexpected exception path) and ACKed nothing it should not have;
* every canary kept being ACKed during the attack (a count, not a latency bound);
* the canaries' ACKed records are all in the stream (the invariant);
* what the attack opened was given back: the service's open file descriptors (``/proc``)
  return to their count before the attack, and only the canaries stay connected.

No test here asserts a time, a latency or a memory size: on a loaded machine those measure
the machine. The canaries' ACK latency and the service's resident memory (``VmRSS``) during
and after each attack are recorded as figures (``RELIABILITY_FIGURES``, RELIABILITY.md);
that reference cycles do not keep rejected connections alive is checked exactly, with the
garbage collector, in ``test_rejected_connections_leave_no_reference_cycles``.

The attacker of ``test_thousands_of_connections_that_never_send`` runs in a child process
(``python tests/test_hostile.py idle PORT N SECONDS``) so that opening thousands of sockets
does not slow the canaries' own reactor; the others run in the test's reactor.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor, task

from teltonika_ingest.codec import (
    CODEC_12,
    TYPE_RESPONSE,
    CommandMessage,
    crc16_ibm,
    decode_command_frame,
    encode_command_message,
    encode_imei,
)
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.protocol import SessionSettings, TeltonikaFactory
from teltonika_ingest.sim.invariant import StreamIndex, SyncRedis, read_stream

from device import (
    DeviceProtocol,
    connect_device,
    deferLater,
    expect_frame,
    until_closed,
    wait_for,
)
from redisproc import RedisProcess
from support import SoonPublisher, avl_frame
from test_faults import (
    AckRecorder,
    Fleet,
    ServiceProcess,
    check_invariant,
    emit_figures,
    quantile,
    redis_target,
)

pytestmark = pytest.mark.integration

INSTANCE = "hostile"
HANDSHAKE_TIMEOUT = 2.0
IDLE_TIMEOUT = 4.0
CANARIES = 4


# --------------------------------------------------------------------------- set-up


class Hostile:
    """The service under attack, its Redis, and the canary devices."""

    def __init__(self, redis: RedisProcess, svc: ServiceProcess, canaries: Fleet) -> None:
        self.redis = redis
        self.svc = svc
        self.canaries = canaries
        self.recorder = canaries.recorder
        self.baseline: dict[str, Any] = {}  # canary latency before any attack
        self.fds_baseline = 0  # the service's open descriptors before any attack

    @property
    def port(self) -> int:
        return self.svc.device_port

    def rss(self) -> int:
        return self.svc.rss_kib()

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.svc.pid}/fd"))

    async def gave_back_what_the_attack_opened(self) -> None:
        """Every descriptor the attack made the service open is closed again (within a
        deadline: the last closes are on their way), and only the canaries are connected."""
        await wait_for(lambda: self.open_fds() <= self.fds_baseline, timeout=15)
        active = await self.svc.sample("teltonika_connections_active")
        assert active == CANARIES, active

    async def settled_rss(self, seconds: float = 1.0) -> int:
        """RSS after the service went quiet (closed connections are freed on the next turns)."""
        await deferLater(seconds)
        return self.rss()

    def canary_latency(self, start: float, end: float) -> dict[str, Any]:
        lats = self.recorder.latencies_between(start, end)
        return {
            "canary_acks": len(lats),
            "canary_p50_ms": round(quantile(lats, 0.5) * 1000, 2) if lats else None,
            "canary_p99_ms": round(quantile(lats, 0.99) * 1000, 2) if lats else None,
            "canary_max_ms": round(max(lats) * 1000, 2) if lats else None,
        }

    def assert_canaries_fine(self, start: float, end: float) -> dict[str, Any]:
        """Every canary was ACKed during [start, end]; returns their latency (a figure)."""
        for d in self.canaries.devices:
            assert any(start <= at <= end for at in d.ack_times), f"canary {d.imei} starved"
        return self.canary_latency(start, end)

    async def finish(self) -> dict[str, Any]:
        """Stop the canaries; the service is healthy, error-free, and lost nothing."""
        assert self.svc.alive(), self.svc.log_tail()
        assert await self.svc.healthy()
        await self.canaries.stop()
        report = check_invariant(self.redis, self.recorder)
        await self.svc.assert_no_errors()
        return {
            "canary_records_acked": report.acked_records,
            "canary_missing": report.missing,
            "canary_baseline_p99_ms": self.baseline.get("canary_p99_ms"),
        }

    def stream_imeis(self) -> StreamIndex:
        with SyncRedis(redis_target(self.redis)) as client:
            return read_stream(client, "telemetry:teltonika")


@pytest_twisted.async_yield_fixture
async def hostile(redis_proc: RedisProcess, tmp_path: Path) -> AsyncIterator[Hostile]:
    svc = ServiceProcess(
        redis_proc, tmp_path, INSTANCE,
        "--handshake-timeout", str(HANDSHAKE_TIMEOUT),
        "--idle-timeout", str(IDLE_TIMEOUT),
        "--publish-timeout", "2",
    ).start()  # fmt: skip
    recorder = AckRecorder(tmp_path / "canary-acks.log")
    canaries: Fleet | None = None
    try:
        await svc.ready()
        canaries = Fleet(CANARIES, svc.device_port, recorder, pace=0.05, records=1).start()
        await canaries.wait_acked(5)
        quiet_from = reactor.seconds()
        await deferLater(1.0)  # a baseline figure of the canaries' latency (not asserted)
        hostile = Hostile(redis_proc, svc, canaries)
        hostile.baseline = hostile.canary_latency(quiet_from, reactor.seconds())
        hostile.fds_baseline = hostile.open_fds()
        yield hostile
    finally:
        if canaries is not None and not all(r.called for r in canaries.runs):
            await canaries.stop(grace=0)
        recorder.close()
        svc.kill()


# --------------------------------------------------------------------------- a raw peer


class Peer(protocol.Protocol):
    """Records what the service sends and when it closes; sends what it is told."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: defer.Deferred[float] = defer.Deferred()
        self.opened_at = 0.0

    def connectionMade(self) -> None:
        self.opened_at = reactor.seconds()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        if not self.closed.called:
            self.closed.callback(reactor.seconds())

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed.called:
            self.transport.write(data)

    def wait_closed(self, timeout: float = 5.0) -> defer.Deferred[Any]:
        return until_closed(self, self.closed, timeout)


async def open_peer(port: int) -> Peer:
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    peer: Peer = await endpoint.connect(protocol.Factory.forProtocol(Peer))
    return peer


async def closed_within(peer: Peer, seconds: float) -> float | None:
    """Seconds until the service closed ``peer`` (None: still open; we close it then)."""
    d = defer.Deferred()
    peer.closed.addCallback(lambda at: d.callback(at) if not d.called else None)
    timer = reactor.callLater(seconds, lambda: d.callback(None) if not d.called else None)
    at = await d
    if timer.active():
        timer.cancel()
    if at is None:
        peer.transport.abortConnection()
        await peer.wait_closed()
        return None
    return float(at) - peer.opened_at


async def bounded_gather(jobs: list[Any], concurrency: int) -> list[Any]:
    """Run coroutine factories with at most ``concurrency`` at a time."""
    sem = defer.DeferredSemaphore(concurrency)
    return list(
        await defer.gatherResults(
            [sem.run(lambda job=job: defer.ensureDeferred(job())) for job in jobs]
        )
    )


def attack_imei(n: int) -> str:
    return f"99{n:013d}"


def crc_valid_frame(data: bytes) -> bytes:
    """A frame around ``data`` (codec id .. number of data 2) with a correct CRC."""
    return (
        b"\x00\x00\x00\x00"
        + struct.pack(">I", len(data))
        + data
        + struct.pack(">I", crc16_ibm(data))
    )


# --------------------------------------------------------------------------- the attacks


async def random_bytes_rounds(
    hostile: Hostile, rounds: int, per_round: int = 400
) -> tuple[list[tuple[float, float, int]], dict[str, int]]:
    """``rounds`` rounds of ``per_round`` connections sending random bytes, four kinds in
    turn; returns (start, end, RSS after) per round and what the connections saw."""
    rnd = random.Random(7)

    def payload(kind: int, n: int) -> bytes:
        noise = rnd.randbytes(rnd.randint(1, 2048))
        handshake = encode_imei(attack_imei(n))
        if kind == 0:  # noise instead of a handshake
            return noise
        if kind == 1:  # handshake, then noise
            return handshake + noise
        if kind == 2:  # a frame header, random body, random CRC
            body = rnd.randbytes(rnd.randint(1, 2048))
            return handshake + b"\x00" * 4 + struct.pack(">I", len(body)) + body + noise[:4]
        # a frame with a random body and a *correct* CRC: decoded or dead-lettered
        codec = rnd.choice([0x08, 0x8E, 0x10, 0x0C, 0x0D, 0x0E, rnd.randrange(256)])
        body = bytes([codec]) + rnd.randbytes(rnd.randint(1, 1024))
        return handshake + crc_valid_frame(body)

    outcomes = {"closed": 0, "left_open": 0, "bytes_back": 0, "acked_after_dead_letter": 0}

    async def one(n: int) -> None:
        peer = await open_peer(hostile.port)
        kind = n % 4
        peer.send(payload(kind, n))
        if kind == 3:
            # CRC-valid: dead-lettered and ACKed (AVL codec ids), dead-lettered or taken as
            # a device message without an ACK (command codec ids), or closed
            with contextlib.suppress(AssertionError):
                await wait_for(lambda: len(peer.received) >= 5 or peer.closed.called, 1.0)
            outcomes["acked_after_dead_letter"] += len(peer.received) >= 5
            outcomes["left_open"] += await closed_within(peer, 0.05) is None
        else:
            took = await closed_within(peer, IDLE_TIMEOUT + 2)
            outcomes["closed" if took is not None else "left_open"] += 1
        outcomes["bytes_back"] += len(peer.received)

    done = []
    for r in range(rounds):
        start = reactor.seconds()
        numbers = range(r * per_round, (r + 1) * per_round)
        await bounded_gather([lambda n=n: one(n) for n in numbers], 50)
        done.append((start, reactor.seconds(), await hostile.settled_rss()))
    return done, outcomes


@pytest_twisted.ensureDeferred
async def test_random_bytes(hostile: Hostile) -> None:
    rounds, outcomes = await random_bytes_rounds(hostile, 2)
    latency = hostile.assert_canaries_fine(rounds[0][0], rounds[-1][1])
    await hostile.gave_back_what_the_attack_opened()
    # nothing random was stored as a record (CRC-valid junk goes to the dead-letter stream)
    attack = {attack_imei(n) for n in range(800)}
    assert not attack & set(hostile.stream_imeis().by_imei)
    assert outcomes["left_open"] <= 200  # only CRC-valid command-codec junk is left open
    figures = await hostile.finish()
    dead = hostile.redis.cmd("XLEN", "telemetry:teltonika:dlq")
    emit_figures(
        "hostile_random_bytes",
        {"connections": 800, **outcomes, "dead_lettered": dead, **latency, **figures},
    )


@pytest_twisted.ensureDeferred
async def test_random_bytes_rounds_give_back_what_they_opened(hostile: Hostile) -> None:
    rounds, _ = await random_bytes_rounds(hostile, 4)
    await hostile.gave_back_what_the_attack_opened()
    emit_figures("hostile_random_bytes_memory", {"rss_kib": [r[2] for r in rounds]})


def test_rejected_connections_leave_no_reference_cycles() -> None:
    """Rejected input (a bad handshake, a CRC-valid undecodable frame) must leave nothing
    that only the cyclic garbage collector can free: refcounting frees a closed connection."""
    import gc

    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    from support import HANDSHAKE, Harness

    harness = Harness()
    inputs = [
        b"\x00\x05hello",  # IMEI length 5
        b"\x00\x0f35630704244101x",  # a non-digit
        HANDSHAKE + crc_valid_frame(b"\x42\x01" + b"\x00" * 8 + b"\x01"),  # unknown codec
        HANDSHAKE + crc_valid_frame(b"\x08\x02" + b"\x00" * 30 + b"\x01"),  # count mismatch
    ]
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for data in inputs:
            proto, _transport = harness.connect()
            proto.dataReceived(data)
            for *_args, d in harness.publisher.dead:
                if not d.called:
                    d.callback(None)
            proto.connectionLost(Failure(ConnectionDone()))
            del proto, _transport
        harness.publisher.dead.clear()
        gc.collect()
        kept = sorted(
            {type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("teltonika")}
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert kept == [], f"held only by reference cycles: {kept}"


@pytest_twisted.ensureDeferred
async def test_truncated_frames(hostile: Hostile) -> None:
    rnd = random.Random(11)
    acked_wrongly = 0
    closed_by_idle: list[float] = []

    async def one(n: int) -> None:
        nonlocal acked_wrongly
        frame = avl_frame(rnd.randint(1, 5), start=n)
        cut = rnd.randint(1, len(frame) - 1)
        peer = await open_peer(hostile.port)
        peer.send(encode_imei(attack_imei(n)) + frame[:cut])
        kind = n % 3
        if kind == 0:  # the device gives up mid-frame
            await deferLater(0.05)
            peer.transport.loseConnection()
            await peer.wait_closed()
        elif kind == 1:  # the rest never comes: the idle timeout closes it
            took = await closed_within(peer, IDLE_TIMEOUT + 3)
            assert took is not None, "a truncated frame held a connection past the idle timeout"
            closed_by_idle.append(took)
        else:  # a whole frame follows the cut one: read as one frame, bad CRC, closed
            await deferLater(0.05)
            peer.send(avl_frame(2, start=n + 10_000))
            took = await closed_within(peer, IDLE_TIMEOUT + 3)
            assert took is not None
        if bytes(peer.received[1:]):  # anything after the handshake's 01 is an ACK
            acked_wrongly += 1

    start = reactor.seconds()
    await bounded_gather([lambda n=n: one(n) for n in range(150)], 50)
    end = reactor.seconds()
    latency = hostile.assert_canaries_fine(start, end)
    assert acked_wrongly == 0
    assert not {attack_imei(n) for n in range(150)} & set(hostile.stream_imeis().by_imei)
    # the service closed the 100 it had to close, the 50 left mid-frame by the idle timeout
    # (counts, not times: the times are figures); one followed by a whole frame is closed
    # on its bad CRC, or waits for the rest of the length it read and meets the idle timeout
    closes = {
        reason: await hostile.svc.sample("teltonika_disconnects_total", reason=reason)
        for reason in ("idle_timeout", "crc_fail", "malformed", "too_large")
    }
    assert sum(closes.values()) == 100 and closes["idle_timeout"] >= 50, closes
    await hostile.gave_back_what_the_attack_opened()
    figures = await hostile.finish()
    emit_figures(
        "hostile_truncated_frames",
        {
            "connections": 150, "acked_wrongly": acked_wrongly,
            "idle_close_s_max": round(max(closed_by_idle), 2), **latency, **figures,
        },
    )  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_declared_length_of_4_gib(hostile: Hostile) -> None:
    junk = b"\xaa" * (1 << 20)
    times: list[float] = []

    async def one(n: int) -> None:
        peer = await open_peer(hostile.port)
        header = b"\x00\x00\x00\x00" + struct.pack(">I", 0xFFFFFFFF if n % 2 else 65537)
        peer.send(encode_imei(attack_imei(n)) + header)
        peer.send(junk)  # what follows the header must not be read, let alone buffered
        took = await closed_within(peer, 3.0)
        assert took is not None, "a 4 GiB frame header did not close the connection"
        times.append(took)
        # 01 (handshake accepted) at most: closing with unread junk sends a reset, which
        # may discard the 01 before it is read
        assert bytes(peer.received) in (b"", b"\x01")

    rss = []
    start = reactor.seconds()
    for r in range(3):
        await bounded_gather([lambda n=n: one(n) for n in range(r * 30, r * 30 + 30)], 10)
        rss.append(await hostile.settled_rss())
    end = reactor.seconds()
    latency = hostile.assert_canaries_fine(start, end)
    await hostile.gave_back_what_the_attack_opened()
    too_large = await hostile.svc.sample(
        "teltonika_frames_total", codec="unknown", result="too_large"
    )
    assert too_large == 90
    # no handshake either: 00 00 is an IMEI length of 0
    peer = await open_peer(hostile.port)
    peer.send(b"\x00\x00\x00\x00\xff\xff\xff\xff" + junk)
    assert await closed_within(peer, 3.0) is not None
    assert bytes(peer.received) in (b"", b"\x00")
    figures = await hostile.finish()
    emit_figures(
        "hostile_4gib_length",
        {
            "connections": 91, "junk_sent_per_connection_kib": 1024,
            "close_s_max": round(max(times), 3), "rss_kib": rss, **latency, **figures,
        },
    )  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_slow_loris_handshake(hostile: Hostile) -> None:
    async def one(n: int) -> float:
        peer = await open_peer(hostile.port)
        handshake = encode_imei(attack_imei(n))

        def drip(i: int = 0) -> None:
            if i < len(handshake) and not peer.closed.called:
                peer.send(handshake[i : i + 1])
                reactor.callLater(0.25, drip, i + 1)

        drip()  # 17 bytes over 4.25 s: longer than the handshake timeout
        took = await closed_within(peer, HANDSHAKE_TIMEOUT + 3)
        assert took is not None, "a slow-loris handshake kept its connection"
        assert b"\x01" not in peer.received
        return took

    start = reactor.seconds()
    times = await bounded_gather([lambda n=n: one(n) for n in range(200)], 200)
    end = reactor.seconds()
    latency = hostile.assert_canaries_fine(start, end)
    # closed by the handshake timeout, each one (the times are figures)
    timeouts = await hostile.svc.sample("teltonika_handshakes_total", result="timeout")
    assert timeouts == 200
    await hostile.gave_back_what_the_attack_opened()
    figures = await hostile.finish()
    emit_figures(
        "hostile_slow_loris",
        {
            "connections": 200, "closed_after_s_min": round(min(times), 2),
            "closed_after_s_max": round(max(times), 2), **latency, **figures,
        },
    )  # fmt: skip


#: how long the idle attacker waits for another close before it stops waiting
IDLE_ATTACK_HOLD_S = 10.0


def run_idle_attack(port: int, count: int, hold: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "idle", str(port), str(count), str(hold)],
        capture_output=True,
        text=True,
        timeout=hold + 60,
        check=True,
    )
    return dict(json.loads(out.stdout))


@pytest_twisted.ensureDeferred
async def test_thousands_of_connections_that_never_send(hostile: Hostile) -> None:
    n = 2000
    before = await hostile.settled_rss(0.5)
    rounds: list[dict[str, Any]] = []
    for size in (n, n, 2 * n, 2 * n):
        start = reactor.seconds()
        peak = 0

        def sample_peak() -> None:
            nonlocal peak
            peak = max(peak, hostile.rss())

        sampler = task.LoopingCall(sample_peak)
        sampler.start(0.1)
        result = await _in_thread(run_idle_attack, hostile.port, size, IDLE_ATTACK_HOLD_S)
        sampler.stop()
        end = reactor.seconds()
        latency = hostile.assert_canaries_fine(start, end)
        after = await hostile.settled_rss(1.0)
        rounds.append({"size": size, "peak_kib": peak, "after_kib": after, **result, **latency})
        assert result["left_open"] == 0, result
        # the service closed every connection it got (a SYN-cookie connection the kernel
        # dropped at a full accept queue never reached it; its device would retry)
        assert result["closed_by_server"] + result["never_reached_service"] == size, result
        assert result["closed_by_server"] >= 0.95 * size, result
        assert result["bytes_received"] == 0
        await hostile.gave_back_what_the_attack_opened()
    # what a connection costs while it lasts (the first round's peak over the RSS before
    # any attack), for the record: a leak of a fraction of it would break the checks above
    per_conn = (rounds[0]["peak_kib"] - before) / n
    timeouts = await hostile.svc.sample("teltonika_handshakes_total", result="timeout")
    assert timeouts == sum(r["closed_by_server"] for r in rounds)
    figures = await hostile.finish()
    emit_figures(
        "hostile_idle_connections",
        {
            "rss_before_kib": before, "rounds": rounds,
            "peak_kib_per_connection": round(per_conn, 2), **figures,
        },
    )  # fmt: skip


async def _in_thread(fn: Any, *args: Any) -> Any:
    from twisted.internet import threads

    return await threads.deferToThread(fn, *args)


@pytest_twisted.ensureDeferred
async def test_device_that_never_reads(hostile: Hostile) -> None:
    """Sends valid packets and never reads an ACK. The kernel holds the ACKs first (the
    peer's receive buffer, then ours); this run stays within that, so it shows the service
    unharmed, not the user-space bound: see ``test_write_buffer_bounded_when_peer_never_reads``."""

    class Mute(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.pauseProducing()  # never read a byte

    start = reactor.seconds()
    rss_before = hostile.rss()
    mutes = []
    for i in range(4):
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", hostile.port)
        mute = await endpoint.connect(protocol.Factory.forProtocol(Mute))
        mute.transport.write(encode_imei(attack_imei(1 + i)))
        mutes.append(mute)
    frames = [avl_frame(1, codec="8", start=k) for k in range(10)]
    sent = 0
    deadline = reactor.seconds() + 6
    while reactor.seconds() < deadline:
        for mute in mutes:
            t = mute.transport
            if t.connected and t._tempDataLen + len(t.dataBuffer) < 64 * 1024:
                t.write(b"".join(frames))  # pipelined, far more than one in flight
                sent += len(frames)
        await deferLater(0.02)
    end = reactor.seconds()
    latency = hostile.assert_canaries_fine(start, end)
    rss_after = await hostile.settled_rss()
    for mute in mutes:
        mute.transport.abortConnection()
    await hostile.gave_back_what_the_attack_opened()
    acked = sum(len(v) for k, v in hostile.stream_imeis().by_imei.items() if k.startswith("99"))
    overflow = await hostile.svc.sample("teltonika_disconnects_total", reason="buffer_overflow")
    figures = await hostile.finish()
    emit_figures(
        "hostile_never_reads",
        {
            "devices": 4, "packets_sent": sent, "records_published": acked,
            "ack_bytes_unread": acked * 4, "rss_growth_kib": rss_after - rss_before,
            "closed_buffer_overflow": overflow,
            **latency, **figures,
        },
    )  # fmt: skip


class _FullSocket:
    """A socket whose peer never reads and whose kernel buffers are full: ``send`` takes
    nothing (EWOULDBLOCK), everything else is the real socket."""

    def __init__(self, real: socket.socket) -> None:
        self._real = real

    def send(self, data: Any, *flags: int) -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest_twisted.ensureDeferred
async def test_write_buffer_bounded_when_peer_never_reads() -> None:
    """The real protocol and Twisted TCP transport; the service-side socket reports itself
    full (as once the peer's receive buffer and ours are, after some MB of unread ACKs).
    Bound: twice Twisted's write ``bufferSize``, past which a producer is paused. The
    publisher is a working stub (every packet is published, then ACKed), so the connection
    stays open and the ACKs really pile up against the full socket."""
    publisher = SoonPublisher(reactor)
    factory = TeltonikaFactory(
        publisher=publisher,
        registry=None,
        metrics=Metrics(),
        clock=reactor,
        settings=SessionSettings(),
    )
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        dev = await connect_device(port.getHost().port)
        dev.send(encode_imei(attack_imei(1)))
        assert await dev.expect(1) == b"\x01"
        (proto,) = factory.connections
        transport: Any = proto.transport
        transport.socket = _FullSocket(transport.socket)
        bound = 2 * transport.bufferSize
        frame = avl_frame(1, codec="8")
        worst = 0
        paused_rounds = 0
        for _ in range(1000):
            assert not dev.closed.called and not proto._closing, "the connection was closed"
            # 200 packets more whenever the session has read what it got (a device may
            # pipeline, but not past --max-buffer: that would be closed, rightly)
            if proto.session is not None and proto.session.buffered < 16_384:
                dev.send(frame * 200)
            await deferLater(0.01)
            worst = max(
                worst, transport._tempDataLen + len(transport.dataBuffer) - transport.offset
            )
            paused_rounds += proto._write_blocked
            if paused_rounds >= 50:  # paused, and kept being sent to for 50 more rounds
                break
        # the stub works: packets were published (and ACKed into the full socket) until
        # reading paused, and reading did pause
        assert 4 * publisher.published > transport.bufferSize, publisher.published
        assert proto._write_blocked, "the transport never paused the connection"
        assert worst <= bound, f"{worst} bytes of ACKs buffered (bound {bound})"
    finally:
        for proto in list(factory.connections):
            if proto.transport is not None:
                proto.transport.abortConnection()
        await port.stopListening()


class CommandDevice(DeviceProtocol):
    """Answers every Codec 12 command with ``OK``."""

    def keep_alive(self) -> None:
        """An FF byte a second: the service's idle timeout is short in these tests."""
        if not self.closed.called:
            self.send(b"\xff")
            reactor.callLater(1.0, self.keep_alive)

    async def serve(self) -> None:
        self.keep_alive()
        while not self.closed.called:
            try:
                frame = await expect_frame(self, timeout=30)
            except Exception:
                return
            message = decode_command_frame(frame)
            self.send(encode_command_message(CommandMessage(CODEC_12, TYPE_RESPONSE, b"OK")))
            self.answered = getattr(self, "answered", 0) + 1
            assert message.codec in ("12", "14")


MALFORMED_COMMANDS: list[list[bytes | str]] = [
    ["imei", "356307042441013", "text", "getver"],  # no id
    ["id", "", "imei", "356307042441013", "text", "getver"],  # empty id
    ["id", "c", "text", "getver"],  # no imei
    ["id", "c", "imei", "12345", "text", "getver"],  # short imei
    ["id", "c", "imei", "35630704244101x", "text", "getver"],
    ["id", "c", "imei", "356307042441013"],  # no text
    ["id", "c", "imei", "356307042441013", "text", ""],
    ["id", "c", "imei", "356307042441013", "text", b"\xff\xfe"],  # not ASCII / UTF-8
    ["id", "c", "imei", "356307042441013", "text", "get\x00ver"],
    ["id", "c", "imei", "356307042441013", "text", "x" * 513],  # longer than the maximum
    ["id", "c", "imei", "356307042441013", "text", "a", "hex", "61"],
    ["id", "c", "imei", "356307042441013", "hex", "6"],
    ["id", "c", "imei", "356307042441013", "hex", "zz"],
    ["id", "c", "imei", "356307042441013", "text", "a", "codec", "13"],
    ["id", "c", "imei", "356307042441013", "text", "a", "codec", b"\x80"],
    ["id", "c", "imei", "356307042441013", "text", "a", "timeout_s", "nan"],
    ["id", "c", "imei", "356307042441013", "text", "a", "timeout_s", "-1"],
    ["id", "c", "imei", "356307042441013", "text", "a", "timeout_s", "1e308"],
    ["id", "c", "imei", "356307042441013", "text", "a", "id", "d"],  # a field twice
    [b"\xff", b"\xff", "id", "c"],  # a field name that is not UTF-8
    ["id", "c", "imei", "356307042441013", "text", "a" * 100_000],  # 100 kB
    ["id", b"\xc3\x28", "imei", "356307042441013", "text", "a"],  # id not UTF-8
]


@pytest_twisted.ensureDeferred
async def test_malformed_command_entries(hostile: Hostile) -> None:
    redis = hostile.redis
    key = f"commands:instance:{INSTANCE}"
    imei = "356307042441013"
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", hostile.port)
    dev: CommandDevice = await endpoint.connect(protocol.Factory.forProtocol(CommandDevice))
    dev.send(encode_imei(imei))
    assert await dev.expect(1) == b"\x01"
    serving = defer.ensureDeferred(dev.serve())
    await wait_for(lambda: redis.cmd("HGET", "connections:registry", imei) == INSTANCE)

    rss_before = hostile.rss()
    repeats = 100
    with redis.client() as c:  # blocks this reactor a moment: the window starts after
        for _r in range(repeats):
            c.pipeline([["XADD", key, "*", *fields] for fields in MALFORMED_COMMANDS])
        c.cmd("XADD", key, "*", "id", "valid-1", "imei", imei, "text", "getver")
    start = reactor.seconds()
    total = repeats * len(MALFORMED_COMMANDS) + 1

    def outcomes() -> list[dict[str, str]]:
        out = []
        for _id, flat in redis.cmd("XRANGE", "commands:results", "-", "+"):
            items = [v if isinstance(v, str) else repr(v) for v in flat]
            out.append(dict(zip(items[0::2], items[1::2], strict=True)))
        return out

    await wait_for(lambda: redis.cmd("XLEN", "commands:results") >= total, timeout=30)
    end = reactor.seconds()
    results = outcomes()
    assert len(results) == total  # exactly one outcome per entry
    statuses = [r["status"] for r in results]
    assert statuses.count("invalid") == total - 1
    assert next(r for r in results if r.get("id") == "valid-1")["status"] == "ok"
    latency = hostile.assert_canaries_fine(start, end)

    # the command stream replaced by a string (WRONGTYPE), then deleted: the router retries,
    # recreates its group, and the next command goes through
    redis.cmd("DEL", key)
    redis.cmd("SET", key, "not a stream")
    # the router's next read fails (WRONGTYPE) and it says so: then the key is mended
    await wait_for(lambda: "cannot read commands from" in hostile.svc.log_tail(20_000), 15)
    redis.cmd("DEL", key)
    redis.cmd("XADD", key, "*", "id", "valid-2", "imei", imei, "text", "getver")
    await wait_for(
        lambda: any(r.get("id") == "valid-2" for r in outcomes()), timeout=RECOVER_COMMANDS_S
    )
    assert next(r for r in outcomes() if r.get("id") == "valid-2")["status"] == "ok"
    rss_after = await hostile.settled_rss()
    dev.transport.loseConnection()
    await serving
    await hostile.gave_back_what_the_attack_opened()
    figures = await hostile.finish()
    emit_figures(
        "hostile_malformed_commands",
        {
            "entries": total - 1, "kinds": len(MALFORMED_COMMANDS), "invalid_outcomes": total - 1,
            "valid_ok": 2, "rss_growth_kib": rss_after - rss_before, **latency, **figures,
        },
    )  # fmt: skip


#: after the command stream is usable again, a command is answered within this time
RECOVER_COMMANDS_S = 20.0


# --------------------------------------------------------------------------- the idle attacker


def _listen_overflows() -> int:
    """The kernel's count of connections dropped at a full accept queue (all sockets)."""
    with open("/proc/net/netstat", encoding="ascii") as f:
        rows = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(dict(zip(rows[0][1:], rows[1][1:], strict=True)).get("ListenOverflows", 0))


def _idle_main(port: int, count: int, hold: float) -> None:
    """Open ``count`` connections that never send; report when the service closed them.

    Waits until every connection was closed, or ``hold`` seconds after the last one opened
    without a close. A connection still open then gets one byte: a reset means the service
    never had it (the kernel completed it with a SYN cookie while the accept queue was full,
    then forgot it: it never reached the service); otherwise it is reported as left open.
    """
    sel = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    overflows = _listen_overflows()
    start = time.monotonic()
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        opened[s] = time.monotonic()
        sel.register(s, selectors.EVENT_READ)
        if i % 50 == 49:
            # paced (~1,600 a second): the service listens with Twisted's default backlog
            # of 50; what overflows it waits for the kernel's SYN-ACK retransmission (1 s,
            # 3 s, 7 s ...) before it is accepted, and then for the handshake timeout
            time.sleep(0.03)
    closed: list[float] = []
    received = 0
    last_event = time.monotonic()
    while len(closed) < count and time.monotonic() - last_event < hold:
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if data:
                received += len(data)
                continue
            closed.append(time.monotonic() - opened[s])
            last_event = time.monotonic()
            sel.unregister(s)
            s.close()
    left = [s for s in opened if s.fileno() >= 0]
    for s in left:
        with contextlib.suppress(OSError):
            s.send(b"\x00")
    if left:
        time.sleep(0.5)
    never_accepted = left_open = 0
    for s in left:
        try:
            data = s.recv(4096)
            never_accepted += data == b""
            left_open += data != b""
        except BlockingIOError:
            left_open += 1
        except OSError:
            never_accepted += 1
        s.close()
    closed.sort()
    print(
        json.dumps(
            {
                "connections": count,
                "closed_by_server": len(closed),
                "left_open": left_open,
                "never_reached_service": never_accepted,
                "listen_overflows_on_host": _listen_overflows() - overflows,
                "bytes_received": received,
                "closed_after_s_min": round(closed[0], 2) if closed else None,
                "closed_after_s_p50": round(closed[len(closed) // 2], 2) if closed else None,
                "closed_after_s_p99": round(closed[len(closed) * 99 // 100], 2) if closed else None,
                "closed_after_s_max": round(closed[-1], 2) if closed else None,
                "open_s": round(time.monotonic() - start, 2),
            }
        )
    )


if __name__ == "__main__":
    if sys.argv[1] == "idle":
        _idle_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
