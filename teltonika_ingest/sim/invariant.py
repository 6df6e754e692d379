"""The reliability invariant: every record a device got an ACK for is in the stream.

Given a log of ACKed records (what devices were told is stored) and the telemetry stream
(what is stored), report

* **missing**: ACKed (IMEI, timestamp) pairs with no entry in the stream. Must be 0: an ACK
  is a promise that the record is in Redis.
* **duplicates**: stream entries beyond the first for the same (IMEI, timestamp). Allowed
  (a device resends a packet whose ACK it did not get; consumers deduplicate on
  ``device_id`` + ``timestamp``, contract.md §3), counted.
* **extra**: stream entries of logged IMEIs that were never ACKed (published, then the ACK was
  lost: the connection closed, the device gave up waiting). Allowed, counted.

ACK log format (one record or one packet per line; UTF-8; blank lines and lines starting
with ``#`` are ignored), either of:

* JSON lines: ``{"imei": "356307042441013", "ts": 1700000000000}``. ``ts`` is the record's
  timestamp as integer milliseconds since the epoch or as ISO 8601 UTC text
  (``"2023-11-14T22:13:20.000Z"``), or a list of those (all records of one ACKed packet).
  Optional ``"at"``: when the ACK was received (ms or ISO), used by ``since`` filtering.
  Other keys are ignored.
* CSV: ``imei,ts[,ts...]`` with the same ``ts`` forms (a header line ``imei,ts`` is skipped).

The stream is read with ``XRANGE key start + COUNT n`` in batches through a small blocking
client (hiredis parses the replies), so it runs anywhere Python and the package run, against
a live Redis, without disturbing it more than any reader. Only the ``imei`` and ``ts`` fields
of each entry are used (``payload``'s ``device_id``/``timestamp`` if those fields are absent).

If the stream was trimmed (``MAXLEN ~``) or entries were deleted, an ACKed record can be gone
for that reason: the report gives ``trimmed`` (entries added minus entries present, from
``XINFO STREAM``) so that a non-zero ``missing`` is never silently blamed on the wrong cause.

Memory: 8 bytes per ACKed record and per stream entry (per-IMEI ``array('q')``), so tens of
millions of records fit in a few hundred MB.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import socket
import sys
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from teltonika_ingest.redis.client import RedisTargetLike
from teltonika_ingest.redis.resp import encode_command

__all__ = [
    "AckLog",
    "AckLogWriter",
    "Report",
    "StreamIndex",
    "SyncRedis",
    "SyncRedisError",
    "compare",
    "iso_to_ms",
    "ms_to_iso",
    "parse_ts",
    "read_ack_log",
    "read_stream",
    "verify",
]

DEFAULT_STREAM = "telemetry:teltonika"
DEFAULT_BATCH = 10_000
_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()


# --------------------------------------------------------------------------- timestamps


@functools.lru_cache(maxsize=8192)
def _epoch_days(date_text: str) -> int:
    return _dt.date.fromisoformat(date_text).toordinal() - _EPOCH_ORDINAL


def iso_to_ms(text: str) -> int:
    """``2023-11-14T22:13:20.000Z`` (or any ISO 8601 with an offset) -> ms since the epoch."""
    if (
        len(text) == 24
        and text[10] == "T"
        and text[19] == "."
        and text[23] == "Z"
        and text[13] == ":"
        and text[16] == ":"
    ):
        # the service's own format (codec.format_timestamp): fast path
        seconds = int(text[11:13]) * 3600 + int(text[14:16]) * 60 + int(text[17:19])
        return (_epoch_days(text[:10]) * 86400 + seconds) * 1000 + int(text[20:23])
    when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    delta = when - _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


def ms_to_iso(ms: int) -> str:
    """The service's timestamp format (contract.md §3) for ``ms`` since the epoch."""
    from teltonika_ingest.codec import format_timestamp

    return format_timestamp(ms)


def parse_ts(value: Any) -> int:
    """A timestamp from an ACK log: int ms, digits, or ISO 8601 text."""
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        return iso_to_ms(text)
    raise ValueError(f"not a timestamp: {value!r}")


# --------------------------------------------------------------------------- the ACK log


