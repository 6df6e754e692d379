"""Per-key budgets: how often one device may do an expensive thing, and how often one kind of
log line may be written for one device or peer.

Both count events in fixed one-minute windows per key (a device's IMEI, a peer address) and
keep at most ``max_keys`` keys (the oldest window is forgotten first), so a flood of distinct
keys costs bounded memory. Pure bookkeeping: the caller passes the clock.

* :class:`DeviceBudget` answers "may this device do it again this minute?" (Codec 13 messages
  into ``commands:results``, frames into the dead-letter stream);
* :class:`RepeatLimiter` answers "log this line?": the first ``burst`` lines of a key in a
  window are logged, the rest are counted, and the next line logged for that key says how
  many were suppressed (or :meth:`RepeatLimiter.take_suppressed` reports them).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["WINDOW_S", "DeviceBudget", "MonotonicClock", "RepeatLimiter", "suppressed_note"]

#: the budget window: budgets are "per device per minute"
WINDOW_S = 60.0
#: keys remembered at most (a window each: ~150 bytes); the oldest goes first
MAX_KEYS = 100_000


class MonotonicClock:
    """``seconds()`` from ``time.monotonic``: for code that has no reactor at hand."""

    def seconds(self) -> float:
        return time.monotonic()


class _Windows:
    """key -> [window start, events in the window, events over the limit]"""

    def __init__(self, clock: Any, window: float, max_keys: int) -> None:
        self.clock = clock
        self.window = window
        self.max_keys = max_keys
        self._keys: OrderedDict[Hashable, list[float]] = OrderedDict()

    def hit(self, key: Hashable, limit: int) -> tuple[bool, list[float]]:
        """Count one event of ``key``; (within the limit, its window)."""
        now = self.clock.seconds()
        keys = self._keys
        entry = keys.get(key)
        if entry is None or now - entry[0] >= self.window:
            if entry is not None:
                del keys[key]  # re-inserted at the end: the newest window
            entry = [now, 0.0, 0.0]
            keys[key] = entry
            while len(keys) > self.max_keys:
                keys.popitem(last=False)
        entry[1] += 1
        if entry[1] <= limit:
            return True, entry
        entry[2] += 1
        return False, entry


class DeviceBudget:
    """At most ``per_minute`` events per key per minute; 0 = unlimited."""

    def __init__(self, clock: Any, per_minute: int, *, max_keys: int = MAX_KEYS) -> None:
        self.per_minute = per_minute
        self._windows = _Windows(clock, WINDOW_S, max_keys)

    def spend(self, key: Hashable) -> bool:
        """Count one event; False once ``key`` is over its budget for this window."""
        if not self.per_minute:
            return True
        return self._windows.hit(key, self.per_minute)[0]


class RepeatLimiter:
    """At most ``burst`` log lines per key per window; the rest are counted."""

    def __init__(
        self, clock: Any, *, burst: int = 5, window: float = WINDOW_S, max_keys: int = MAX_KEYS
    ) -> None:
        self.burst = burst
        self._windows = _Windows(clock, window, max_keys)
        #: key -> lines suppressed and not yet reported
        self._unreported: dict[Hashable, int] = {}
        self.suppressed_total = 0

    def allow(self, key: Hashable) -> tuple[bool, int]:
        """(log this line?, lines of this key suppressed since the last one logged).

        Log the line only when the first item is True, and mention the count if it is not 0.
        """
        ok, _entry = self._windows.hit(key, self.burst)
        if not ok:
            self.suppressed_total += 1
            self._unreported[key] = self._unreported.get(key, 0) + 1
            if len(self._unreported) > self._windows.max_keys:
                self._unreported.pop(next(iter(self._unreported)))
            return False, 0
        return True, self._unreported.pop(key, 0)

    def take_suppressed(self) -> dict[Hashable, int]:
        """Lines suppressed and not yet reported, by key (and forget them)."""
        out, self._unreported = self._unreported, {}
        return out


def suppressed_note(suppressed: int) -> str:
    """`` (N similar lines suppressed)`` for a log line, or nothing."""
    return f" ({suppressed} similar lines suppressed)" if suppressed else ""
