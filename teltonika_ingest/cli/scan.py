"""Find Teltonika frames, handshakes and UDP datagrams inside arbitrary log lines.

A log line is searched for runs of hex digits, optionally separated by single spaces,
colons or dashes (``00 00 00 00``, ``00:00:00:00``, one unbroken run, several runs per
line); each run is read at both nibble alignments (a prefix such as ``ts=1a`` may glue an
odd digit to its start) and searched byte by byte for what can be told apart with
certainty, so noise (timestamps, counters) does not produce false finds:

* a TCP frame: preamble ``00000000``, a data length the framer accepts, CRC-16 valid;
* a handshake: ``000F`` then 15 ASCII digits;
* a UDP datagram: length, packet id, ``01``, AVL packet id, ``000F`` + 15 ASCII digits,
  the whole datagram inside the run (it has no CRC: the decoder then decides).

Items do not overlap: after a find the search continues past it. ``column`` is the
1-based character position of the item's first hex digit in the line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import attrs

from teltonika_ingest.codec import FramerEvent, crc16_ibm
from teltonika_ingest.codec.framing import Framer

__all__ = ["Found", "decode_frame", "find"]

_RUN = re.compile(r"[0-9A-Fa-f]+(?:[ :\-][0-9A-Fa-f]+)*")
_MIN_FRAME = 8 + 3 + 4  # preamble + length, codec id .. quantity 2, CRC


@attrs.frozen(slots=True)
class Found:
    kind: str  # frame | handshake | udp
    column: int
    data: bytes


def _digits(line: str) -> Iterator[tuple[str, list[int]]]:
    for match in _RUN.finditer(line):
        digits = []
        columns = []
        for i, ch in enumerate(match.group(), match.start()):
            if ch not in " :-":
                digits.append(ch)
                columns.append(i + 1)
        if len(digits) >= 8:
            yield "".join(digits), columns


def _is_imei(raw: bytes) -> bool:
    return len(raw) == 15 and raw.isdigit()


def _at(buf: bytes, i: int, max_frame_size: int) -> tuple[str, int] | None:
    """(kind, length) of an item starting at ``buf[i]``, or None."""
    rest = len(buf) - i
    if rest >= _MIN_FRAME and buf[i : i + 4] == b"\x00\x00\x00\x00":
        length = int.from_bytes(buf[i + 4 : i + 8], "big")
        end = i + 8 + length + 4
        if 3 <= length <= max_frame_size and end <= len(buf):
            data = buf[i + 8 : i + 8 + length]
            if int.from_bytes(buf[end - 4 : end], "big") == crc16_ibm(data):
                return "frame", end - i
    if rest >= 17 and buf[i : i + 2] == b"\x00\x0f" and _is_imei(buf[i + 2 : i + 17]):
        return "handshake", 17
    if rest >= 25 and buf[i + 4] == 0x01 and buf[i + 6 : i + 8] == b"\x00\x0f":
        length = int.from_bytes(buf[i : i + 2], "big")
        if _is_imei(buf[i + 8 : i + 23]) and 23 <= length + 2 <= rest:
            return "udp", length + 2
    return None


def _find_in(buf: bytes, max_frame_size: int) -> list[tuple[int, str, int]]:
    out = []
    i = 0
    while i < len(buf):
        hit = _at(buf, i, max_frame_size)
        if hit is None:
            i += 1
            continue
        kind, size = hit
        out.append((i, kind, size))
        i += size
    return out


def find(line: str, max_frame_size: int = 65536) -> list[Found]:
    """Every frame, handshake and datagram in ``line``, in order of position."""
    found: list[Found] = []
    for digits, columns in _digits(line):
        best: list[tuple[int, str, int]] = []
        best_shift = 0
        for shift in (0, 1):
            usable = digits[shift:]
            usable = usable[: len(usable) - len(usable) % 2]
            hits = _find_in(bytes.fromhex(usable), max_frame_size)
            if sum(h[2] for h in hits) > sum(h[2] for h in best):
                best, best_shift = hits, shift
        buf = bytes.fromhex(
            digits[best_shift:][: len(digits) - best_shift - (len(digits) - best_shift) % 2]
        )
        for offset, kind, size in best:
            column = columns[best_shift + 2 * offset]
            found.append(Found(kind, column, buf[offset : offset + size]))
    return found


def decode_frame(frame: bytes) -> FramerEvent | None:
    """The framer's event for one whole frame (AvlFrame, CommandFrame or FrameError)."""
    framer = Framer(max_frame_size=max(len(frame), 16), expect_handshake=False)
    framer.feed(frame)
    return framer.next_event()
