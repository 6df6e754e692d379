"""``teltonika-ingest decode HEX... | -``: decode frames, datagrams and handshakes."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from teltonika_ingest.cli import scan as scanning
from teltonika_ingest.cli.render import Renderer
from teltonika_ingest.codec import (
    AvlFrame,
    AvlRecord,
    CodecError,
    CommandFrame,
    CommandMessage,
    FrameError,
    Framer,
    Handshake,
    Truncated,
    decode_imei,
    decode_udp_datagram,
    format_timestamp,
    unwrap_frame,
)

_SEPARATORS = re.compile(r"[\s:,]+")

DESCRIPTION = """\
Each argument (or, for -, each non-blank line of standard input) is one input in hex;
whitespace, colons, commas and 0x prefixes are ignored. What an input is:

  starts with 00000000   a TCP stream of frames (keep-alive FF bytes allowed)
  starts with 000F       an IMEI handshake, optionally followed by frames
  anything else          one UDP datagram (every input, with --udp)

Output, one JSON object per line on stdout: each AVL record in the telemetry payload
shape (device_id from the datagram, the handshake or --imei, else null; received_at =
now), {"imei": ...} for a handshake, and {"codec", "type", "text", "hex", "b64", "imei",
"timestamp"} for a Codec 12/13/14 message ("text" only when the payload is printable
ASCII, else null; "hex" and "b64" always, so binary answers are never lost). Bad input:
one line "error: ..." on stderr naming the field and offset, and exit status 1.

--names adds to each record the "io" object of the stream's --io-names: named, scaled
values with units, for --model (case-insensitive, e.g. FMB920); without a model, or with
one the catalogue does not know, only the ids common to all families are named. Ids not
named stay raw in "attributes". --format table prints the same for a terminal.

--scan FILE (or - for stdin) finds frames, handshakes and UDP datagrams inside arbitrary
log lines (timestamps, prefixes, spaces or colons between bytes, several per line) and
decodes each; every object gains "found": {"line", "column", "kind"}.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "decode",
        help="decode TCP frames, UDP datagrams or IMEI handshakes given in hex",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="*", metavar="HEX", help="hex of one input, or - to read hex lines"
    )
    parser.add_argument(
        "--scan",
        metavar="FILE",
        help="find and decode every frame/handshake/datagram in a log file (- for stdin)",
    )
    parser.add_argument(
        "--names", action="store_true", help="add named, scaled IO values (the io object)"
    )
    parser.add_argument("--model", help="device model for --names (e.g. FMB920)")
    parser.add_argument(
        "--format",
        choices=("json", "table"),
        default="json",
        help="json: one object per line (default); table: readable, for a terminal",
    )
    parser.add_argument("--udp", action="store_true", help="treat every input as a UDP datagram")
    parser.add_argument("--imei", help="device_id for records whose input carries no IMEI")
    parser.add_argument(
        "--max-frame-size",
        type=int,
        default=65536,
        metavar="BYTES",
        help="largest data field length accepted, as the service's (default: %(default)s)",
    )
    parser.set_defaults(handler=run)


class BadInput(Exception):
    """One input could not be decoded; the message is the stderr line (without 'error: ')."""


def parse_hex(text: str) -> bytes:
    """Hex digits with optional whitespace, colons, commas and ``0x`` prefixes -> bytes."""
    tokens = [t for t in _SEPARATORS.split(text.strip()) if t]
    digits = "".join(t[2:] if t[:2] in ("0x", "0X") else t for t in tokens)
    if not digits:
        raise BadInput("bad hex: no hex digits")
    bad = re.search(r"[^0-9a-fA-F]", digits)
    if bad:
        raise BadInput(f"bad hex: {bad.group()!r} is not a hex digit")
    if len(digits) % 2:
        raise BadInput(f"bad hex: odd number of hex digits ({len(digits)})")
    return bytes.fromhex(digits)


def _inputs(values: list[str], stdin: TextIO) -> Iterator[str]:
    for value in values:
        if value == "-":
            for line in stdin:
                if line.strip():
                    yield line
        else:
            yield value


