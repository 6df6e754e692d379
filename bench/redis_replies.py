"""Reply parsing cost: ``python -m bench.redis_replies [--entries N] [--rounds R]``.

One ``XREADGROUP`` reply of N telemetry entries (the drain benchmark's fields: imei, codec,
ts and a Codec 8E record payload), as Redis sends it, parsed R times by txredisapi's
``HiredisProtocol`` (hiredis reads bytes, ``tryConvertData`` decodes every item in Python)
and by ``RedisClient``'s ``_DecodingHiredisProtocol`` (hiredis decodes in C), fed in 64 KiB
chunks like a socket read. Prints µs per entry for each, median of R, side by side.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import txredisapi

from teltonika_ingest.codec import record_payload
from teltonika_ingest.codec.payload import format_timestamp
from teltonika_ingest.redis.client import _DecodingHiredisProtocol
from teltonika_ingest.sim.traffic import build_packet


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def reply(entries: int) -> bytes:
    packet = build_packet("8E", 10, 12, random.Random(7))
    received = format_timestamp(int(time.time() * 1000))
    parts = [b"*1\r\n*2\r\n", _bulk(b"telemetry:teltonika"), b"*%d\r\n" % entries]
    for i in range(entries):
        record = packet.records[i % 10]
        device = f"35000000{i % 100:07d}"
        fields = ["imei", device, "codec", "8E", "ts", format_timestamp(record.timestamp_ms),
                  "payload", record_payload(record, device, "8E", received)]  # fmt: skip
        parts.append(b"*2\r\n" + _bulk(f"1764600000000-{i}".encode()) + b"*8\r\n")
        parts += [_bulk(f if isinstance(f, bytes) else f.encode()) for f in fields]
    return b"".join(parts)


def parse(make: Any, data: bytes) -> float:
    protocol = make()
    started = time.perf_counter()
    for i in range(0, len(data), 65536):
        protocol.dataReceived(data[i : i + 65536])
    took = time.perf_counter() - started
    assert len(protocol.replyQueue.pending) == 1
    return took


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_replies")
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    data = reply(args.entries)
    makers = {
        "txredisapi": lambda: txredisapi.HiredisProtocol(charset="utf-8", convertNumbers=False),
        "decoding": lambda: _DecodingHiredisProtocol(charset="utf-8", convertNumbers=False),
    }
    result: dict[str, Any] = {"entries": args.entries, "reply_bytes": len(data)}
    for name, make in makers.items():
        times = [parse(make, data) for _ in range(args.rounds)]
        result[f"{name}_us_per_entry"] = round(statistics.median(times) / args.entries * 1e6, 2)
    result["ratio"] = round(result["txredisapi_us_per_entry"] / result["decoding_us_per_entry"], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
