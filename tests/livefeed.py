"""Helpers for the live feed tests: a real autobahn WebSocket client, a running LiveService,
and stream entries in the ingest's shape (contract.md §3)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from teltonika_ingest.codec import AvlRecord
from teltonika_ingest.codec.payload import format_timestamp, record_payload
from teltonika_ingest.processor.live import LiveService, LiveSettings
from teltonika_ingest.processor.live.feed import FeedSettings

from redisproc import RedisProcess

IMEI_A = "356307042441013"
IMEI_B = "356307042441021"
IMEI_C = "356307042441039"


class FeedClient(WebSocketClientProtocol):
    """Collects every message; ``opened``/``closed`` fire once; ``pings`` counts pings."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox: defer.DeferredQueue[dict[str, Any]] = defer.DeferredQueue()
        self.received: list[dict[str, Any]] = []
        self.opened: defer.Deferred[FeedClient] = defer.Deferred()
        self.closed: defer.Deferred[tuple[int | None, str | None]] = defer.Deferred()
        self.close_code: int | None = None
        self.pings = 0
        self.answer_pings = True

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        msg = json.loads(payload)
        self.received.append(msg)
        self.inbox.put(msg)

    def onPing(self, payload: bytes) -> None:
        self.pings += 1
        if self.answer_pings:
            super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code = code
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"closed before open: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    # -- test API

    def send_json(self, msg: Any) -> None:
        self.sendMessage(json.dumps(msg).encode())

    def next(self, timeout: float = 5.0) -> defer.Deferred[dict[str, Any]]:
        return self.inbox.get().addTimeout(timeout, reactor)

    async def expect(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message, which must be of type ``kind``."""
        msg = await self.next(timeout)
        assert msg["type"] == kind, msg
        return msg

    async def wait_closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        return await defer.Deferred.fromCoroutine(_deadline(self.closed, timeout))


async def _deadline(d: defer.Deferred[Any], timeout: float) -> Any:
    waiter: defer.Deferred[Any] = defer.Deferred()
    d.addBoth(lambda r: (waiter.called or waiter.callback(r), r)[1])
    return await waiter.addTimeout(timeout, reactor)


async def connect(
    port: int,
    token: str | None = None,
    *,
    via: str = "header",
    path: str = "/ws",
    client_cls: type[FeedClient] = FeedClient,
    timeout: float = 5.0,
) -> FeedClient:
    """Open a feed connection; ``via`` "header" (Authorization: Bearer) or "query" (?token=)."""
    url = f"ws://127.0.0.1:{port}{path}"
    headers = {}
    if token is not None and via == "header":
        headers["Authorization"] = f"Bearer {token}"
    elif token is not None:
        url += f"?token={token}"
    factory = WebSocketClientFactory(url, headers=headers)
    factory.protocol = client_cls
    factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=timeout)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=timeout)
    proto: FeedClient = await endpoint.connect(factory)
    await _deadline(proto.opened, timeout)
    return proto


# --------------------------------------------------------------------------- the service


def write_tokens(path: Path, lines: Mapping[str, str]) -> Path:
    path.write_text("".join(f"{t} {scope}\n" for t, scope in lines.items()), encoding="utf-8")
    return path


@attrs.frozen
class Target:
    host: str | None
    port: int | None
    unix_path: str | None = None
    db: int = 0
    password: str | None = None


def payload_decode(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """Stands in for the processor's decoder in tests of the feed alone: the entry's payload,
    ``timestamp`` named ``ts`` as in the positions table."""
    row = dict(json.loads(fields["payload"]))
    row["ts"] = row.pop("timestamp")
    return row


class Snapshots:
    """A ``snapshot`` function backed by a dict (device → row); records its calls."""

    def __init__(self, rows: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.rows = dict(rows or {})
        self.calls: list[frozenset[str] | None] = []
        self.gate: defer.Deferred[None] | None = None

    def __call__(self, devices: frozenset[str] | None) -> defer.Deferred[list[dict[str, Any]]]:
        self.calls.append(devices)
        rows = [r for d, r in self.rows.items() if devices is None or d in devices]
        if self.gate is None:
            return defer.succeed(rows)
        return self.gate.addCallback(lambda _: rows)


class Live:
    """A started LiveService on an ephemeral port."""

    def __init__(self, svc: LiveService, port: int, registry: CollectorRegistry) -> None:
        self.svc = svc
        self.port = port
        self.registry = registry

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value

    async def connect(self, token: str | None = None, **kw: Any) -> FeedClient:
        return await connect(self.port, token, **kw)

    async def stop(self) -> None:
        if self.svc.running:
            await self.svc.stopService()


async def start_live(
    redis: RedisProcess,
    tmp_path: Path,
    *,
    tokens: Mapping[str, str] | None = None,
    snapshot: Callable[..., Any] | None = None,
    decode: Callable[[str, dict[str, str]], Any] = payload_decode,
    stream: str = "telemetry:teltonika",
    **feed: Any,
) -> Live:
    token_file = None
    if tokens is not None:
        token_file = str(write_tokens(tmp_path / "live-tokens", tokens))
    settings = LiveSettings(
        endpoint="tcp:0:interface=127.0.0.1",
        tokens_file=token_file,
        stream=stream,
        feed=FeedSettings(**feed),
    )
    registry = CollectorRegistry()
    svc = LiveService(
        settings,
        redis_target=Target("127.0.0.1", redis.port),
        decode=decode,
        snapshot=snapshot if snapshot is not None else Snapshots(),
        registry=registry,
    )
    svc.startService()
    port = await svc.listening
    await svc.reader.started.addTimeout(5, reactor)
    return Live(svc, port.getHost().port, registry)


# --------------------------------------------------------------------------- stream entries


def record(
    i: int, *, lon: float = 25.2793217, lat: float = 54.6872135, speed: int = 42
) -> AvlRecord:
    return AvlRecord(
        timestamp_ms=1_700_000_000_000 + i * 1000,
        priority=1,
        longitude=round(lon * 1e7) + i * 1000,
        latitude=round(lat * 1e7) + i * 500,
        altitude=112,
        angle=90,
        satellites=9,
        speed=speed,
        event_io_id=0,
        io1={21: 3},
    )


def xadd(
    redis: RedisProcess, imei: str, i: int, stream: str = "telemetry:teltonika", **kw: Any
) -> str:
    """Add one entry the way the ingest does; returns its id."""
    now_ms = int(reactor.seconds() * 1000)
    payload = record_payload(record(i, **kw), imei, "8E", format_timestamp(now_ms))
    rec = record(i, **kw)
    return str(
        redis.cmd("XADD", stream, "*", "imei", imei, "codec", "8E", "ts", rec.timestamp_ms,
                  "payload", payload)
    )  # fmt: skip


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
