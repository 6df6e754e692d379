"""Command entries (contract.md §4): the stream and result names, and checking one entry.

Pure: no Twisted, no Redis. :func:`parse_entry` turns the flat field list of one
``commands:instance:{id}`` entry into a :class:`CommandRequest` or raises
:class:`InvalidCommand` saying why (that text becomes the ``invalid`` outcome's ``response``).
"""

from __future__ import annotations

import binascii
import math
from collections.abc import Sequence
from typing import Any

import attrs

__all__ = [
    "ECHO_IMEI_LENGTH",
    "GROUP",
    "MAX_ID_LENGTH",
    "MAX_TIMEOUT_S",
    "RESULTS_KEY",
    "RESULTS_MAXLEN",
    "STATUSES",
    "STREAM_PREFIX",
    "CommandRequest",
    "InvalidCommand",
    "command_stream",
    "entry_time_ms",
    "parse_entry",
]

GROUP = "teltonika-ingest"
RESULTS_KEY = "commands:results"
RESULTS_MAXLEN = 100_000
STREAM_PREFIX = "commands:instance:"
#: the largest ``timeout_s`` an entry may ask for
MAX_TIMEOUT_S = 3600.0
#: the longest command ``id`` (a longer one is invalid): it is echoed in every outcome
MAX_ID_LENGTH = 128
#: an invalid entry's ``imei`` is echoed cut to this many characters
ECHO_IMEI_LENGTH = 32
STATUSES = ("ok", "nack", "timeout", "not_connected", "invalid", "message")


def command_stream(instance_id: str) -> str:
    """The command stream of an instance (contract.md §2)."""
    return STREAM_PREFIX + instance_id


def entry_time_ms(entry_id: str) -> int | None:
    """The millisecond part of a stream entry id (``1700000000000-0``), None if not one."""
    ms, _, seq = entry_id.partition("-")
    if not ms.isdigit() or (seq and not seq.isdigit()):
        return None
    return int(ms)


# --------------------------------------------------------------------------- validation


class InvalidCommand(Exception):
    """A command entry that cannot be carried out; ``str()`` says why (goes to ``response``).

    ``id`` and ``imei`` are whatever the entry had (for the outcome), ``""`` if nothing usable.
    """

    def __init__(self, reason: str, *, id: str = "", imei: str = "") -> None:
        super().__init__(reason)
        self.id = id
        self.imei = imei


@attrs.frozen
class CommandRequest:
    """A checked command entry."""

    id: str
    imei: str
    payload: bytes  # ASCII text, or the decoded ``hex`` field
    binary: bool  # given as ``hex``: the response also comes back as ``response_b64``
    codec: str  # "12" | "14"
    timeout: float  # seconds


def _text(value: Any) -> str | None:
    """A Redis bulk string as ``str``; None when it is not UTF-8 (RedisClient gives bytes)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return str(value)


def _printable_ascii(text: str) -> bool:
    return all(" " <= c <= "~" for c in text)


def parse_entry(
    fields: Sequence[Any] | None, *, max_length: int, default_timeout: float
) -> CommandRequest:
    """Check one command entry (its flat field/value list); raise :class:`InvalidCommand`.

    Fields: ``id``, ``imei``, ``text`` (printable ASCII) or ``hex`` (binary payload), optional
    ``codec`` (12 or 14, default 12) and ``timeout_s`` (0 < N <= 3600, default
    ``default_timeout``). Other fields are ignored; a field given twice is invalid.
    """
    if fields is None:
        raise InvalidCommand("the entry was deleted from the stream before it was handled")
    if len(fields) % 2:
        raise InvalidCommand("odd number of field/value items")
    values: dict[str, Any] = {}
    duplicated: list[str] = []
    for i in range(0, len(fields), 2):
        name = _text(fields[i])
        if name is None:
            continue  # a field name that is not UTF-8 is no field we know
        if name in values:
            duplicated.append(name)
        values[name] = fields[i + 1]

    raw_id = values.get("id")
    cid = _text(raw_id) if raw_id is not None else None
    raw_imei = values.get("imei")
    imei = _text(raw_imei) if raw_imei is not None else None
    # what an invalid outcome echoes back, cut short: an entry with a 1 MB id or imei must
    # not produce a 1 MB result
    shown_id = (cid or "")[:MAX_ID_LENGTH]
    shown_imei = (imei or "")[:ECHO_IMEI_LENGTH]

    def invalid(reason: str) -> InvalidCommand:
        return InvalidCommand(reason, id=shown_id, imei=shown_imei)

    if duplicated:
        raise invalid(f"field {duplicated[0]!r} given twice")
    if not cid:
        raise invalid(
            "missing field 'id'" if raw_id is None else "field 'id' is empty or not UTF-8"
        )
    if len(cid) > MAX_ID_LENGTH:
        raise invalid(
            f"'id' is {len(cid)} characters, longer than {MAX_ID_LENGTH} (echoed cut short)"
        )
    if imei is None:
        raise invalid("missing field 'imei'")
    if len(imei) != 15 or not (imei.isascii() and imei.isdigit()):
        raise invalid(f"'imei' must be 15 decimal digits, got {imei[:40]!r}")

    has_text, has_hex = "text" in values, "hex" in values
    if has_text and has_hex:
        raise invalid("both 'text' and 'hex' given; send one")
    if has_text:
        text = _text(values["text"])
        if text is None or not text.isascii():
            raise invalid("'text' is not ASCII")
        if not text:
            raise invalid("'text' is empty")
        if not _printable_ascii(text):
            raise invalid("'text' contains control characters")
        payload = text.encode("ascii")
        binary = False
    elif has_hex:
        digits = _text(values["hex"])
        if digits is None or not digits.isascii():
            raise invalid("'hex' is not hex digits")
        try:
            payload = binascii.unhexlify(digits)
        except (binascii.Error, ValueError):
            raise invalid("'hex' is not an even number of hex digits") from None
        if not payload:
            raise invalid("'hex' is empty")
        binary = True
    else:
        raise invalid("missing field 'text' (or 'hex')")
    if len(payload) > max_length:
        raise invalid(
            f"command is {len(payload)} bytes, longer than --max-command-length {max_length}"
        )

    codec = "12"
    if "codec" in values:
        given = _text(values["codec"])
        if given not in ("12", "14"):
            raise invalid(f"'codec' must be 12 or 14, got {str(given)[:20]!r}")
        codec = given

    timeout = default_timeout
    if "timeout_s" in values:
        given = _text(values["timeout_s"]) or ""
        try:
            timeout = float(given)
        except ValueError:
            raise invalid(f"'timeout_s' must be a number of seconds, got {given[:20]!r}") from None
        if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_S):
            raise invalid(f"'timeout_s' must be > 0 and <= {MAX_TIMEOUT_S:g}, got {given[:20]!r}")
    return CommandRequest(cid, imei, payload, binary, codec, timeout)
