"""Run twistd with every garbage collection timed: ``python -m bench.gcwatch OUT twistd-args...``.

Bench-only instrumentation for a service that has no GC metric of its own (the processor):
a ``gc.callbacks`` hook records (monotonic time, generation, pause seconds) for each
collection in memory; a thread appends the new ones to OUT (one JSON array a line) every
second, and once more at exit (so a process killed after a hung shutdown keeps its list).
``time.monotonic`` is the system-wide CLOCK_MONOTONIC on Linux, so the benchmark can cut the
list into its phases with its own clock. Nothing here changes what the service does apart
from the callback's own cost (~1 µs a collection).
"""

from __future__ import annotations

import atexit
import gc
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any


def install(out: Path) -> None:
    events: list[tuple[float, int, float]] = []
    started = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            events.append((time.monotonic(), info["generation"], time.perf_counter() - started[0]))

    gc.callbacks.append(callback)

    written = [0]

    def flush() -> None:  # appends the new events, one JSON array a line
        new = events[written[0] :]
        written[0] += len(new)
        if new:
            with out.open("a") as f:
                f.writelines(json.dumps(e) + "\n" for e in new)

    def every_second() -> None:  # not only at exit: a process stopped by SIGKILL keeps its list
        while True:
            time.sleep(1.0)
            flush()

    threading.Thread(target=every_second, name="gcwatch", daemon=True).start()
    atexit.register(flush)


def read(path: Path) -> list[list[float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def window(events: list[list[float]], start: float, end: float) -> dict[str, Any]:
    """Per generation in [start, end): collections, total and largest pause (ms)."""
    view: dict[str, Any] = {}
    for t, generation, pause in events:
        if start <= t < end:
            row = view.setdefault(f"gen{int(generation)}", {"count": 0, "total_ms": 0.0,
                                                               "max_ms": 0.0})  # fmt: skip
            row["count"] += 1
            row["total_ms"] += pause * 1000
            row["max_ms"] = max(row["max_ms"], pause * 1000)
    for row in view.values():
        row["total_ms"] = round(row["total_ms"], 1)
        row["max_ms"] = round(row["max_ms"], 1)
    return dict(sorted(view.items()))


def main() -> None:
    install(Path(sys.argv[1]))
    sys.argv = ["twistd", *sys.argv[2:]]
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
