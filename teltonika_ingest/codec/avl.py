"""Codec 8, 8 Extended and 16 AVL data: decode and encode (protocol.md §2-3).

Speed matters here (every record of every device goes through
:func:`decode_avl_data`), so the decoder avoids per-IO Python work. Generic path:
one cached :class:`struct.Struct` reads a whole IO group *and* the count of the
next group, and ``dict(zip(it, it))`` pairs ids with values in C. Fast path, for
the record layouts a device repeats: a decoder compiled per layout reads a whole
record with one Struct (see "compiled layouts" below). Records are built without
attrs' frozen ``__init__`` (see :func:`_slot_setters`).

Strictness (every rule below turns a frame into a dead letter, never a crash):

* number of data 1 == number of data 2, and the records end exactly at number of
  data 2 (no gap, no overrun, no trailing bytes);
* the total IO count equals the sum of the group counts. The vendor documents
  N = N1 + N2 + N4 + N8 (+ NX for 8E) and every device capture we could find
  (vendor examples, public decoder issue threads with FMB/FMC packets) agrees,
  so a mismatch is a damaged or foreign frame, not a device quirk;
* an IO id appears at most once per group (a group is a dict: a repeated id
  could not be represented, and re-encoding would not give the frame back). The
  same id in two groups (never seen from a device) is kept apart in the record and
  re-encodes exactly; the JSON payload, which maps id -> value, shows the wider
  group's value. Checking that too would cost ~10% of the decode time;
* timestamps must be formattable as ISO 8601 with a 4-digit year
  (< 253402300800000 ms, i.e. before year 10000).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from .model import (
    CODEC_8,
    CODEC_8E,
    CODEC_16,
    CODEC_ID_OF,
    AvlPacket,
    AvlRecord,
    CountMismatch,
    Malformed,
    UnknownCodec,
)
from .tcpframe import HEADER_SIZE, unwrap_frame, wrap_frame

__all__ = [
    "MAX_TIMESTAMP_MS",
    "ack_bytes",
    "decode_avl_data",
    "decode_avl_frame",
    "encode_avl_data",
    "encode_avl_frame",
]

#: 10000-01-01T00:00:00Z in ms: the first instant without a 4-digit ISO 8601 year.
MAX_TIMESTAMP_MS = 253402300800000

_VALUE_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}
_WIDTHS = (1, 2, 4, 8)
_ACK = struct.Struct(">I")
_NX_HEADER = struct.Struct(">HH")
# Group structs are cached per count up to this size; bigger counts (only seen in
# hostile input) get a one-off Struct so the cache cannot be grown without bound.
_CACHE_MAX_COUNT = 255


class _Layout:
    """Field sizes of one AVL codec."""

    __slots__ = (
        "codec",
        "codec_id",
        "count_fmt",
        "count_size",
        "enc_groups",
        "enc_head",
        "groups",
        "has_gen",
        "has_nx",
        "id_fmt",
        "id_size",
        "last_compiled",
        "max_count",
        "max_id",
        "n1_at",
        "prefix",
    )

    def __init__(self, codec: str, id_fmt: str, count_fmt: str, has_gen: bool, has_nx: bool):
        self.codec = codec
        self.codec_id = CODEC_ID_OF[codec]
        self.id_fmt = id_fmt
        self.count_fmt = count_fmt
        self.id_size = struct.calcsize(">" + id_fmt)
        self.count_size = struct.calcsize(">" + count_fmt)
        self.max_id = (1 << (8 * self.id_size)) - 1
        self.max_count = (1 << (8 * self.count_size)) - 1
        self.has_gen = has_gen
        self.has_nx = has_nx
        # Decoder: the 24-byte common prefix, event IO id, [generation type],
        # total IO count and N1, all in one unpack.
        gen = "B" if has_gen else ""
        self.prefix = struct.Struct(f">QBiihHBH{id_fmt}{gen}{count_fmt}{count_fmt}")
        self.n1_at = self.prefix.size - self.count_size  # N1's offset in a record
        # Encoder: the same without N1 (each group packs its own count).
        self.enc_head = struct.Struct(f">QBiihHBH{id_fmt}{gen}{count_fmt}")
        # Decoder group caches: width -> {count: Struct}.
        self.groups: dict[int, dict[int, struct.Struct]] = {w: {} for w in _WIDTHS}
        self.enc_groups: dict[tuple[int, int], struct.Struct] = {}
        # The compiled record decoder this codec used last: the first guess for
        # the first record of the next packet (see _Compiled).
        self.last_compiled: _Compiled | None = None

    def group(self, width: int, count: int, room: int) -> struct.Struct:
        """Struct for ``count`` (id, value) pairs, followed by the next group's count
        (N2 after N1, ..., NX after N8 in Codec 8E; nothing after N8 otherwise).

        Called on a cache miss only. ``room`` is what is left of the data field: a
        count that cannot fit raises struct.error before any Struct is compiled, so
        a hostile count of 65535 costs nothing.
        """
        if count * (self.id_size + width) > room:
            raise struct.error("group does not fit in the data field")
        trailer = self.count_fmt if (width < 8 or self.has_nx) else ""
        compiled = struct.Struct(">" + (self.id_fmt + _VALUE_FMT[width]) * count + trailer)
        if count <= _CACHE_MAX_COUNT:
            self.groups[width][count] = compiled
        return compiled

    def enc_group(self, width: int, count: int) -> struct.Struct:
        key = (width, count)
        compiled = self.enc_groups.get(key)
        if compiled is None:
            compiled = struct.Struct(
                ">" + self.count_fmt + (self.id_fmt + _VALUE_FMT[width]) * count
            )
            if count <= _CACHE_MAX_COUNT:
                self.enc_groups[key] = compiled
        return compiled


_LAYOUTS: dict[int, _Layout] = {
    layout.codec_id: layout
    for layout in (
        _Layout(CODEC_8, "B", "B", has_gen=False, has_nx=False),
        _Layout(CODEC_8E, "H", "H", has_gen=False, has_nx=True),
        _Layout(CODEC_16, "H", "B", has_gen=True, has_nx=False),
    )
}
_LAYOUT_BY_NAME = {layout.codec: layout for layout in _LAYOUTS.values()}


# --------------------------------------------------------------------------- records

_RECORD_FIELDS = (
    "timestamp_ms",
    "priority",
    "longitude",
    "latitude",
    "altitude",
    "angle",
    "satellites",
    "speed",
    "event_io_id",
    "generation_type",
    "io1",
    "io2",
    "io4",
    "io8",
    "iox",
)


def _slot_setters() -> tuple[Callable[[AvlRecord, Any], None], ...] | None:
    """The ``__set__`` of each AvlRecord slot, in field order, or None.

    attrs' frozen ``__init__`` sets each slot through ``object.__setattr__`` by name
    (about 1.8 µs for 15 fields); calling the slot descriptors' ``__set__`` directly
    on ``object.__new__(AvlRecord)`` takes about 0.85 µs, a sixth of the budget of a
    decoded record. The result is an ordinary frozen AvlRecord, equal to one built by
    the constructor (tested). If the model ever stops being a slotted class with
    exactly these fields, the decoder falls back to the constructor.
    """
    fields = tuple(a.name for a in getattr(AvlRecord, "__attrs_attrs__", ()))
    descriptors = [AvlRecord.__dict__.get(name) for name in _RECORD_FIELDS]
    if fields != _RECORD_FIELDS or not all(
        type(d).__name__ == "member_descriptor" for d in descriptors
    ):  # pragma: no cover - guards a future model change
        return None
    return tuple(d.__set__ for d in descriptors)  # type: ignore[union-attr]


_SETTERS = _slot_setters()


def _unused_setter(record: AvlRecord, value: Any) -> None:  # pragma: no cover
    raise AssertionError("fast record construction is off")


_UNUSED_SETTERS = (_unused_setter,) * len(_RECORD_FIELDS)


# --------------------------------------------------------------------------- compiled layouts
#
# A device sends record after record with the same group counts (N1, N2, N4, N8),
# and a fleet has a handful of configurations. For such a layout (codec + the four
# counts, no NX values) a decoder is compiled once: one Struct reads the whole
# record, one itemgetter pulls out the total and the counts so a single tuple
# comparison proves the record has exactly that shape, and a generated function
# builds the AvlRecord with dict displays (presized, no pair tuples: about half the
# cost of dict(zip())). A record that does not match (other counts, NX values, a
# repeated id, a bad timestamp) goes the generic way, so the compiled path can only
# be faster, never different (tested against the generic path).
#
# Compiling costs a fraction of a millisecond, so a layout is compiled only once it
# has been seen _COMPILE_AFTER times, layouts of more than _COMPILE_MAX_IOS
# elements never are, and both caches are bounded.

_COMPILE_AFTER = 3
_COMPILE_MAX_IOS = 128
_CACHE_MAX_LAYOUTS = 256


class _Compiled:
    __slots__ = ("parts",)

    def __init__(
        self,
        record: struct.Struct,
        check: Callable[[tuple[Any, ...]], Any],
        expect: tuple[int, ...],
        build: Callable[[tuple[Any, ...]], AvlRecord | None],
    ) -> None:
        # Unpacked in one go by the decoder loop.
        self.parts = (record.unpack_from, record.size, check, expect, build)


_LayoutKey = tuple[int, int, int, int, int]
_compiled: dict[_LayoutKey, _Compiled] = {}
_sightings: dict[_LayoutKey, int] = {}


def _compiled_for(layout: _Layout, n1: int, n2: int, n4: int, n8: int) -> _Compiled | None:
    """The compiled decoder of this record layout, compiling it on the Nth sighting."""
    key = (layout.codec_id, n1, n2, n4, n8)
    found = _compiled.get(key)
    if found is None:
        seen = _sightings.get(key, 0) + 1
        if seen < _COMPILE_AFTER:
            if len(_sightings) >= _CACHE_MAX_LAYOUTS:
                _sightings.clear()
            _sightings[key] = seen
            return None
        _sightings.pop(key, None)
        if len(_compiled) >= _CACHE_MAX_LAYOUTS:
            _compiled.clear()
        found = _compiled[key] = _compile(layout, (n1, n2, n4, n8))
    layout.last_compiled = found
    return found


def _probe(layout: _Layout, data: bytes, off: int) -> _Compiled | None:
    """The compiled decoder for the group counts of the record at ``off``, if any.

    Reads just the four counts (skipping the groups by arithmetic), so a device
    that alternates between layouts still gets compiled decoding.
    """
    at = off + layout.n1_at
    pair = layout.id_size
    try:
        if layout.count_size == 1:
            n1 = data[at]
            at += 1 + n1 * (pair + 1)
            n2 = data[at]
            at += 1 + n2 * (pair + 2)
            n4 = data[at]
            at += 1 + n4 * (pair + 4)
            n8 = data[at]
        else:
            n1 = data[at] << 8 | data[at + 1]
            at += 2 + n1 * (pair + 1)
            n2 = data[at] << 8 | data[at + 1]
            at += 2 + n2 * (pair + 2)
            n4 = data[at] << 8 | data[at + 1]
            at += 2 + n4 * (pair + 4)
            n8 = data[at] << 8 | data[at + 1]
    except IndexError:
        return None
    return _compiled.get((layout.codec_id, n1, n2, n4, n8))


def _compile(layout: _Layout, counts: tuple[int, int, int, int]) -> _Compiled:
    """Struct, check and builder for one record layout (see the comment above)."""
    fmt = layout.prefix.format  # ... event id, [generation type], total, N1
    prefix_values = len(layout.prefix.unpack_from(bytes(layout.prefix.size)))
    positions = [prefix_values - 2, prefix_values - 1]  # total, N1
    expect = [sum(counts), counts[0]]
    displays = []
    duplicate_checks = []
    at = prefix_values
    for index, (width, count) in enumerate(zip(_WIDTHS, counts, strict=True)):
        fmt += (layout.id_fmt + _VALUE_FMT[width]) * count
        items = [f"v[{at + 2 * i}]: v[{at + 2 * i + 1}]" for i in range(count)]
        at += 2 * count
        displays.append("{" + ", ".join(items) + "}")
        if count > 1:  # a repeated id makes the dict shorter than its count
            duplicate_checks.append(f"len(io{width}) != {count}")
        if width < 8 or layout.has_nx:  # the next count: N2, N4, N8, or NX (must be 0)
            fmt += layout.count_fmt
            positions.append(at)
            expect.append(counts[index + 1] if width < 8 else 0)
            at += 1
    gen = "v[9]" if layout.has_gen else "None"
    lines = [
        "def build(v):",
        *(f"    io{w} = {d}" for w, d in zip(_WIDTHS, displays, strict=True)),
    ]
    if duplicate_checks:
        lines += [f"    if {' or '.join(duplicate_checks)}:", "        return None"]
    if _SETTERS is not None:
        lines += [
            "    r = new(AvlRecord)",
            *(f"    s{i}(r, v[{i}])" for i in range(9)),
            f"    s9(r, {gen})",
            "    s10(r, io1)",
            "    s11(r, io2)",
            "    s12(r, io4)",
            "    s13(r, io8)",
            "    s14(r, {})",
            "    return r",
        ]
    else:  # pragma: no cover - see _slot_setters
        fields = ", ".join(f"v[{i}]" for i in range(9))
        lines.append(f"    return AvlRecord({fields}, {gen}, io1, io2, io4, io8, {{}})")
    namespace: dict[str, Any] = {"new": object.__new__, "AvlRecord": AvlRecord}
    namespace.update({f"s{i}": setter for i, setter in enumerate(_SETTERS or ())})
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<teltonika Codec {layout.codec} layout {counts}>", "exec"), namespace)
    return _Compiled(struct.Struct(fmt), itemgetter(*positions), tuple(expect), namespace["build"])


# --------------------------------------------------------------------------- decode


def decode_avl_data(data: bytes, offset_base: int = 0) -> AvlPacket:
    """Decode a data field: codec id, number of data 1, records, number of data 2.

    ``data`` must be exactly the data field (no preamble, length or CRC; for UDP,
    what follows the IMEI). Raises :class:`UnknownCodec`, :class:`CountMismatch` or
    :class:`Malformed`; error offsets are ``offset_base`` + the offset in ``data``.
    """
    if type(data) is not bytes:
        data = bytes(data)
    size = len(data)
    if size < 3:
        raise Malformed(
            f"data field of {size} bytes; codec id and both record counts need 3",
            field="data",
            offset=offset_base + size,
        )
    codec_id = data[0]
    layout = _LAYOUTS.get(codec_id)
    if layout is None:
        raise UnknownCodec(codec_id, offset=offset_base)
    count = data[1]
    records, end = _decode_records(data, count, layout, offset_base)
    last = size - 1
    if end != last:
        raise Malformed(
            f"{count} records end at offset {offset_base + end} but number of data 2 is at "
            f"offset {offset_base + last}",
            field="number_of_data_2",
            offset=offset_base + min(end, last),
        )
    if data[last] != count:
        raise CountMismatch(count, data[last], offset=offset_base + last)
    return AvlPacket(layout.codec, records)


def _decode_records(
    data: bytes, count: int, layout: _Layout, base: int
) -> tuple[tuple[AvlRecord, ...], int]:
    """Decode ``count`` records starting at offset 2; return them and the end offset.

    Each record first tries the compiled decoder of the previous record's layout
    (see :class:`_Compiled`); when that does not match, the generic path below reads
    it group by group, then looks up the compiled decoder of its layout for the next.
    """
    prefix_unpack = layout.prefix.unpack_from
    prefix_size = layout.prefix.size
    has_gen = layout.has_gen
    has_nx = layout.has_nx
    g1 = layout.groups[1]
    g2 = layout.groups[2]
    g4 = layout.groups[4]
    g8 = layout.groups[8]
    make_group = layout.group
    fast = _SETTERS is not None
    (s_ts, s_pri, s_lon, s_lat, s_alt, s_ang, s_sat, s_spd, s_ev, s_gen, s1, s2, s4, s8, sx) = (
        _SETTERS or _UNUSED_SETTERS
    )
    new = object.__new__
    nx_unpack = _NX_HEADER.unpack_from
    max_ts = MAX_TIMESTAMP_MS
    last = len(data) - 1  # records must end at number of data 2
    compiled_for = _compiled_for
    probe = _probe

    compiled = layout.last_compiled  # guess: the layout this codec saw last
    if compiled is not None:
        c_unpack, c_size, c_check, c_expect, c_build = compiled.parts
    records: list[AvlRecord] = []
    append = records.append
    off = 2
    index = 0
    where = "record"
    try:
        for index in range(count):
            # Compiled path: the previous record's layout, else the compiled layout
            # for this record's counts (probed without decoding), if there is one.
            matched = False
            if compiled is not None and off + c_size <= last:
                v = c_unpack(data, off)
                matched = c_check(v) == c_expect
            if not matched and _compiled:
                found = probe(layout, data, off)
                if found is not None and found is not compiled:
                    compiled = found
                    c_unpack, c_size, c_check, c_expect, c_build = compiled.parts
                    if off + c_size <= last:
                        v = c_unpack(data, off)
                        matched = c_check(v) == c_expect
            if matched and v[0] < max_ts:
                record = c_build(v)
                if record is not None:
                    append(record)
                    off += c_size
                    continue

            start = off
            where = "record"
            if has_gen:
                (ts, pri, lon, lat, alt, ang, sat, spd, ev, gen, total, n1) = prefix_unpack(
                    data, off
                )
            else:
                (ts, pri, lon, lat, alt, ang, sat, spd, ev, total, n1) = prefix_unpack(data, off)
                gen = None
            if ts >= max_ts:
                raise Malformed(
                    f"record {index + 1}: timestamp {ts} ms is past year 9999",
                    field="timestamp",
                    offset=base + off,
                )
            off += prefix_size

            where = "io1"
            st = g1.get(n1) or make_group(1, n1, last - off)
            v = st.unpack_from(data, off)
            off += st.size
            if n1:
                it = iter(v)
                io1 = dict(zip(it, it))  # noqa: B905 - pairs; drops the next count
            else:
                io1 = {}
            n2 = v[-1]

            where = "io2"
            st = g2.get(n2) or make_group(2, n2, last - off)
            v = st.unpack_from(data, off)
            off += st.size
            if n2:
                it = iter(v)
                io2 = dict(zip(it, it))  # noqa: B905 - pairs; drops the next count
            else:
                io2 = {}
            n4 = v[-1]

            where = "io4"
            st = g4.get(n4) or make_group(4, n4, last - off)
            v = st.unpack_from(data, off)
            off += st.size
            if n4:
                it = iter(v)
                io4 = dict(zip(it, it))  # noqa: B905 - pairs; drops the next count
            else:
                io4 = {}
            n8 = v[-1]

            where = "io8"
            st = g8.get(n8) or make_group(8, n8, last - off)
            v = st.unpack_from(data, off)
            off += st.size
            if n8:
                it = iter(v)
                io8 = dict(zip(it, it))  # noqa: B905 - pairs; drops the next count
            else:
                io8 = {}

            iox: dict[int, bytes] = {}
            nx = 0
            if has_nx:
                nx = v[-1]
                where = "iox"
                for _ in range(nx):
                    xid, xlen = nx_unpack(data, off)
                    off += 4
                    xend = off + xlen
                    if xend > last:
                        raise Malformed(
                            f"record {index + 1}: IO {xid} declares {xlen} bytes, past the "
                            "end of the data field",
                            field="iox",
                            offset=base + off - 2,
                        )
                    iox[xid] = data[off:xend]
                    off = xend

            if len(io1) + len(io2) + len(io4) + len(io8) + len(iox) != total:
                _io_count_error(index, start, base, layout, total, (n1, n2, n4, n8, nx))
            if off > last:
                raise Malformed(
                    f"record {index + 1} runs past the end of the data field",
                    field="record",
                    offset=base + start,
                )
            if fast:
                record = new(AvlRecord)
                s_ts(record, ts)
                s_pri(record, pri)
                s_lon(record, lon)
                s_lat(record, lat)
                s_alt(record, alt)
                s_ang(record, ang)
                s_sat(record, sat)
                s_spd(record, spd)
                s_ev(record, ev)
                s_gen(record, gen)
                s1(record, io1)
                s2(record, io2)
                s4(record, io4)
                s8(record, io8)
                sx(record, iox)
            else:  # pragma: no cover - see _slot_setters
                record = AvlRecord(
                    ts, pri, lon, lat, alt, ang, sat, spd, ev, gen, io1, io2, io4, io8, iox
                )
            append(record)

            if not nx and total <= _COMPILE_MAX_IOS:
                compiled = compiled_for(layout, n1, n2, n4, n8)
                if compiled is not None:
                    c_unpack, c_size, c_check, c_expect, c_build = compiled.parts
    except struct.error:
        raise Malformed(
            f"record {index + 1}: {where} runs past the end of the data field",
            field=where,
            offset=base + off,
        ) from None
    return tuple(records), off


def _io_count_error(
    index: int, start: int, base: int, layout: _Layout, total: int, counts: tuple[int, ...]
) -> None:
    """Raise the Malformed that explains why the IO counts do not add up."""
    id_at = base + start + 24
    total_at = id_at + layout.id_size + (1 if layout.has_gen else 0)
    declared = sum(counts)
    if declared != total:
        raise Malformed(
            f"record {index + 1}: total IO count {total} != sum of group counts {declared}",
            field="io_total",
            offset=total_at,
        )
    raise Malformed(
        f"record {index + 1}: an IO id appears twice in one group",
        field="io_id",
        offset=base + start,
    )


def decode_avl_frame(frame: bytes) -> AvlPacket:
    """Decode a whole TCP frame (preamble, length, data field, CRC) of Codec 8/8E/16.

    Raises :class:`Truncated`, :class:`BadPreamble`, :class:`CrcMismatch`,
    :class:`UnknownCodec` (also for command codecs), :class:`CountMismatch`,
    :class:`Malformed`. Offsets are frame offsets.
    """
    return decode_avl_data(unwrap_frame(frame), offset_base=HEADER_SIZE)


# --------------------------------------------------------------------------- encode


def encode_avl_data(packet: AvlPacket) -> bytes:
    """Encode a data field (codec id .. number of data 2). Total IO counts are computed.

    Raises ValueError for what the codec cannot carry: more than 255 records, values
    out of range for their wire type, NX values outside Codec 8E or a Codec 16 record
    without a generation type.
    """
    layout = _LAYOUT_BY_NAME.get(packet.codec)
    if layout is None:
        raise ValueError(f"not an AVL codec: {packet.codec!r}")
    count = len(packet.records)
    if count > 255:
        raise ValueError(f"{count} records: a packet carries at most 255")
    parts = [bytes((layout.codec_id, count))]
    for index, record in enumerate(packet.records):
        try:
            parts.append(_encode_record(record, layout))
        except (struct.error, OverflowError, TypeError) as exc:
            raise ValueError(f"record {index + 1}: {exc}") from exc
    parts.append(bytes((count,)))
    return b"".join(parts)


def _encode_record(record: AvlRecord, layout: _Layout) -> bytes:
    groups: list[tuple[int, dict[int, int]]] = [
        (1, record.io1),
        (2, record.io2),
        (4, record.io4),
        (8, record.io8),
    ]
    if record.iox and not layout.has_nx:
        raise ValueError(f"Codec {layout.codec} has no variable-length (NX) IO elements")
    total = len(record.io1) + len(record.io2) + len(record.io4) + len(record.io8)
    total += len(record.iox)
    if total > layout.max_count:
        raise ValueError(
            f"{total} IO elements: Codec {layout.codec} carries at most {layout.max_count}"
        )
    head: tuple[Any, ...] = (
        record.timestamp_ms,
        record.priority,
        record.longitude,
        record.latitude,
        record.altitude,
        record.angle,
        record.satellites,
        record.speed,
        record.event_io_id,
    )
    if layout.has_gen:
        if record.generation_type is None:
            raise ValueError("a Codec 16 record needs a generation type")
        head += (record.generation_type,)
    parts = [layout.enc_head.pack(*head, total)]
    for width, group in groups:
        flat: list[int] = []
        for io_id, value in group.items():
            flat.append(io_id)
            flat.append(value)
        parts.append(layout.enc_group(width, len(group)).pack(len(group), *flat))
    if layout.has_nx:
        parts.append(struct.pack(">H", len(record.iox)))
        for io_id, raw in record.iox.items():
            parts.append(_NX_HEADER.pack(io_id, len(raw)))
            parts.append(bytes(raw))
    return b"".join(parts)


def encode_avl_frame(packet: AvlPacket) -> bytes:
    """A whole TCP frame (preamble, length, data field, CRC) carrying ``packet``."""
    return wrap_frame(encode_avl_data(packet))


def ack_bytes(count: int) -> bytes:
    """The TCP record ACK: number of accepted records as uint32 big-endian."""
    return _ACK.pack(count)
