"""Shared helpers for tests: vectors, frames, fakes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from teltonika_ingest.codec import AvlPacket, AvlRecord, encode_avl_frame, encode_imei
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.protocol import SessionSettings, TeltonikaFactory, TeltonikaProtocol

DATA = Path(__file__).parent / "data"
VECTORS: list[dict[str, Any]] = json.loads((DATA / "teltonika-spec-vectors.json").read_text())[
    "vectors"
]


def vector(name: str) -> dict[str, Any]:
    for v in VECTORS:
        if v["name"] == name:
            return v
    raise KeyError(name)


def vector_bytes(name: str) -> bytes:
    return bytes.fromhex(vector(name)["hex"])


IMEI = "356307042441013"
HANDSHAKE = encode_imei(IMEI)


def make_record(i: int = 0, **overrides: Any) -> AvlRecord:
    fields: dict[str, Any] = dict(
        timestamp_ms=1_700_000_000_000 + i * 1000,
        priority=1,
        longitude=252793217 + i,
        latitude=546872135 - i,
        altitude=112,
        angle=270,
        satellites=9,
        speed=42,
        event_io_id=1,
        io1={21: 3, 1: 1},
        io2={66: 24079},
        io4={241: 24602},
        io8={78: 2**64 - 1},
    )
    fields.update(overrides)
    return AvlRecord(**fields)


def avl_frame(n: int = 1, codec: str = "8E", start: int = 0) -> bytes:
    records = tuple(make_record(start + i) for i in range(n))
    if codec != "8E":
        records = tuple(
            attrs.evolve(r, generation_type=5 if codec == "16" else None) for r in records
        )
    return encode_avl_frame(AvlPacket(codec=codec, records=records))


class FakePublisher:
    """Stands in for ``Publisher``: every publish returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, defer.Deferred[Any]]] = []
        self.dead: list[tuple[str, str, str, bytes, defer.Deferred[Any]]] = []
        self.inflight = 0
        self.replied_at = 0.0  # as Publisher: when the last publish call was answered
        self.frame_times: list[float | None] = []

    def publish(
        self, imei: str, packet: AvlPacket, received_ms: int, frame_at: float | None = None
    ) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((imei, packet, d))
        self.frame_times.append(frame_at)
        return d

    def publish_frame(
        self, imei: str, frame: Any, received_ms: int, frame_at: float | None = None
    ) -> defer.Deferred[Any]:
        return self.publish(imei, frame.packet, received_ms, frame_at)

    def dead_letter(
        self, imei: str, codec: str, reason: str, raw: bytes, received_ms: int
    ) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.dead.append((imei, codec, reason, raw, d))
        return d

    def drain(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class SoonPublisher:
    """A publisher that confirms every packet on the next reactor turn (for tests of what
    happens around publishing, over real sockets, without Redis)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.replied_at = 0.0
        self.published = 0

    def publish_frame(
        self, imei: str, frame: Any, received_ms: int, frame_at: float | None = None
    ) -> defer.Deferred[int]:
        def done() -> int:
            self.replied_at = self.reactor.seconds()
            self.published += 1
            return int(frame.record_count)

        return task.deferLater(self.reactor, 0, done)

    def dead_letter(
        self, imei: str, codec: str, reason: str, raw: bytes, received_ms: int
    ) -> defer.Deferred[Any]:
        return task.deferLater(self.reactor, 0, lambda: None)


class FakeRegistry:
    def __init__(self) -> None:
        self.registered: list[str] = []
        self.unregistered: list[str] = []

    def register(self, imei: str) -> None:
        self.registered.append(imei)

    def unregister(self, imei: str) -> None:
        self.unregistered.append(imei)


class Harness:
    """A factory with fakes, and helpers to open protocols over StringTransports."""

    def __init__(self, **settings: Any) -> None:
        self.clock = task.Clock()
        self.metrics = Metrics()
        self.publisher = FakePublisher()
        self.registry = FakeRegistry()
        self.factory = TeltonikaFactory(
            publisher=self.publisher,
            registry=self.registry,
            metrics=self.metrics,
            clock=self.clock,
            settings=SessionSettings(**settings),
        )

    def connect(self, port: int = 40000) -> tuple[TeltonikaProtocol, StringTransport]:
        addr = IPv4Address("TCP", "192.0.2.10", port)
        proto = self.factory.buildProtocol(addr)
        assert proto is not None
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def handshaken(
        self, port: int = 40000, imei: str = IMEI
    ) -> tuple[TeltonikaProtocol, StringTransport]:
        proto, transport = self.connect(port)
        proto.dataReceived(encode_imei(imei))
        assert transport.value() == b"\x01"
        transport.clear()
        return proto, transport

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value
