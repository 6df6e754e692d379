"""The live feed's WebSocket protocol (autobahn) and factory.

One :class:`FeedProtocol` per client:

* **access** — ``onConnect`` asks the authoriser (token from ``Authorization: Bearer`` or
  ``?token=``); a client without access is accepted and at once closed with 1008, so it
  sees a close code, not a failed handshake.
* **requests** — ``subscribe`` / ``unsubscribe`` (see :mod:`.messages`); devices the token
  may not see are refused in an ``error`` message; anything malformed closes with 4000.
* **snapshot** — on subscribe, the last known position of each device (``snapshot(devices)``);
  live positions of those devices that arrive meanwhile are held (the newest only) and sent
  after it, and a snapshot row older than a held live one is not sent.
* **back-pressure** — the client registers as a streaming producer on its transport. While
  the transport's buffer is full (Twisted pauses the producer), positions wait in ``pending``,
  one per device: a newer one replaces the older (counted as dropped). More than
  ``max_pending_bytes`` pending, or paused for longer than ``slow_timeout``: closed with 4001.
  Nothing here ever waits: the reader and the durable writer are never slowed by a client.
* **heartbeat** — autobahn's auto-ping every ``ping_interval`` s; no pong within
  ``ping_timeout``: dropped (counted as close code 1006 and a ping timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .access import Access, ConnectionInfo, LiveAuthorizer, token_from_request
from .hub import Hub
from .messages import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_VIOLATION,
    CLOSE_SLOW_CONSUMER,
    Position,
    ProtocolViolation,
    encode_error,
    encode_position,
    encode_subscribed,
    encode_unsubscribed,
    parse_request,
    position_from_row,
)
from .metrics import CLOSE_CODES, LiveMetrics

__all__ = ["FeedFactory", "FeedProtocol", "FeedSettings", "SnapshotFn"]

log = Logger()

#: ``snapshot(devices)`` → Deferred of position rows (``devices`` None: every device)
SnapshotFn = Callable[[frozenset[str] | None], "Deferred[list[dict[str, Any]]]"]


@attrs.frozen
class FeedSettings:
    ping_interval: float = 30.0
    ping_timeout: float = 10.0
    #: positions waiting for a slow client, in bytes of JSON, before it is closed (4001)
    max_pending_bytes: int = 1 << 20
    #: a client whose transport stays full this long is closed (4001)
    slow_timeout: float = 30.0
    #: inbound message size limit (autobahn closes with 1009 beyond it)
    max_message_bytes: int = 64 * 1024
    open_handshake_timeout: float = 10.0
    close_handshake_timeout: float = 2.0
    snapshot_timeout: float = 10.0


@implementer(IPushProducer)
class _Pressure:
    """What the transport pauses and resumes (the protocol itself has other
    ``pauseProducing``-like duties in autobahn, so it is a separate object)."""

    def __init__(self, proto: FeedProtocol) -> None:
        self._proto = proto

    def pauseProducing(self) -> None:
        self._proto._transport_full()

    def resumeProducing(self) -> None:
        self._proto._transport_drained()

    def stopProducing(self) -> None:
        pass


@attrs.define(slots=True)
class _Pending:
    position: Position
    prepared: Any
    size: int


class FeedProtocol(WebSocketServerProtocol):
    factory: FeedFactory

    def __init__(self) -> None:
        super().__init__()
        self.access: Access | None = None
        self.token: str | None = None
        self.subscribed: set[str] = set()
        self.everything = False
        self.peer_name = "?"
        self._opened = False
        self._full = False
        self._pending: dict[str, _Pending] = {}
        self._pending_bytes = 0
        self._stall: DelayedCall | None = None
        self._awaiting: dict[str, int] = {}  # device → snapshots outstanding
        self._awaiting_all = 0  # snapshots of "every device" outstanding
        self._held: dict[str, _Pending] = {}
        self._close_code: int | None = None

    # -- handshake and access -------------------------------------------------

    def onConnect(self, request: Any) -> Deferred[None]:  # type: ignore[override]
        self.peer_name = str(request.peer)
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.token = token_from_request(headers, request.params)
        info = ConnectionInfo(request.peer, request.path, headers, request.params)
        d = self.factory.authorizer.authorize(self.token, info)
        return d.addCallback(self._authorized)

    def _authorized(self, access: Access | None) -> None:
        self.access = access

    def onOpen(self) -> None:
        self._opened = True
        f = self.factory
        f.clients.add(self)
        f.metrics.connections.inc()
        if self.access is None:
            log.info(
                "live client {peer} refused: {why}",
                peer=self.peer_name,
                why="no token" if self.token is None else "unknown token",
            )
            self.close(CLOSE_POLICY, "bad or missing token")
            return
        transport: Any = self.transport
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()  # twisted.web's HTTPChannel, done with this socket
        transport.registerProducer(_Pressure(self), True)
        log.info(
            "live client {peer} connected ({scope})",
            peer=self.peer_name,
            scope="every device"
            if self.access.devices is None
            else f"{len(self.access.devices)} devices",
        )

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with ``code`` (once)."""
        if self._close_code is None and self.state == WebSocketProtocol.STATE_OPEN:
            self._close_code = code
            self._forget_pending()
            # sendCloseFrame: autobahn's sendClose only lets applications use 1000 and
            # 3000-4999, but 1001 (going away) and 1008 (policy) are what RFC 6455 has
            # a server send on shutdown and on a refused token
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123], isReply=False)

    # -- requests -------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.access is None or self._close_code is not None:
            return
        try:
            if isBinary:
                raise ProtocolViolation("binary frames are not part of the protocol")
            request = parse_request(payload)
        except ProtocolViolation as e:
            log.info("live client {peer} protocol violation: {reason}", peer=self.peer_name,
                     reason=str(e))  # fmt: skip
            self.close(CLOSE_PROTOCOL_VIOLATION, str(e)[:120])
            return
        if request.type == "subscribe":
            self._subscribe(request.devices)
        else:
            self._unsubscribe(request.devices)

    def _subscribe(self, devices: frozenset[str] | None) -> None:
        access = self.access
        assert access is not None
        hub = self.factory.hub
        if devices is None:
            if access.devices is None:
                hub.subscribe(self, None)
                self._send_control(encode_subscribed(None), "subscribed")
                self._request_snapshot(None)
                return
            devices = access.devices
        allowed = devices if access.devices is None else devices & access.devices
        refused = devices - allowed
        if refused:
            self._send_control(encode_error("not permitted", refused), "error")
        if not allowed:
            return
        if self.everything:
            # already receiving every device: nothing to add, but answer (and snapshot)
            self._send_control(encode_subscribed(allowed), "subscribed")
        else:
            hub.subscribe(self, allowed)
            self._send_control(encode_subscribed(allowed), "subscribed")
        self._request_snapshot(frozenset(allowed))

    def _unsubscribe(self, devices: frozenset[str] | None) -> None:
        if devices is not None and self.everything:
            self._send_control(
                encode_error('subscribed to "*": unsubscribe "*" first', devices), "error"
            )
            return
        removed = set(self.subscribed) if devices is None else set(devices)
        self.factory.hub.unsubscribe(self, devices)
        for device in removed:
            self._drop_queued(device)
        if devices is None:
            for device in list(self._pending):
                self._drop_queued(device)
        self._send_control(encode_unsubscribed(devices), "unsubscribed")

    def _drop_queued(self, device: str) -> None:
        p = self._pending.pop(device, None)
        if p is not None:
            self._pending_bytes -= p.size
        self._held.pop(device, None)

    def _wants(self, device: str) -> bool:
        return self.everything or device in self.subscribed

    # -- snapshot ---------------------------------------------------------------

    def _request_snapshot(self, devices: frozenset[str] | None) -> None:
        if devices is None:
            self._awaiting_all += 1
        else:
            for device in devices:
                self._awaiting[device] = self._awaiting.get(device, 0) + 1
        f = self.factory
        d = defer.maybeDeferred(f.snapshot, devices)
        d.addTimeout(f.settings.snapshot_timeout, f.reactor)
        d.addCallbacks(self._snapshot_ready, self._snapshot_failed)
        d.addBoth(self._snapshot_done, devices)

    def _snapshot_ready(self, rows: list[dict[str, Any]]) -> None:
        if self._close_code is not None or self.state != WebSocketProtocol.STATE_OPEN:
            return
        now = self.factory.now_ms()
        for row in rows:
            try:
                position = position_from_row(row, snapshot=True)
            except (KeyError, TypeError, ValueError) as e:
                log.warn("live snapshot row skipped: {error}", error=repr(e))
                continue
            device = position.device_id
            if not self._wants(device) or not self.access or not self.access.allows(device):
                continue
            held = self._held.get(device)
            if held is not None and held.position.ts_ms >= position.ts_ms:
                continue  # a newer live position is waiting: send that instead
            payload = encode_position(position, now)
            self._queue(position, self.factory.prepareMessage(payload), len(payload))

    def _snapshot_failed(self, failure: Failure) -> None:
        log.warn("live snapshot failed: {error}", error=failure.getErrorMessage())
        if self._close_code is None and self.state == WebSocketProtocol.STATE_OPEN:
            self._send_control(encode_error("snapshot unavailable"), "error")

    def _snapshot_done(self, _: object, devices: frozenset[str] | None) -> None:
        if devices is None:
            self._awaiting_all -= 1
        else:
            for device in devices:
                left = self._awaiting.get(device, 1) - 1
                if left > 0:
                    self._awaiting[device] = left
                else:
                    self._awaiting.pop(device, None)
        for device in [d for d in self._held if not self._is_awaited(d)]:
            held = self._held.pop(device)
            if self._close_code is None and self._wants(device):
                self._queue(held.position, held.prepared, held.size)

    def _is_awaited(self, device: str) -> bool:
        return self._awaiting_all > 0 or device in self._awaiting

    # -- delivery and back-pressure --------------------------------------------

    def deliver(self, position: Position, prepared: Any, size: int) -> None:
        """A live position of a subscribed device (called by the hub)."""
        if self._close_code is not None:
            return
        device = position.device_id
        if self._is_awaited(device):
            old = self._held.get(device)
            if old is not None:
                self.factory.metrics.dropped.inc()
            self._held[device] = _Pending(position, prepared, size)
            return
        self._queue(position, prepared, size)

    def _write(self, prepared: Any) -> None:
        """Write one prepared frame. The common case goes straight to the transport:
        autobahn's ``sendPreparedMessage`` costs ~3x more per frame (measured: 5.4 vs 1.9 us,
        its traffic statistics and an eagerly formatted debug line), which at 10,000
        frames/s is a few percent of a core. Compression or autobahn's own queue: its path."""
        if self._perMessageCompress is None and not self.send_queue:
            self.transport.write(prepared.payloadHybi)  # type: ignore[union-attr]
        else:
            self.sendPreparedMessage(prepared)
        self.factory.sent_positions.inc()

    def _queue(self, position: Position, prepared: Any, size: int) -> None:
        if not self._full and not self._pending:
            self._write(prepared)
            return
        device = position.device_id
        old = self._pending.pop(device, None)
        if old is not None:
            self._pending_bytes -= old.size
            self.factory.metrics.dropped.inc()
        self._pending[device] = _Pending(position, prepared, size)
        self._pending_bytes += size
        if self._pending_bytes > self.factory.settings.max_pending_bytes:
            self._slow(f"{self._pending_bytes} bytes of positions pending")

    def _transport_full(self) -> None:
        self._full = True
        if self._stall is None and self._close_code is None:
            f = self.factory
            self._stall = f.reactor.callLater(
                f.settings.slow_timeout, self._slow, f"not reading for {f.settings.slow_timeout}s"
            )

    def _transport_drained(self) -> None:
        self._full = False
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None
        while self._pending and not self._full and self._close_code is None:
            device = next(iter(self._pending))
            p = self._pending.pop(device)
            self._pending_bytes -= p.size
            self._write(p.prepared)

    def _slow(self, why: str) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()  # closing for the other reason (too much pending)
        self._stall = None
        if self._close_code is not None:
            return
        log.warn("live client {peer} is too slow ({why}): closing", peer=self.peer_name, why=why)
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer")

    def _forget_pending(self) -> None:
        dropped = len(self._pending) + len(self._held)
        if dropped:
            self.factory.metrics.dropped.inc(dropped)
        self._pending.clear()
        self._held.clear()
        self._pending_bytes = 0

    def _send_control(self, payload: bytes, kind: str) -> None:
        self.sendMessage(payload, isBinary=False)
        self.factory.metrics.messages.labels(kind).inc()

    # -- close ------------------------------------------------------------------

    def onAutoPingTimeout(self) -> None:
        self.factory.metrics.ping_timeouts.inc()
        log.info("live client {peer} did not answer a ping: dropping", peer=self.peer_name)
        super().onAutoPingTimeout()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None
        if not self._opened:
            return
        self._opened = False
        f = self.factory
        f.clients.discard(self)
        f.hub.drop(self)
        self._forget_pending()
        f.metrics.connections.dec()
        if self._close_code is not None:
            label = str(self._close_code)
        elif self.closedByMe and self.localCloseCode is not None:  # autobahn's own (1009)
            label = str(self.localCloseCode)
        elif wasClean and code is not None:
            label = str(code)
        else:
            label = "1006"
        f.metrics.closes.labels(label if label in CLOSE_CODES else "other").inc()
        f.closed_one()

    # -- used by the service ------------------------------------------------------

    def reauthorize(self, access: Access | None) -> None:
        """After a token reload: closed with 1008 if revoked, narrowed if the scope shrank."""
        if access is None:
            log.info("live client {peer}: token revoked, closing", peer=self.peer_name)
            self.close(CLOSE_POLICY, "token revoked")
            return
        self.access = access
        if access.devices is None:
            return
        gone: Iterable[str] = set(self.subscribed) - access.devices
        if self.everything:
            self.factory.hub.unsubscribe(self, None)
            self.factory.hub.subscribe(self, access.devices)
            self._send_control(encode_subscribed(access.devices), "subscribed")
        elif gone:
            self.factory.hub.unsubscribe(self, gone)
            for device in gone:
                self._drop_queued(device)
            self._send_control(encode_unsubscribed(gone), "unsubscribed")

    def going_away(self) -> None:
        self.close(CLOSE_GOING_AWAY, "server shutting down")


