"""Replay of captured frames: parse hex dumps, play them as one device, report each answer."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet import defer, protocol
from twisted.python.failure import Failure

from teltonika_ingest.codec import (
    CODEC_IDS,
    CodecError,
    crc16_ibm,
    decode_command_frame,
    decode_udp_datagram,
    encode_imei,
)
from teltonika_ingest.sim.devices import answer_command, default_answer
from teltonika_ingest.sim.traffic import AVL_CODEC_IDS, COMMAND_CODEC_IDS, UDP_ACK, ZERO4

# --------------------------------------------------------------------------- replay

_HEX_RUN = re.compile(r"^(?:0x)?[0-9a-fA-F]+$")
_SEPARATORS = re.compile(r"[\s:,]+")


@attrs.frozen
class ReplayItem:
    """One line of a replay file: the bytes to send and what the server should answer.

    ``expects``: ``("handshake",)`` one byte; ``("ack", n)`` a 4-byte ACK of n;
    ``("udp_ack", avl_packet_id, n)``; ``("any",)`` whatever comes (or a close).
    """

    line: int
    data: bytes
    what: str
    expects: tuple[tuple[Any, ...], ...]


def _line_bytes(line: str) -> tuple[bytes | None, str]:
    """(bytes, "") for a hex line; (None, reason) for a line to skip; raises ValueError."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None, "blank"
    tokens = [t for t in _SEPARATORS.split(text) if t]
    if all(_HEX_RUN.match(t) for t in tokens):
        digits = "".join(t[2:] if t[:2].lower() == "0x" else t for t in tokens)
    else:
        # Log line: text (time, level, peer ...) then the hex as the last word.
        head, _, last = text.rpartition(" ")
        if not _HEX_RUN.match(last):
            raise ValueError("no hex frame at the end of the line")
        if ">" in head and "<" not in head:
            return None, "server output"  # Traccar style: "teltonika > peer" = sent by server
        digits = last[2:] if last[:2].lower() == "0x" else last
    if len(digits) % 2:
        raise ValueError(f"odd number of hex digits ({len(digits)})")
    return bytes.fromhex(digits), ""


def _describe_frames(data: bytes) -> tuple[str, list[tuple[Any, ...]]]:
    """Walk TCP frames in ``data``: a description and the answers the server owes."""
    parts: list[str] = []
    expects: list[tuple[Any, ...]] = []
    pos = 0
    size = len(data)
    while pos < size:
        if data[pos] == 0xFF:
            parts.append("keep-alive")
            pos += 1
            continue
        if size - pos < 12 or data[pos : pos + 4] != ZERO4:
            parts.append(f"{size - pos} bytes that are not a frame")
            expects.append(("any",))
            break
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        end = pos + 12 + length
        if length < 3 or end > size:
            parts.append(f"truncated frame (declares {length} data bytes)")
            expects.append(("any",))
            break
        body = data[pos + 8 : end - 4]
        codec_id = body[0]
        name = CODEC_IDS.get(codec_id, f"0x{codec_id:02x}")
        crc_ok = int.from_bytes(data[end - 4 : end], "big") == crc16_ibm(body)
        if not crc_ok:
            parts.append(f"Codec {name} frame with a bad CRC")
            expects.append(("any",))
        elif codec_id in AVL_CODEC_IDS:
            parts.append(f"Codec {name}, {body[1]} records")
            expects.append(("ack", body[1]))
        elif codec_id in COMMAND_CODEC_IDS:
            parts.append(f"Codec {name} message")
        else:
            parts.append(f"unknown codec {name}")
            expects.append(("any",))
        pos = end
    return ", ".join(parts), expects


def parse_replay(text: str, *, udp: bool = False) -> list[ReplayItem]:
    """Parse a replay file: one hex input per line (see ``simulate --help``).

    TCP: an IMEI handshake (``000F`` + 15 digits, optionally followed by frames), or
    one or more frames, or anything else (sent as is). UDP: one datagram per line.
    Raises ValueError naming the line for a line that holds no hex.
    """
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            data, _skip = _line_bytes(line)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        if data is None:
            continue
        if udp:
            try:
                pkt = decode_udp_datagram(data)
                what = f"UDP Codec {pkt.packet.codec}, {len(pkt.packet.records)} records"
                expects: list[tuple[Any, ...]] = [
                    ("udp_ack", pkt.avl_packet_id, len(pkt.packet.records))
                ]
            except CodecError as exc:
                what = f"undecodable datagram ({exc})"
                expects = [("any",)]
            items.append(ReplayItem(number, data, what, tuple(expects)))
            continue
        if data[:2] == b"\x00\x0f" and len(data) >= 17 and data[2:17].isdigit():
            rest_what, rest = _describe_frames(data[17:]) if len(data) > 17 else ("", [])
            what = f"IMEI handshake {data[2:17].decode()}" + (f", {rest_what}" if rest else "")
            items.append(ReplayItem(number, data, what, (("handshake",), *rest)))
            continue
        what, expects = _describe_frames(data)
        items.append(ReplayItem(number, data, what, tuple(expects)))
    return items


