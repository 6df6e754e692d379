"""Event-loop health: how late timers fire (reactor lag) and how long the garbage collector
pauses the process, as metrics. Both explain a slow ACK that Redis did not cause (see
docs/profile.md, "Tail latency").
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Histogram
from twisted.application import service
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: how often the lag probe fires: 10 wake-ups a second cost nothing measurable
LAG_INTERVAL = 0.1


class ReactorLagMonitor(service.Service):
    """Schedules a timer every ``interval`` s and observes how late it fired.

    A timer fires late when the event loop was busy with other work (a long callback, a big
    batch of readable sockets, a GC pause) or the process was not scheduled (CPU contention):
    every ACK due in that moment is late by as much. Lateness is measured on ``now``
    (monotonic by default: a wall-clock step is not a stall)."""

    def __init__(
        self,
        histogram: Histogram,
        clock: IReactorTime,
        *,
        interval: float = LAG_INTERVAL,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.histogram = histogram
        self.clock = clock
        self.interval = interval
        self.now = now
        self._due = 0.0
        self._call: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def stopService(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        super().stopService()

    def _schedule(self) -> None:
        self._due = self.now() + self.interval
        self._call = self.clock.callLater(self.interval, self._fired)

    def _fired(self) -> None:
        self.histogram.observe(max(0.0, self.now() - self._due))
        self._schedule()


class GcPauseMonitor(service.Service):
    """Observes each garbage collection's duration by generation (``gc.callbacks``).

    The callback runs inside the collector, so it only takes a timestamp; it is removed when
    the service stops (tests build many services in one process)."""

    def __init__(self, histogram: Histogram, *, now: Callable[[], float] = time.perf_counter):
        self.now = now
        self._children = {str(g): histogram.labels(generation=str(g)) for g in range(3)}
        self._started = 0.0

    def startService(self) -> None:
        super().startService()
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stopService(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        super().stopService()

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self.now()
            return
        child = self._children.get(str(info.get("generation")))
        if child is not None:
            child.observe(self.now() - self._started)
