"""The idle deadlines (``--idle-timeout``) of every connection, on one timer.

A Twisted ``DelayedCall`` per connection costs ~420 bytes (the call, its bound methods and
arguments) and a place in the reactor's timer heap, which every other ``callLater`` then sifts
through: at 100,000 connections, ~40 MB and 17 comparisons per timer. Here a connection is one
entry in the set of the second its deadline falls in, and one ``DelayedCall`` waits for the
earliest second. A deadline fires up to a second late (it is rounded up to the second), which
for a timeout of minutes does not matter.

A connection's deadline is checked, not enforced: the owner's ``check`` decides whether it
really was idle (activity since moves it on: the owner watches it again), so activity costs
nothing here.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class IdleWheel(Generic[T]):
    def __init__(self, clock: Any, check: Callable[[T], None]) -> None:
        self.clock = clock
        self.check = check
        self._buckets: dict[int, set[T]] = {}
        self._seconds: list[int] = []  # heap of the buckets' seconds
        self._call: Any = None
        self._call_at: int | None = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def watch(self, item: T, deadline: float) -> int:
        """Check ``item`` once ``deadline`` has passed; returns its slot (for :meth:`forget`)."""
        second = math.ceil(deadline)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = set()
            heapq.heappush(self._seconds, second)
        bucket.add(item)
        if self._call_at is None or second < self._call_at:
            self._schedule(second)
        return second

    def forget(self, item: T, slot: int) -> None:
        """``item`` is gone (closed): not checked, not kept alive. The wheel holds no timer
        once nothing is watched."""
        bucket = self._buckets.get(slot)
        if bucket is None:
            return
        bucket.discard(item)
        if not bucket:
            del self._buckets[slot]  # its second stays in the heap until popped
            if not self._buckets:
                self.stop()

    def _schedule(self, second: int) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call_at = second
        self._call = self.clock.callLater(max(0.0, second - self.clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._call = self._call_at = None
        now = self.clock.seconds()
        due: list[T] = []
        while self._seconds and self._seconds[0] <= now:
            second = heapq.heappop(self._seconds)
            due.extend(self._buckets.pop(second, ()))
        # buckets emptied by forget() are dropped without a timer of their own
        while self._seconds and not self._buckets.get(self._seconds[0]):
            self._buckets.pop(heapq.heappop(self._seconds), None)
        if self._seconds:
            self._schedule(self._seconds[0])
        for item in due:
            self.check(item)

    def stop(self) -> None:
        """Forget everything and cancel the timer (a stopping service)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._call_at = None
        self._buckets.clear()
        self._seconds.clear()
