"""Codec decode throughput: ``python -m bench.decode [--json] [--repeat N] [--seconds S]``.

Realistic frames: 10 records of 23 IO elements each (8 one-byte, 7 two-byte, 5
four-byte, 3 eight-byte values), as a device with a typical FMB configuration sends.
Each case runs for ``--seconds`` per round, in ``--repeat`` rounds that each measure
every case once (GC enabled, as in the service); the table shows the median over
the rounds and the range. Bounded: about 10 s with the defaults.

Cases
  decode 8 / 8E / 16    decode_avl_frame(frame): CRC + records into AvlRecord objects
  decode 8E mixed       the same, but consecutive records never share a layout
  framer 8E             Framer.feed(frame) + next_event() until None (CRC, then the compiled
                        path's payload pieces when the C extension is built)
  payload 8E            record_payload() per record (JSON for the stream)
  to payloads 8E, Python    what the service does per frame without the C extension:
                        decode_avl_frame + record_payload per record
  to payloads 8E, compiled  the same with it: payload_parts + payloads_and_flags (what the
                        publisher does per frame, data-quality flags included)
  to payloads 8E, --io-names  the Python path plus the io object (the catalogue's named
                        values for an FMB920): what the service does per frame with --io-names
  format_timestamp      per call
  calibration           a fixed pure-Python loop (to compare machines and runs)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from teltonika_ingest.codec import (
    AvlPacket,
    AvlRecord,
    Framer,
    accel,
    decode_avl_frame,
    encode_avl_frame,
    encode_imei,
    format_timestamp,
    record_payload,
)
from teltonika_ingest.codec.payload import payloads_and_flags, time_limit_ms

RECORDS_PER_FRAME = 10
GROUP_SIZES = {1: 8, 2: 7, 4: 5, 8: 3}  # 23 IO elements
TARGET_RECORDS_PER_S = 200_000


def make_packet(codec: str, seed: int = 1, mixed: bool = False) -> AvlPacket:
    """10 records of 23 IOs; ``mixed``: each record splits them over the groups
    differently, so no two consecutive records share a layout (the decoder's worst
    case: every record takes the generic path)."""
    rnd = random.Random(seed)
    id_max = 255 if codec == "8" else 600
    records = []
    ids = rnd.sample(range(1, id_max), sum(GROUP_SIZES.values()))
    for index in range(RECORDS_PER_FRAME):
        groups: dict[int, dict[int, int]] = {}
        at = 0
        sizes = dict(GROUP_SIZES)
        if mixed:
            sizes[1] += index % 5 - 2
            sizes[2] -= index % 5 - 2
        for width, count in sizes.items():
            groups[width] = {
                io_id: rnd.randrange(1 << (8 * width)) for io_id in ids[at : at + count]
            }
            at += count
        records.append(
            AvlRecord(
                timestamp_ms=1_700_000_000_000 + index * 30_000,
                priority=rnd.randrange(2),
                longitude=rnd.randrange(-1_800_000_000, 1_800_000_000),
                latitude=rnd.randrange(-900_000_000, 900_000_000),
                altitude=rnd.randrange(-100, 3000),
                angle=rnd.randrange(360),
                satellites=rnd.randrange(20),
                speed=rnd.randrange(200),
                event_io_id=0,
                generation_type=7 if codec == "16" else None,
                io1=groups[1],
                io2=groups[2],
                io4=groups[4],
                io8=groups[8],
            )
        )
    return AvlPacket(codec, tuple(records))


def measure(func: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``func`` over about ``seconds`` (GC left on)."""
    batch = 1
    while True:  # size a batch to ~10 ms
        started = time.perf_counter()
        for _ in range(batch):
            func()
        elapsed = time.perf_counter() - started
        if elapsed > 0.01:
            break
        batch *= 2
    calls = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(batch):
            func()
        calls += batch
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - started)


def calibration_loop() -> int:
    total = 0
    for value in range(10_000):
        total += value
    return total


