"""What a simulation measured: the latency histogram (log-linear, mergeable across
processes), the run's counters, and merging the summaries of several processes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# --------------------------------------------------------------------------- statistics


class LatencyHistogram:
    """Log-linear histogram of latencies in µs: exact below 1 ms, then 3 significant
    digits (at most 1 % above the true value, as quantiles report the bucket's top)."""

    __slots__ = ("counts", "max_us", "n", "total_us")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total_us = 0
        self.max_us = 0

    def add(self, seconds: float) -> None:
        us = int(seconds * 1_000_000)
        if us < 1_000:
            key = us
        elif us < 10_000:
            key = us - us % 10
        elif us < 100_000:
            key = us - us % 100
        elif us < 1_000_000:
            key = us - us % 1_000
        else:
            key = us - us % 10_000
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        self.n += 1
        self.total_us += us
        if us > self.max_us:
            self.max_us = us

    @staticmethod
    def _width(key: int) -> int:
        if key < 1_000:
            return 1
        if key < 10_000:
            return 10
        if key < 100_000:
            return 100
        if key < 1_000_000:
            return 1_000
        return 10_000

    def quantile_us(self, q: float) -> int:
        """The ``q`` quantile (0..1): the top of the bucket holding it; 0 when empty."""
        if not self.n:
            return 0
        rank = max(1, int(q * self.n + 0.999999))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= rank:
                return min(key + self._width(key) - 1, self.max_us)
        return self.max_us

    def merge(self, other: LatencyHistogram) -> None:
        for key, count in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + count
        self.n += other.n
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)

    def summary_ms(self) -> dict[str, float | int]:
        ms = 1000.0
        return {
            "count": self.n,
            "p50": self.quantile_us(0.50) / ms,
            "p95": self.quantile_us(0.95) / ms,
            "p99": self.quantile_us(0.99) / ms,
            "max": self.max_us / ms,
            "mean": (self.total_us / self.n / ms) if self.n else 0.0,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": {str(k): v for k, v in sorted(self.counts.items())},
            "n": self.n,
            "total_us": self.total_us,
            "max_us": self.max_us,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyHistogram:
        hist = cls()
        hist.counts = {int(k): int(v) for k, v in data.get("counts", {}).items()}
        hist.n = int(data.get("n", 0))
        hist.total_us = int(data.get("total_us", 0))
        hist.max_us = int(data.get("max_us", 0))
        return hist


class Stats:
    """Counters of one simulation (all devices)."""

    COUNTERS = (
        "connects",
        "reconnects",
        "handshakes",
        "packets_sent",
        "records_sent",
        "resends",
        "packets_acked",
        "records_acked",
        "late_sends",
        "commands_received",
        "commands_answered",
    )

    def __init__(self) -> None:
        self.connects = 0
        self.reconnects = 0
        self.handshakes = 0
        self.packets_sent = 0
        self.records_sent = 0
        self.resends = 0
        self.packets_acked = 0
        self.records_acked = 0
        self.late_sends = 0
        self.commands_received = 0
        self.commands_answered = 0
        self.errors: dict[str, int] = {}
        self.latency = LatencyHistogram()
        self.steady_latency = LatencyHistogram()

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.COUNTERS}


_SUMMED = (*Stats.COUNTERS, "devices", "window_packets_acked", "window_records_acked")


def merge_summaries(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One summary from those of several simulator processes run side by side."""
    if not parts:
        raise ValueError("nothing to merge")
    out = dict(parts[0])
    for key in (*_SUMMED, "connected_at_end", "errors_total"):
        out[key] = sum(int(p.get(key, 0)) for p in parts)
    for key in ("packets_per_s", "records_per_s"):
        out[key] = sum(float(p.get(key, 0.0)) for p in parts)
    out["elapsed_s"] = max(float(p["elapsed_s"]) for p in parts)
    out["window_s"] = max(float(p["window_s"]) for p in parts)
    out["incomplete"] = any(p.get("incomplete") for p in parts)
    out["processes"] = sum(int(p.get("processes", 1)) for p in parts)
    out["frame_bytes"] = sorted({s for p in parts for s in p.get("frame_bytes", [])})
    errors: dict[str, int] = {}
    for p in parts:
        for name, count in p.get("errors", {}).items():
            errors[name] = errors.get(name, 0) + int(count)
    out["errors"] = dict(sorted(errors.items()))
    for hist_key, summary_key in (
        ("histogram", "ack_latency_ms"),
        ("steady_histogram", "steady_ack_latency_ms"),
    ):
        merged = LatencyHistogram()
        for p in parts:
            merged.merge(LatencyHistogram.from_json(p.get(hist_key, {})))
        out[hist_key] = merged.to_json()
        out[summary_key] = merged.summary_ms()
    return out