class _Decoder:
    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self.imei: str | None = args.imei
        self.udp: bool = args.udp
        self.max_frame_size: int = args.max_frame_size
        self.render = Renderer(
            out,
            table=args.format == "table",
            names=args.names,
            model=args.model,
            received_at=format_timestamp(time.time_ns() // 1_000_000),
        )

    def records(self, records: tuple[AvlRecord, ...], imei: str | None, codec: str) -> None:
        for record in records:
            self.render.record(record, imei, codec)

    def command(self, message: CommandMessage) -> None:
        self.render.command(message)

    def handshake(self, imei: str) -> None:
        self.render.handshake(imei)

    def decode(self, data: bytes) -> None:
        if not self.udp and data[:4] == b"\x00\x00\x00\x00":
            self.stream(data, expect_handshake=False)
        elif not self.udp and data[:2] == b"\x00\x0f":
            self.stream(data, expect_handshake=True)
        else:
            try:
                datagram = decode_udp_datagram(data)
            except CodecError as exc:
                raise BadInput(f"UDP datagram: {exc}") from None
            self.records(datagram.packet.records, datagram.imei, datagram.packet.codec)

    def stream(self, data: bytes, expect_handshake: bool) -> None:
        framer = Framer(max_frame_size=self.max_frame_size, expect_handshake=expect_handshake)
        framer.feed(data)
        imei = self.imei
        frames = 0
        in_handshake = expect_handshake
        while True:
            where = "handshake" if in_handshake else f"frame {frames + 1}"
            event = framer.next_event()
            if event is None:
                break
            if isinstance(event, FrameError):
                raise BadInput(f"{where}: {event.error}")
            if isinstance(event, Handshake):
                in_handshake = False
                imei = event.imei
                self.handshake(event.imei)
                continue
            if isinstance(event, AvlFrame | CommandFrame):
                frames += 1
            if isinstance(event, AvlFrame):
                self.records(event.packet.records, imei, event.packet.codec)
            elif isinstance(event, CommandFrame):
                self.command(event.message)
        if framer.buffered:
            rest = data[len(data) - framer.buffered :]
            try:
                if in_handshake:
                    decode_imei(rest)
                else:
                    unwrap_frame(rest)
            except CodecError as exc:
                raise BadInput(f"{where}: {exc}") from None
            raise BadInput(  # pragma: no cover - the framer holds only incomplete items
                f"{where}: {Truncated('input ends inside an item', offset=len(rest))}"
            )


def run(
    args: argparse.Namespace,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    if args.model and not args.names:
        args.names = True
    decoder = _Decoder(args, stdout)
    warning = decoder.render.model_warning()
    if warning:
        stderr.write(f"warning: {warning}\n")
    if args.scan is not None:
        if args.inputs:
            stderr.write("error: --scan reads a file (or -), not HEX arguments\n")
            return 1
        return _scan(args, decoder, stdin, stdout, stderr)
    items = list(_inputs(args.inputs, stdin))
    if not items:
        stderr.write("error: no input\n")
        return 1
    status = 0
    for number, text in enumerate(items, 1):
        label = f"input {number}: " if len(items) > 1 else ""
        try:
            decoder.decode(parse_hex(text))
        except BadInput as exc:
            stdout.flush()
            stderr.write(f"error: {label}{exc}\n")
            status = 1
    stdout.flush()
    return status


def _scan(
    args: argparse.Namespace, decoder: _Decoder, stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> int:
    try:
        source: TextIO = (
            stdin if args.scan == "-" else open(args.scan, encoding="utf-8", errors="replace")  # noqa: SIM115
        )
    except OSError as exc:
        stderr.write(f"error: {args.scan}: {exc.strerror}\n")
        return 1
    found = 0
    status = 0
    with source:
        for number, line in enumerate(source, 1):
            imei = decoder.imei
            for item in scanning.find(line, max_frame_size=decoder.max_frame_size):
                found += 1
                where = f"line {number}, column {item.column}: {item.kind}"
                decoder.render.found = {"line": number, "column": item.column, "kind": item.kind}
                try:
                    if item.kind == "handshake":
                        imei = decode_imei(item.data)
                        decoder.handshake(imei)
                    elif item.kind == "udp":
                        datagram = decode_udp_datagram(item.data)
                        decoder.records(
                            datagram.packet.records, datagram.imei, datagram.packet.codec
                        )
                    else:
                        event = scanning.decode_frame(item.data)
                        if isinstance(event, FrameError):
                            raise event.error
                        if isinstance(event, AvlFrame):
                            decoder.records(event.packet.records, imei, event.packet.codec)
                        elif isinstance(event, CommandFrame):
                            decoder.command(event.message)
                except CodecError as exc:
                    stdout.flush()
                    stderr.write(f"error: {where}: {exc}\n")
                    status = 1
    decoder.render.found = None
    stdout.flush()
    if not found:
        stderr.write("error: no Teltonika frame, handshake or datagram found\n")
        return 1
    return status