class AckLog:
    """ACKed records: per IMEI an array of record timestamps (ms), repeats kept."""

    def __init__(self) -> None:
        self.by_imei: dict[str, array[int]] = {}
        self.lines = 0
        self.skipped = 0  # lines filtered out by ``since``

    def add(self, imei: str, ts: int | Iterable[int]) -> None:
        arr = self.by_imei.get(imei)
        if arr is None:
            arr = self.by_imei[imei] = array("q")
        if isinstance(ts, int):
            arr.append(ts)
        else:
            arr.extend(ts)

    @property
    def records(self) -> int:
        return sum(len(a) for a in self.by_imei.values())

    def keys(self) -> set[tuple[str, int]]:
        """Every (imei, ts) (for small logs and tests)."""
        return {(imei, ts) for imei, arr in self.by_imei.items() for ts in arr}


def _parse_line(line: str, where: str) -> tuple[str, list[int], int | None] | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    try:
        if text.startswith("{"):
            obj = json.loads(text)
            imei = str(obj["imei"])
            raw = obj["ts"]
            values = raw if isinstance(raw, list) else [raw]
            at = obj.get("at")
            return imei, [parse_ts(v) for v in values], None if at is None else parse_ts(at)
        parts = [p.strip() for p in text.split(",")]
        if parts[:2] == ["imei", "ts"]:
            return None  # CSV header
        if len(parts) < 2:
            raise ValueError("expected imei,ts")
        return parts[0], [parse_ts(p) for p in parts[1:] if p], None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: bad ACK log line {text[:80]!r}: {e}") from None


def read_ack_log(
    sources: Iterable[str | os.PathLike[str] | IO[str]],
    *,
    since_ms: int | None = None,
    log: AckLog | None = None,
) -> AckLog:
    """Read ACK log files (paths, ``-`` for stdin, or open text files) into an :class:`AckLog`.

    ``since_ms``: keep only lines whose ``at`` (ACK time) is at or after it; lines without
    ``at`` are kept.
    """
    out = log if log is not None else AckLog()
    for source in sources:
        if isinstance(source, str | os.PathLike):
            name = os.fspath(source)
            if name == "-":
                _read_lines(sys.stdin, "<stdin>", out, since_ms)
            else:
                with open(name, encoding="utf-8") as f:
                    _read_lines(f, name, out, since_ms)
        else:
            _read_lines(source, getattr(source, "name", "<log>"), out, since_ms)
    return out


def _read_lines(f: Iterable[str], name: str, out: AckLog, since_ms: int | None) -> None:
    for number, line in enumerate(f, 1):
        parsed = _parse_line(line, f"{name}:{number}")
        if parsed is None:
            continue
        imei, values, at = parsed
        if since_ms is not None and at is not None and at < since_ms:
            out.skipped += 1
            continue
        out.lines += 1
        out.add(imei, values)


class AckLogWriter:
    """Appends JSON lines to an ACK log; one line per ACKed packet.

    ``write()`` is cheap (lines are collected); ``flush()`` (automatic every 64 KiB) and
    ``close()`` append whole lines with one ``write(2)`` on an ``O_APPEND`` descriptor, so
    several processes (e.g. ``simulate --processes N``) can share one log file: a reader
    never sees half a line, and lines of different writers never mix.
    """

    FLUSH_AT = 1 << 16

    def __init__(self, path: str | os.PathLike[str], *, clock: Any = time.time) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._clock = clock
        self._lines: list[str] = []
        self._size = 0
        self.records = 0

    def write(self, imei: str, ts: int | Iterable[int], at_ms: int | None = None) -> None:
        values = [ts] if isinstance(ts, int) else list(ts)
        at = int(self._clock() * 1000) if at_ms is None else at_ms
        body = values[0] if len(values) == 1 else values
        line = json.dumps({"imei": imei, "ts": body, "at": at}, separators=(",", ":")) + "\n"
        self._lines.append(line)
        self._size += len(line)
        self.records += len(values)
        if self._size >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if not self._lines or self._fd is None:
            return
        data = "".join(self._lines).encode()
        self._lines.clear()
        self._size = 0
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def close(self) -> None:
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> AckLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- a blocking client


class SyncRedisError(Exception):
    """Redis answered with an error, or the connection failed."""


class SyncRedis:
    """A minimal blocking Redis client (RESP2 via hiredis): enough to read a stream.

    Replies come back as hiredis gives them: bulk strings as ``bytes``, integers as ``int``,
    arrays as lists; an error reply raises :class:`SyncRedisError`.
    """

    def __init__(self, target: RedisTargetLike, *, timeout: float = 10.0) -> None:
        import hiredis

        if target.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(target.unix_path)
            except OSError:
                sock.close()
                raise
        else:
            address = (target.host or "127.0.0.1", target.port or 6379)
            sock = socket.create_connection(address, timeout=timeout)
        self._sock = sock
        self._reader = hiredis.Reader(replyError=SyncRedisError)
        if target.password is not None:
            self.execute("AUTH", target.password)
        if target.db:
            self.execute("SELECT", target.db)

    def execute(self, *args: Any) -> Any:
        self._sock.sendall(encode_command(args))
        while True:
            reply = self._reader.gets()
            if reply is not False:
                if isinstance(reply, SyncRedisError):
                    raise reply
                return reply
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise SyncRedisError("connection closed by Redis")
            self._reader.feed(chunk)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SyncRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the stream