class FeedFactory(WebSocketServerFactory):
    protocol = FeedProtocol  # type: ignore[assignment]

    def __init__(
        self,
        *,
        metrics: LiveMetrics,
        authorizer: LiveAuthorizer,
        snapshot: SnapshotFn,
        settings: FeedSettings,
        reactor: Any,
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self.authorizer = authorizer
        self.snapshot = snapshot
        self.settings = settings
        self.reactor = reactor
        self.clients: set[FeedProtocol] = set()
        self.sent_positions = metrics.messages.labels("position")
        self._all_closed: list[Deferred[None]] = []
        self.hub = Hub(metrics, self.prepareMessage, self.now_ms)
        self.setProtocolOptions(
            autoPingInterval=settings.ping_interval,
            autoPingTimeout=settings.ping_timeout,
            maxMessagePayloadSize=settings.max_message_bytes,
            maxFramePayloadSize=settings.max_message_bytes,
            openHandshakeTimeout=settings.open_handshake_timeout,
            closeHandshakeTimeout=settings.close_handshake_timeout,
            failByDrop=False,  # a protocol error (e.g. 1009 too big) sends its close code
        )

    def now_ms(self) -> int:
        return int(self.reactor.seconds() * 1000)

    def closed_one(self) -> None:
        if not self.clients:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def close_all(self, timeout: float) -> Deferred[None]:
        """Close every client with 1001; fires when all are gone (dropped after ``timeout``)."""
        for client in list(self.clients):
            client.going_away()
        if not self.clients:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._all_closed.append(d)

        def drop_rest() -> None:
            for client in list(self.clients):
                client.dropConnection(abort=True)

        call = self.reactor.callLater(timeout, drop_rest)

        def done(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(done)
