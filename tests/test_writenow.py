"""``write_now``: bytes go straight to the socket when nothing is queued, else the Twisted way.

Over a real loopback connection (the reactor's own TCP transport): with an empty queue
nothing is buffered and the transport is not registered for writing (no extra reactor turn);
with bytes queued the new ones queue behind them (order kept); a transport that is not a
plain socket connection (a test transport, TLS, the PROXY wrapper) always gets ``write``.
The TLS case end to end: tests/test_tls_proxy.py (a TLS device is ACKed through this path).
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport

from teltonika_ingest.writenow import write_now

from device import wait_for


class _Capture(protocol.Protocol):
    """Runs ``action(transport)`` when connected and records what it saw."""

    def __init__(self, action: Any, seen: dict[str, Any]) -> None:
        self.action, self.seen = action, seen

    def connectionMade(self) -> None:
        self.action(self.transport)
        t: Any = self.transport
        self.seen["buffered"] = t._tempDataLen + len(t.dataBuffer) - t.offset
        self.seen["writing"] = t in reactor.getWriters()
        self.seen["done"].callback(None)


async def _serve(action: Any, expect: int) -> tuple[dict[str, Any], bytes]:
    seen: dict[str, Any] = {"done": defer.Deferred()}
    factory = protocol.Factory.forProtocol(lambda: _Capture(action, seen))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    try:
        await seen["done"]
        received = b""
        client.setblocking(False)

        def readable() -> bool:
            nonlocal received
            with contextlib.suppress(BlockingIOError):
                received += client.recv(65536)
            return len(received) >= expect

        await wait_for(readable, timeout=5)
        return seen, received
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_empty_queue_sends_at_once() -> None:
    seen, received = await _serve(lambda t: write_now(t, b"\x00\x00\x00\x0a"), 4)
    assert seen["buffered"] == 0
    assert seen["writing"] is False  # no write registration, no extra reactor turn
    assert received == b"\x00\x00\x00\x0a"


@pytest_twisted.ensureDeferred
async def test_bytes_already_queued_keep_their_place() -> None:
    def action(t: Any) -> None:
        t.write(b"first-")
        write_now(t, b"second")

    seen, received = await _serve(action, 12)
    assert seen["buffered"] == len(b"first-second")  # queued behind, sent by the reactor
    assert seen["writing"] is True
    assert received == b"first-second"


def test_other_transports_get_write() -> None:
    transport = StringTransport()
    write_now(transport, b"\x01")
    assert transport.value() == b"\x01"

    class Wrapper:
        """A ProtocolWrapper-like transport: hands unknown attributes to the socket below."""

        def __init__(self) -> None:
            self.written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(data)

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"write_now looked at {name!r} of a wrapper")

    wrapper = Wrapper()
    write_now(wrapper, b"\x01")
    assert wrapper.written == [b"\x01"]
