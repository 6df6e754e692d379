"""``write_now``: a Twisted transport's ``write``, sent at once when nothing is queued.

Twisted queues every write until the next reactor turn: an epoll registration, a write event,
the ``send()`` and an unregistration per write. At one packet per device and pass of the event
loop (a large fleet at a packet a minute) that is two such round trips per packet, one for the
publish to Redis and one for the device's ACK. With an empty queue the bytes go straight to
the socket; whatever the socket does not take, and every error, goes the ordinary way
(``transport.write``: buffered, the producer paused past ``bufferSize``, the error found and
reported by Twisted).

Only plain TCP and Unix-socket transports (``tcp.Connection``) are written to directly. A TLS
transport (and the PROXY-protocol wrapper) is a ``ProtocolWrapper`` that hands unknown
attributes to the transport below it: ``.socket`` would be the raw socket, and bytes sent there
would skip the encryption. Those, and test transports, always take ``transport.write``.

Used by the ingest's device connections and Redis client, and by the simulator.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["write_now"]


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but sent at once when nothing is queued."""
    if (
        not isinstance(transport, tcp.Connection)  # TCP and Unix sockets, client or server
        or transport.dataBuffer
        or transport._tempDataBuffer
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnecting
        or transport.TLS  # startTLS() on the plain transport: its protocol encrypts
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.write(data)  # let Twisted find and report the error
        return
    if sent < len(data):
        transport.write(data[sent:])