@dataclass
class StreamIndex:
    """What the stream holds: per IMEI the record timestamps (ms), repeats kept."""

    by_imei: dict[str, array[int]] = field(default_factory=dict)
    entries: int = 0  # entries read
    unreadable: int = 0  # entries without a usable imei/ts
    length: int | None = None  # XLEN at the end of the read
    entries_added: int | None = None  # XINFO STREAM entries-added (Redis >= 7)
    first_id: str | None = None
    last_id: str | None = None

    def add(self, imei: str, ts: int) -> None:
        arr = self.by_imei.get(imei)
        if arr is None:
            arr = self.by_imei[imei] = array("q")
        arr.append(ts)

    @property
    def trimmed(self) -> int | None:
        """Entries added but no longer in the stream (MAXLEN trimming, XDEL), if known."""
        if self.entries_added is None or self.length is None:
            return None
        return max(0, self.entries_added - self.length)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _entry_key(flat: list[Any]) -> tuple[str, int] | None:
    # fast path: the service writes imei, codec, ts, payload in this order
    if len(flat) >= 6 and flat[0] == b"imei" and flat[4] == b"ts":
        return flat[1].decode("ascii", "replace"), iso_to_ms(flat[5].decode("ascii", "replace"))
    fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}
    imei = fields.get("imei")
    ts = fields.get("ts")
    if imei is None or ts is None:
        payload = fields.get("payload")
        if payload is None:
            return None
        obj = json.loads(payload)
        imei, ts = obj.get("device_id"), obj.get("timestamp")
        if imei is None or ts is None:
            return None
    return _text(imei), parse_ts(_text(ts))


def read_stream(
    client: SyncRedis,
    key: str = DEFAULT_STREAM,
    *,
    batch: int = DEFAULT_BATCH,
    start: str = "-",
    end: str = "+",
    index: StreamIndex | None = None,
    progress: Callable[..., object] | None = None,
) -> StreamIndex:
    """Read the whole stream (``start``..``end`` ids) in ``XRANGE ... COUNT batch`` steps;
    ``progress(entries_read, stream_length)`` after each batch, if given."""
    out = index if index is not None else StreamIndex()
    cursor = start
    total = int(client.execute("XLEN", key)) if progress is not None else None
    while True:
        reply = client.execute("XRANGE", key, cursor, end, "COUNT", batch)
        if not reply:
            break
        for _entry_id, flat in reply:
            out.entries += 1
            try:
                found = _entry_key(flat or [])
            except (ValueError, TypeError, AttributeError):
                found = None
            if found is None:
                out.unreadable += 1
                continue
            out.add(*found)
        first = _text(reply[0][0])
        if out.first_id is None:
            out.first_id = first
        out.last_id = _text(reply[-1][0])
        if progress is not None:
            progress(out.entries, total)
        if len(reply) < batch:
            break
        cursor = "(" + out.last_id
    out.length = int(client.execute("XLEN", key))
    try:
        info = client.execute("XINFO", "STREAM", key)
    except SyncRedisError:
        info = None  # no such key
    if isinstance(info, list):
        fields = {_text(info[i]): info[i + 1] for i in range(0, len(info) - 1, 2)}
        added = fields.get("entries-added")
        out.entries_added = int(added) if isinstance(added, int) else None
    return out


# --------------------------------------------------------------------------- the comparison


