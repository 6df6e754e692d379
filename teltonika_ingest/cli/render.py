"""How ``decode`` writes what it decoded: JSON lines (the default) or a table for a terminal."""

from __future__ import annotations

import binascii
from typing import Any, TextIO

import orjson

from teltonika_ingest.catalog import ModelView, catalogue, io_entry, io_object
from teltonika_ingest.codec import AvlRecord, CommandMessage, format_timestamp, record_dict

__all__ = ["Renderer", "command_dict", "printable_text"]

_PRINTABLE = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}


def printable_text(payload: bytes) -> str | None:
    """The payload as text if every byte is printable ASCII (or tab/CR/LF), else None."""
    if all(b in _PRINTABLE for b in payload):
        return payload.decode("ascii")
    return None


def command_dict(message: CommandMessage) -> dict[str, Any]:
    """A Codec 12/13/14 message, losslessly: ``hex`` and ``b64`` always, ``text`` only when
    the payload is printable (null otherwise)."""
    timestamp = message.timestamp_ms
    payload = bytes(message.payload)
    return {
        "codec": message.codec,
        "type": message.type,
        "text": printable_text(payload),
        "hex": payload.hex(),
        "b64": binascii.b2a_base64(payload, newline=False).decode("ascii"),
        "imei": message.imei,
        "timestamp": None if timestamp is None else format_timestamp(timestamp),
    }


class Renderer:
    def __init__(
        self, out: TextIO, *, table: bool, names: bool, model: str | None, received_at: str
    ) -> None:
        self.out = out
        self.table = table
        self.names = names or table
        self.model = model
        self.view: ModelView = catalogue().for_model(model) if self.names else ModelView(None, {})
        self.received_at = received_at
        #: set by --scan: where the next objects were found
        self.found: dict[str, Any] | None = None

    def model_warning(self) -> str | None:
        if self.names and self.model and self.view.model is None:
            return (
                f"model {self.model!r} is not in the IO catalogue: naming only the ids "
                "common to all families"
            )
        return None

    # ------------------------------------------------------------------ JSON

    def _json(self, obj: dict[str, Any]) -> None:
        if self.found is not None:
            obj["found"] = self.found
        self.out.write(orjson.dumps(obj).decode("utf-8"))
        self.out.write("\n")

    def handshake(self, imei: str) -> None:
        if self.table:
            self._line(f"handshake  imei {imei}")
        else:
            self._json({"imei": imei})

    def command(self, message: CommandMessage) -> None:
        line = command_dict(message)
        if not self.table:
            self._json(line)
            return
        shown = repr(line["text"]) if line["text"] is not None else f"hex {line['hex']}"
        extra = "".join(f"  {k} {line[k]}" for k in ("imei", "timestamp") if line[k] is not None)
        self._line(f"codec {line['codec']} type 0x{line['type']:02x}{extra}  {shown}")

    def record(self, record: AvlRecord, imei: str | None, codec: str) -> None:
        payload = record_dict(record, imei, codec, self.received_at)
        if self.names:
            payload["io"] = io_object(self.view, record)
        if self.table:
            self._table(payload, record)
        else:
            self._json(payload)

    # ------------------------------------------------------------------ table

    def _line(self, text: str) -> None:
        if self.found is not None:
            f = self.found
            self.out.write(f"[line {f['line']}, column {f['column']}, {f['kind']}] ")
        self.out.write(text + "\n")

    def _table(self, payload: dict[str, Any], record: AvlRecord) -> None:
        head = (
            f"{payload['timestamp']}  device {payload['device_id'] or '-'}  codec "
            f"{payload['codec']}  priority {payload['priority']}  lat {payload['latitude']} "
            f"lon {payload['longitude']}  alt {payload['altitude']} m  angle "
            f"{payload['angle']}  sat {payload['satellites']}  speed {payload['speed']} km/h  "
            f"event io {payload['event_io_id']}"
        )
        if payload["generation_type"] is not None:
            head += f"  generation {payload['generation_type']}"
        model = self.view.model or "unknown model: common ids only"
        self._line(f"{head}  ({model})")
        rows = [("id", "name", "raw", "value", "meaning")]
        groups = ((record.io1, 1), (record.io2, 2), (record.io4, 4), (record.io8, 8))
        items: list[tuple[int, int | bytes, int]] = [
            (i, v, size) for group, size in groups for i, v in group.items()
        ]
        items += [(i, raw, len(raw)) for i, raw in record.iox.items()]
        for io_id, raw, size in items:
            shown_raw = raw.hex() if isinstance(raw, bytes) else str(raw)
            element = self.view.get(io_id)
            if element is None:
                rows.append((str(io_id), "?", shown_raw, "", ""))
                continue
            entry = io_entry(element, raw, size)
            value = f"{entry['value']} {entry.get('unit', '')}".rstrip()
            rows.append((str(io_id), element.name, shown_raw, value, entry.get("text", "")))
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        for row in rows:
            cells = [
                row[c].rjust(widths[c]) if c in (0, 2) else row[c].ljust(widths[c])
                for c in range(5)
            ]
            self.out.write(("  " + "  ".join(cells)).rstrip() + "\n")