class _ReplayProtocol(protocol.Protocol):
    transport: Any

    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed = False
        self.close_reason = ""
        self._waiter: defer.Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        self.close_reason = reason.getErrorMessage()
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    def changed(self, timeout: float, clock: Any) -> defer.Deferred[None]:
        """Fires when bytes arrive, the connection closes or ``timeout`` passes."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiter = waiter
        call = clock.callLater(timeout, self._wake)
        waiter.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return waiter


class _UdpReplayProtocol(protocol.DatagramProtocol):
    transport: Any

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self._waiter: defer.Deferred[None] | None = None
        self.closed = False
        self.close_reason = ""

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.datagrams.append(datagram)
        self._wake()

    def connectionRefused(self) -> None:
        self.datagrams.append(b"")  # ICMP port unreachable
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    def changed(self, timeout: float, clock: Any) -> defer.Deferred[None]:
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiter = waiter
        call = clock.callLater(timeout, self._wake)
        waiter.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return waiter


async def replay(
    items: Iterable[ReplayItem],
    *,
    host: str,
    port: int,
    imei: str,
    udp: bool = False,
    ack_timeout: float = 10.0,
    answer_commands: bool = False,
    interval: float = 0.0,
    reactor: Any = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Play ``items`` as one device; return ``{"ok", "results", ...}``.

    TCP: connect; send the handshake for ``imei`` unless the first item is one; then
    each item in turn, waiting for what the server owes (``ReplayItem.expects``). Codec
    12/14 commands the server sends meanwhile are reported (and answered with
    ``answer_commands``). Stops at the first close by the server. ``report`` gets each
    result as it happens.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    items = list(items)
    results: list[dict[str, Any]] = []

    def emit(result: dict[str, Any]) -> None:
        results.append(result)
        if report is not None:
            report(result)

    if udp:
        return await _replay_udp(items, host, port, ack_timeout, interval, reactor, emit, results)

    from twisted.internet.endpoints import TCP4ClientEndpoint

    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=ack_timeout)
    factory = protocol.Factory.forProtocol(_ReplayProtocol)
    connected: Any = await endpoint.connect(factory)
    proto: _ReplayProtocol = connected
    if not items or "handshake" not in [e[0] for e in items[0].expects]:
        handshake = ReplayItem(0, encode_imei(imei), f"IMEI handshake {imei}", (("handshake",),))
        items.insert(0, handshake)
    commands: list[str] = []

    def take_commands() -> None:
        # Server -> device command frames at the head of the buffer.
        buf = proto.buf
        while len(buf) >= 12 and buf[:4] == ZERO4 and buf[8] in COMMAND_CODEC_IDS:
            size = 12 + int.from_bytes(buf[4:8], "big")
            if len(buf) < size:
                return
            frame = bytes(buf[:size])
            del buf[:size]
            try:
                message = decode_command_frame(frame)
            except CodecError as exc:
                emit({"line": None, "event": "server_frame", "got": f"bad command frame: {exc}"})
                continue
            commands.append(message.text)
            event: dict[str, Any] = {
                "line": None,
                "event": "command",
                "got": f"Codec {message.codec} command {message.text!r}",
            }
            if answer_commands:
                reply = answer_command(message, imei, default_answer)
                if reply is not None and proto.transport is not None:
                    proto.transport.write(reply)
                    event["answered"] = True
            emit(event)

    async def read(n: int, deadline: float) -> bytes | None:
        ambiguous_since: float | None = None
        while True:
            take_commands()
            buf = proto.buf
            # 00000000 could be a zero ACK or the start of a command frame: look further.
            ambiguous = n == 4 and buf[:4] == ZERO4 and len(buf) < 9
            now = reactor.seconds()
            if ambiguous:
                ambiguous_since = now if ambiguous_since is None else ambiguous_since
                if now - ambiguous_since >= 0.25 or proto.closed:
                    ambiguous = False
            if len(buf) >= n and not ambiguous:
                chunk = bytes(buf[:n])
                del buf[:n]
                return chunk
            if proto.closed or now >= deadline:
                return None
            wait = deadline - now if ambiguous_since is None else 0.05
            await proto.changed(wait, reactor)

    closed = False
    for position, item in enumerate(items):
        if closed or proto.closed:
            emit({"line": item.line, "what": item.what, "sent": False, "ok": False,
                  "got": "not sent: connection closed"})  # fmt: skip
            closed = True
            continue
        if position and interval > 0:
            await proto.changed(interval, reactor)
        started = time.perf_counter()
        assert proto.transport is not None
        proto.transport.write(item.data)
        outcomes: list[str] = []
        ok = True
        for expect in item.expects:
            deadline = reactor.seconds() + ack_timeout
            kind = expect[0]
            if kind == "handshake":
                got = await read(1, deadline)
                if got is None:
                    outcomes.append("no handshake reply" + _closed_note(proto))
                    ok = False
                elif got == b"\x01":
                    outcomes.append("accepted (01)")
                else:
                    outcomes.append(f"rejected ({got.hex()})")
                    ok = False
            elif kind == "ack":
                got = await read(4, deadline)
                if got is None:
                    outcomes.append("no ACK" + _closed_note(proto))
                    ok = False
                else:
                    count = int.from_bytes(got, "big")
                    outcomes.append(f"ACK {count}")
                    if count != expect[1]:
                        outcomes[-1] += f" (expected {expect[1]})"
                        ok = False
            else:  # "any": whatever the server does
                while not proto.buf and not proto.closed and reactor.seconds() < deadline:
                    await proto.changed(deadline - reactor.seconds(), reactor)
                take_commands()
                if proto.buf:
                    outcomes.append(f"server sent {bytes(proto.buf).hex()}")
                    proto.buf.clear()
                elif proto.closed:
                    outcomes.append("server closed the connection")
                else:
                    outcomes.append(f"no answer in {ack_timeout:g} s")
        if not item.expects:
            outcomes.append("nothing expected")
        elapsed_ms = (time.perf_counter() - started) * 1000
        emit({"line": item.line, "what": item.what, "sent": True, "ok": ok,
              "got": "; ".join(outcomes), "ms": round(elapsed_ms, 3)})  # fmt: skip
        if proto.closed:
            closed = True
    take_commands()
    closed_by_server = proto.closed
    if not proto.closed and proto.transport is not None:
        proto.transport.loseConnection()
    frames = [r for r in results if r.get("line") is not None]
    return {
        "mode": "replay",
        "imei": imei,
        "items": len(frames),
        "ok": all(r["ok"] for r in frames),
        "closed_by_server": closed_by_server,
        "close_reason": proto.close_reason if closed_by_server else "",
        "commands": commands,
        "results": results,
    }


def _closed_note(proto: Any) -> str:
    return " (server closed the connection)" if proto.closed else ""


async def _replay_udp(
    items: list[ReplayItem],
    host: str,
    port: int,
    ack_timeout: float,
    interval: float,
    reactor: Any,
    emit: Callable[[dict[str, Any]], None],
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    proto = _UdpReplayProtocol()
    listening = reactor.listenUDP(0, proto)
    proto.transport.connect(socket.gethostbyname(host), port)
    try:
        for position, item in enumerate(items):
            if position and interval > 0:
                await proto.changed(interval, reactor)
            proto.datagrams.clear()
            started = time.perf_counter()
            proto.transport.write(item.data)
            deadline = reactor.seconds() + ack_timeout
            while not proto.datagrams and reactor.seconds() < deadline:
                await proto.changed(deadline - reactor.seconds(), reactor)
            ok = True
            expect = item.expects[0]
            if not proto.datagrams:
                got = f"no answer in {ack_timeout:g} s"
                ok = expect[0] == "any"
            elif proto.datagrams[0] == b"":
                got = "port unreachable"
                ok = False
            else:
                answer = proto.datagrams[0]
                got = f"server sent {answer.hex()}"
                if expect[0] == "udp_ack":
                    if len(answer) == 7:
                        _l, _pid, _one, avl_id, count = UDP_ACK.unpack(answer)
                        got = f"UDP ACK {count} for AVL packet {avl_id}"
                        ok = avl_id == expect[1] and count == expect[2]
                    else:
                        ok = False
            emit({"line": item.line, "what": item.what, "sent": True, "ok": ok, "got": got,
                  "ms": round((time.perf_counter() - started) * 1000, 3)})  # fmt: skip
    finally:
        listening.stopListening()
    return {
        "mode": "replay-udp",
        "items": len(results),
        "ok": all(r["ok"] for r in results),
        "closed_by_server": False,
        "close_reason": "",
        "commands": [],
        "results": results,
    }
