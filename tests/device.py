"""A scripted device for integration tests: real TCP, explicit waits (no sleeps)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody


class DeviceProtocol(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self._waiters: list[tuple[int, defer.Deferred[bytes]]] = []
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._wake()

    def _wake(self) -> None:
        while self._waiters and len(self.received) >= self._waiters[0][0]:
            n, d = self._waiters.pop(0)
            chunk = bytes(self.received[:n])
            del self.received[:n]
            d.callback(chunk)

    def connectionLost(self, reason: Failure | None = None) -> None:
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(ConnectionError(f"closed with {bytes(self.received)!r} unread"))
        if not self.closed.called:
            self.closed.callback(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def expect(self, n: int, timeout: float = 5.0) -> defer.Deferred[bytes]:
        """Fires with the next ``n`` bytes; fails on close or after ``timeout``."""
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiters.append((n, d))
        self._wake()
        d.addTimeout(timeout, reactor)
        return d

    def wait_closed(self, timeout: float = 5.0) -> defer.Deferred[None]:
        """Fires once the connection is closed; fails if it is still open after ``timeout``
        (then it is aborted, so nothing is left open)."""
        return until_closed(self, self.closed, timeout)

    def close(self, timeout: float = 5.0) -> defer.Deferred[None]:
        self.transport.loseConnection()
        return self.wait_closed(timeout)


def until_closed(proto: Any, closed: defer.Deferred[Any], timeout: float) -> defer.Deferred[Any]:
    """A Deferred that follows ``closed`` for at most ``timeout`` seconds, then fails with
    a clear message and aborts the connection."""
    d: defer.Deferred[Any] = defer.Deferred()

    def fire(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if not d.called:
            d.callback(result)
        return result

    def expired() -> None:
        if d.called:
            return
        d.errback(
            AssertionError(
                f"connection still open after {timeout:g} s "
                f"(received {bytes(getattr(proto, 'received', b''))[:64]!r})"
            )
        )
        if proto.transport is not None:
            proto.transport.abortConnection()

    timer = reactor.callLater(timeout, expired)
    closed.addBoth(fire)
    return d


async def connect_device(port: int, host: str = "127.0.0.1") -> DeviceProtocol:
    endpoint = endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=5)
    proto: DeviceProtocol = await endpoint.connect(Factory.forProtocol(DeviceProtocol))
    return proto


async def http_get(url: str) -> tuple[int, bytes]:
    agent = Agent(reactor)
    response: Any = await agent.request(b"GET", url.encode())
    body = await readBody(response)
    return response.code, body


async def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` (sync or returning a Deferred/coroutine) until truthy or timeout."""
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if isinstance(value, defer.Deferred) or hasattr(value, "__await__"):
            value = await value
        if value:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        await deferLater(interval)


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


async def expect_frame(dev: DeviceProtocol, timeout: float = 5.0) -> bytes:
    """The next whole TCP frame the service wrote (preamble, length, data field, CRC)."""
    header = await dev.expect(8, timeout)
    length = int.from_bytes(header[4:8], "big")
    rest = await dev.expect(length + 4, timeout)
    return header + rest