@dataclass
class Report:
    """The invariant's verdict. ``ok`` is ``missing == 0``."""

    acked_records: int = 0  # records in the log (a record logged twice counts twice)
    acked_unique: int = 0  # distinct (imei, ts) in the log
    acked_imeis: int = 0
    stream_entries: int = 0  # entries read from the stream
    stream_entries_logged: int = 0  # ... of IMEIs that appear in the log
    missing: int = 0  # ACKed, not in the stream: must be 0
    duplicates: int = 0  # extra copies of an (imei, ts) in the stream (logged IMEIs)
    duplicated_records: int = 0  # distinct (imei, ts) present more than once
    extra: int = 0  # distinct (imei, ts) in the stream never ACKed (logged IMEIs)
    other_imeis_entries: int = 0  # stream entries of IMEIs absent from the log
    unreadable_entries: int = 0
    trimmed: int | None = None  # entries the stream lost to MAXLEN / XDEL, if known
    missing_sample: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.missing == 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        out["missing_sample"] = [{"imei": i, "ts": t} for i, t in self.missing_sample]
        return out

    def summary(self) -> str:
        lines = [
            f"ACKed records:   {self.acked_records:,} ({self.acked_unique:,} distinct, "
            f"{self.acked_imeis:,} devices)",
            f"stream entries:  {self.stream_entries:,} read ({self.stream_entries_logged:,} "
            f"of logged devices, {self.other_imeis_entries:,} of others)",
            f"missing:         {self.missing:,}  "
            + ("OK" if self.ok else "FAIL: ACKed records not in the stream"),
            f"duplicates:      {self.duplicates:,} extra copies of {self.duplicated_records:,} "
            "records (allowed: resends after a lost ACK)",
            f"never ACKed:     {self.extra:,} records in the stream (allowed: ACK lost)",
        ]
        if self.unreadable_entries:
            lines.append(f"unreadable:      {self.unreadable_entries:,} entries without imei/ts")
        if self.trimmed:
            lines.append(
                f"trimmed:         {self.trimmed:,} entries were trimmed or deleted from the "
                "stream: missing records may have been trimmed (MAXLEN), not lost"
            )
        for imei, ts in self.missing_sample:
            lines.append(f"  missing: {imei} {ts}")
        return "\n".join(lines)


def _walk(acked: list[int], stored: list[int]) -> tuple[int, int, int, int, list[int]]:
    """Both sorted. Returns (missing, duplicates, duplicated_records, extra, missing_ts)."""
    missing = duplicates = duplicated = extra = 0
    missing_ts: list[int] = []
    i = j = 0
    n_a, n_s = len(acked), len(stored)
    while i < n_a or j < n_s:
        if j >= n_s or (i < n_a and acked[i] < stored[j]):
            missing += 1
            if len(missing_ts) < 100:
                missing_ts.append(acked[i])
            i += 1
            continue
        value = stored[j]
        k = j + 1
        while k < n_s and stored[k] == value:
            k += 1
        copies = k - j
        if copies > 1:
            duplicates += copies - 1
            duplicated += 1
        if i < n_a and acked[i] == value:
            i += 1
        else:
            extra += 1
        j = k
    return missing, duplicates, duplicated, extra, missing_ts


def compare(log: AckLog, stream: StreamIndex, *, sample: int = 20) -> Report:
    """Compare an ACK log with what the stream holds."""
    report = Report(
        acked_records=log.records,
        acked_imeis=len(log.by_imei),
        stream_entries=stream.entries,
        unreadable_entries=stream.unreadable,
        trimmed=stream.trimmed,
    )
    for imei, arr in stream.by_imei.items():
        if imei not in log.by_imei:
            report.other_imeis_entries += len(arr)
    for imei in sorted(log.by_imei):
        acked = sorted(set(log.by_imei[imei]))
        report.acked_unique += len(acked)
        stored_arr = stream.by_imei.get(imei)
        stored = sorted(stored_arr) if stored_arr is not None else []
        report.stream_entries_logged += len(stored)
        missing, dups, duplicated, extra, missing_ts = _walk(acked, stored)
        report.missing += missing
        report.duplicates += dups
        report.duplicated_records += duplicated
        report.extra += extra
        for ts in missing_ts:
            if len(report.missing_sample) < sample:
                report.missing_sample.append((imei, ms_to_iso(ts)))
    return report


def verify(
    target: RedisTargetLike,
    ack_logs: Iterable[str | os.PathLike[str] | IO[str]] | AckLog,
    *,
    stream: str = DEFAULT_STREAM,
    batch: int = DEFAULT_BATCH,
    since_ms: int | None = None,
    sample: int = 20,
    progress: Callable[..., object] | None = None,
) -> Report:
    """Read the ACK logs and the stream at ``target``; return the :class:`Report`.
    ``progress``: see :func:`read_stream`."""
    started = time.perf_counter()
    log = ack_logs if isinstance(ack_logs, AckLog) else read_ack_log(ack_logs, since_ms=since_ms)
    with SyncRedis(target) as client:
        index = read_stream(client, stream, batch=batch, progress=progress)
    report = compare(log, index, sample=sample)
    report.seconds = round(time.perf_counter() - started, 3)
    return report
