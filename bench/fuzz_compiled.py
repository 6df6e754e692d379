"""Differential fuzzing of the compiled hot path (``teltonika_ingest/codec/_fastavl.c``),
best run against an AddressSanitizer + UBSan build of it::

    gcc -shared -fPIC -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer \\
        $(python3-config --includes) teltonika_ingest/codec/_fastavl.c \\
        -o /tmp/_fastavl$(python3-config --extension-suffix)
    ASAN_OPTIONS=detect_leaks=0 \\
    LD_PRELOAD=$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so) \\
        .venv/bin/python -m bench.fuzz_compiled /tmp/_fastavl*.so --seconds 90

Mutates valid Codec 8 / 8E / 16 data fields (byte changes, insertions, deletions,
truncation) and checks for every input the compiled path accepts that the Python decoder
accepts it too, with byte-identical payloads. Without a path argument it uses the installed
extension. Bounded by ``--seconds``; prints the counts and exits 1 on the first disagreement.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from types import ModuleType

import attrs

from teltonika_ingest.codec import (
    AvlPacket,
    AvlRecord,
    decode_avl_data,
    encode_avl_data,
    format_timestamp,
    record_payload,
)
from teltonika_ingest.codec.payload import payloads_from_parts

IMEI = "356307042441013"
RECEIVED_AT = "2026-11-22T10:00:00.123Z"


def load(path: str | None) -> ModuleType:
    if path is None:
        from teltonika_ingest.codec import _fastavl  # type: ignore[attr-defined]

        return _fastavl  # type: ignore[no-any-return]
    spec = importlib.util.spec_from_file_location("_fastavl", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeds() -> list[bytes]:
    out = []
    for codec in ("8", "8E", "16"):
        records = []
        for i in range(5):
            record = AvlRecord(
                timestamp_ms=1_700_000_000_000 + i * 1000, priority=1,
                longitude=252793217 + i, latitude=-546872135 - i, altitude=-12, angle=270,
                satellites=9, speed=42, event_io_id=1, io1={1: 1, 21: 3}, io2={66: 24079},
                io4={241: 24602}, io8={78: 2**64 - 1},
            )  # fmt: skip
            if codec == "16":
                record = attrs.evolve(record, generation_type=3)
            if codec == "8E":
                record = attrs.evolve(record, iox={300: bytes(range(i * 3))})
            records.append(record)
        out.append(encode_avl_data(AvlPacket(codec, tuple(records))))
    return out


def mutate(rnd: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 6)):
        if not buf:
            break
        at = rnd.randrange(len(buf))
        action = rnd.random()
        if action < 0.5:
            buf[at] = rnd.randrange(256)
        elif action < 0.7:
            buf[at:at] = rnd.randbytes(rnd.randint(1, 8))
        elif action < 0.9:
            del buf[at : at + rnd.randint(1, 8)]
        else:
            del buf[at:]
    return bytes(buf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz_compiled", description=__doc__)
    parser.add_argument("path", nargs="?", help="a _fastavl build to load (default: installed)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    payload_parts = load(args.path).payload_parts
    rnd = random.Random(args.seed)
    corpus = seeds()
    tried = accepted = 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        data = mutate(rnd, rnd.choice(corpus))
        tried += 1
        try:
            codec, count, parts = payload_parts(data)
        except ValueError:
            continue
        accepted += 1
        packet = decode_avl_data(data)  # raises if the compiled path accepted too much
        want: list[bytes] = []
        for r in packet.records:
            want += [
                format_timestamp(r.timestamp_ms).encode(),
                record_payload(r, IMEI, codec, RECEIVED_AT),
            ]
        if (codec, count) != (packet.codec, len(packet.records)) or want != payloads_from_parts(
            IMEI, RECEIVED_AT, parts
        ):
            print(f"DISAGREEMENT on {data.hex()}", file=sys.stderr)
            return 1
    print(f"{tried} inputs, {accepted} accepted by the compiled path, all identical to Python")
    return 0


if __name__ == "__main__":
    sys.exit(main())