def cases() -> list[tuple[str, Callable[[], object], int]]:
    """(name, function, records per call)."""
    out: list[tuple[str, Callable[[], object], int]] = []
    frames = {codec: encode_avl_frame(make_packet(codec)) for codec in ("8", "8E", "16")}
    for codec, frame in frames.items():
        assert len(decode_avl_frame(frame).records) == RECORDS_PER_FRAME
        out.append((f"decode {codec}", lambda f=frame: decode_avl_frame(f), RECORDS_PER_FRAME))

    mixed = encode_avl_frame(make_packet("8E", mixed=True))
    out.append(("decode 8E mixed", lambda: decode_avl_frame(mixed), RECORDS_PER_FRAME))

    framer = Framer()
    framer.feed(encode_imei("356307042441013"))
    framer.next_event()
    frame_8e = frames["8E"]

    def framer_path() -> None:
        framer.feed(frame_8e)
        while framer.next_event() is not None:
            pass

    out.append(("framer 8E", framer_path, RECORDS_PER_FRAME))

    records = make_packet("8E").records
    received_at = format_timestamp(1_700_000_000_123)

    def payloads() -> None:
        for record in records:
            record_payload(record, "356307042441013", "8E", received_at)

    out.append(("payload 8E", payloads, RECORDS_PER_FRAME))

    def python_payloads() -> None:
        packet = decode_avl_frame(frame_8e)
        for record in packet.records:
            record_payload(record, "356307042441013", "8E", received_at)

    out.append(("to payloads 8E, Python", python_payloads, RECORDS_PER_FRAME))
    compiled = accel.payload_parts
    if compiled is not None:
        data_8e = frame_8e[8:-4]

        def compiled_payloads() -> None:
            limit = time_limit_ms(1_700_000_000_123)
            payloads_and_flags("356307042441013", received_at, compiled(data_8e)[2], limit)

        out.append(("to payloads 8E, compiled", compiled_payloads, RECORDS_PER_FRAME))

    from teltonika_ingest.catalog import catalogue, io_object

    view = catalogue().for_model("FMB920")

    def named_payloads() -> None:
        packet = decode_avl_frame(frame_8e)
        limit = time_limit_ms(1_700_000_000_123)
        for record in packet.records:
            record_payload(
                record, "356307042441013", "8E", received_at, limit=limit,
                io=io_object(view, record),
            )  # fmt: skip

    out.append(("to payloads 8E, --io-names", named_payloads, RECORDS_PER_FRAME))
    out.append(("format_timestamp", lambda: format_timestamp(1_700_000_012_345), 1))
    out.append(("calibration", calibration_loop, 1))
    return out


def run(repeat: int, seconds: float) -> dict[str, Any]:
    """``repeat`` rounds; each round measures every case once, so a change of machine
    speed during the run (common on shared VMs) hits every case alike."""
    measured = cases()
    rates: dict[str, list[float]] = {name: [] for name, _, _ in measured}
    for _ in range(repeat):
        for name, func, per_call in measured:
            rates[name].append(measure(func, seconds) * per_call)
    results = []
    for name, _, per_call in measured:
        ordered = sorted(rates[name])
        median = statistics.median(ordered)
        results.append(
            {
                "case": name,
                "per_s_median": median,
                "per_s_min": ordered[0],
                "per_s_max": ordered[-1],
                "us_median": 1e6 / median,
                "unit": "records" if per_call > 1 else "calls",
                "rounds": rates[name],
            }
        )
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "gc_enabled": gc.isenabled(),
        "compiled_path": accel.compiled_path_status(),
        "repeat": repeat,
        "seconds_per_repeat": seconds,
        "records_per_frame": RECORDS_PER_FRAME,
        "io_per_record": sum(GROUP_SIZES.values()),
        "target_records_per_s": TARGET_RECORDS_PER_S,
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    rows = [
        "| case | unit/s (median) | µs per unit | range (min - max) |",
        "|---|---:|---:|---|",
    ]
    for r in report["results"]:
        rows.append(
            f"| {r['case']} | {r['per_s_median']:,.0f} {r['unit']}/s | {r['us_median']:.2f} | "
            f"{r['per_s_min']:,.0f} - {r['per_s_max']:,.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (default 5)")
    parser.add_argument("--seconds", type=float, default=0.3, help="seconds per run (default 0.3)")
    args = parser.parse_args(argv)
    report = run(args.repeat, args.seconds)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"Python {report['python']}, {RECORDS_PER_FRAME} records/frame, "
            f"{report['io_per_record']} IOs/record, median of {args.repeat} rounds "
            f"of {args.seconds} s per case"
        )
        print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
