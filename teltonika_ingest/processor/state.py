"""The last position of each device, in a bounded LRU (least recently updated evicted).

Filled from ``last_positions`` the first time a device is seen after a restart or an
eviction (the consumer loads every cold device of a batch in one query), then kept current
by the writer. It decides which devices move ``last_positions`` forward (an old resend
does not), and is what the live feed reads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from teltonika_ingest.processor.writer import LastPosition

__all__ = ["DeviceState"]


class DeviceState:
    def __init__(
        self,
        capacity: int,
        *,
        on_size: Callable[[int], object] = lambda n: None,
        on_evict: Callable[[int], object] = lambda n: None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._items: OrderedDict[str, LastPosition | None] = OrderedDict()
        self._on_size = on_size
        self._on_evict = on_evict

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._items

    def get(self, device_id: str) -> LastPosition | None:
        """The known last position (None: none known, or the device is cold)."""
        return self._items.get(device_id)

    def cold(self, device_ids: set[str]) -> set[str]:
        """The devices of this set not in memory (their last position must be loaded)."""
        return {d for d in device_ids if d not in self._items}

    def seed(self, device_id: str, last: LastPosition | None) -> None:
        """Remember a device loaded from ``last_positions`` (None: it has no row yet)."""
        if device_id not in self._items:
            self._put(device_id, last)

    def advances(self, device_id: str, last: LastPosition) -> bool:
        """Whether ``last`` is newer than the known position."""
        known = self._items.get(device_id)
        return known is None or last.ts > known.ts

    def update(self, device_id: str, last: LastPosition) -> None:
        """Record ``last`` if it is newer than the known position."""
        if self.advances(device_id, last):
            self._put(device_id, last)

    def forget(self, device_id: str) -> bool:
        """Drop one device (it is loaded again from ``last_positions`` when it reports)."""
        found = self._items.pop(device_id, False) is not False
        self._on_size(len(self._items))
        return found

    def _put(self, device_id: str, last: LastPosition | None) -> None:
        items = self._items
        items[device_id] = last
        items.move_to_end(device_id)
        evicted = 0
        while len(items) > self.capacity:
            items.popitem(last=False)
            evicted += 1
        if evicted:
            self._on_evict(evicted)
        self._on_size(len(items))
