"""Frame bytes to finished payloads on the compiled path, for A/B runs across checkouts.

    python -m bench.compiled_ab          # prints "best median" µs per record

Runs in whatever checkout it is started from (its own ``teltonika_ingest``), so a before/after
comparison is two checkouts run alternately in fresh processes, e.g.::

    for i in $(seq 12); do (cd ../before && .venv/bin/python -m bench.compiled_ab); \\
        (cd ../after && .venv/bin/python -m bench.compiled_ab); done

Works with the payload API before issue 14 (``payloads_from_parts``, no flags) and after it
(``payloads_and_flags`` with the frame's ``time_limit_ms``, what the publisher calls; a new
receive time per frame, as in the service).
"""

from __future__ import annotations

import time

import teltonika_ingest.codec.payload as payload
from teltonika_ingest.codec import accel, encode_avl_frame, format_timestamp

from .decode import RECORDS_PER_FRAME, make_packet

IMEI = "356307042441013"


def main() -> int:
    compiled = accel.payload_parts
    if compiled is None:
        print("the compiled path is not built")
        return 1
    data = encode_avl_frame(make_packet("8E"))[8:-4]
    clock = iter(range(1_700_000_000_123, 1 << 62))  # a new millisecond per frame
    if hasattr(payload, "payloads_and_flags"):
        build = payload.payloads_and_flags
        limit_of = getattr(payload, "time_limit_ms", None)

        def one() -> object:
            now = next(clock)
            received_at = format_timestamp(now)
            limit = limit_of(now, 600_000) if limit_of else None
            return build(IMEI, received_at, compiled(data)[2], limit)
    else:  # before issue 14
        old = payload.payloads_from_parts

        def one() -> object:
            return old(IMEI, format_timestamp(next(clock)), compiled(data)[2])

    frames = 5000
    rounds = []
    for _ in range(9):
        start = time.perf_counter()
        for _ in range(frames):
            one()
        rounds.append((time.perf_counter() - start) / frames / RECORDS_PER_FRAME * 1e6)
    rounds.sort()
    print(f"{rounds[0]:.4f} {rounds[len(rounds) // 2]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
