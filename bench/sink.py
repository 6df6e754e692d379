"""A trivial ACK-only device server: the ceiling the simulator can reach on this machine.

``python -m bench.sink [--port P] [--udp-port U] [--max-time S]``

Answers an IMEI handshake with ``01`` and each TCP frame with its record count (byte 9 of
the frame: "number of data 1"), without checking the CRC or decoding anything; UDP
datagrams get the UDP ACK. Just enough framing to follow a device's byte stream. Prints
``listening tcp PORT [udp PORT]`` on stdout once bound (port 0 = any free port), and at
exit one JSON line with what it ACKed. Stops on SIGTERM/SIGINT or after ``--max-time``.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from typing import Any

from twisted.internet import protocol

from teltonika_ingest.writenow import write_now

_ACKS = tuple(struct.pack(">I", n) for n in range(256))
_HANDSHAKE_SIZE = 17  # 000F + 15 digits


class Counters:
    def __init__(self) -> None:
        self.connections = 0
        self.packets = 0
        self.records = 0
        self.datagrams = 0
        self.started = time.monotonic()

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "packets": self.packets,
            "records": self.records,
            "datagrams": self.datagrams,
            "seconds": round(time.monotonic() - self.started, 3),
        }


class SinkProtocol(protocol.Protocol):
    counters: Counters
    transport: Any

    def connectionMade(self) -> None:
        self.buf = bytearray()
        self.handshaken = False
        self.counters.connections += 1

    def dataReceived(self, data: bytes) -> None:
        # Fast path: exactly one whole frame, nothing buffered.
        if (
            self.handshaken
            and not self.buf
            and len(data) >= 12
            and len(data) == 12 + int.from_bytes(data[4:8], "big")
        ):
            self._frame(data)
            return
        buf = self.buf
        buf += data
        while buf:
            if not self.handshaken:
                if len(buf) < _HANDSHAKE_SIZE:
                    return
                del buf[:_HANDSHAKE_SIZE]
                self.handshaken = True
                self.transport.write(b"\x01")
                continue
            if buf[0] == 0xFF:  # keep-alive
                del buf[0]
                continue
            if len(buf) < 12:
                return
            size = 12 + int.from_bytes(buf[4:8], "big")
            if len(buf) < size:
                return
            frame = bytes(buf[:size])
            del buf[:size]
            self._frame(frame)

    def _frame(self, frame: bytes) -> None:
        if frame[8] in (0x0C, 0x0D, 0x0E):  # command responses get no ACK
            return
        count = frame[9]
        counters = self.counters
        counters.packets += 1
        counters.records += count
        write_now(self.transport, _ACKS[count])


class UdpSink(protocol.DatagramProtocol):
    transport: Any

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if len(datagram) < 11:
            return
        imei_len = int.from_bytes(datagram[6:8], "big")
        at = 8 + imei_len + 1  # number of data 1
        if len(datagram) <= at:
            return
        count = datagram[at]
        self.counters.datagrams += 1
        self.counters.packets += 1
        self.counters.records += count
        ack = b"\x00\x05" + datagram[2:4] + b"\x01" + datagram[5:6] + bytes((count,))
        self.transport.write(ack, addr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sink", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port)")
    parser.add_argument("--udp-port", type=int, default=None, help="also answer UDP here")
    parser.add_argument(
        "--max-time", type=float, default=600.0, help="stop after this many seconds (600)"
    )
    args = parser.parse_args(argv)

    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    counters = Counters()
    factory: Any = protocol.Factory()
    factory.protocol = SinkProtocol
    factory.noisy = False
    SinkProtocol.counters = counters
    tcp = reactor.listenTCP(args.port, factory, backlog=4096, interface=args.host)
    line = f"listening tcp {tcp.getHost().port}"
    if args.udp_port is not None:
        udp = reactor.listenUDP(args.udp_port, UdpSink(counters), interface=args.host)
        line += f" udp {udp.getHost().port}"
    print(line, flush=True)
    reactor.callLater(args.max_time, reactor.stop)
    reactor.run()
    print(json.dumps(counters.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
