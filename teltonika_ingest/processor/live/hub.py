"""Subscriptions and fan-out: which clients get which device's positions.

A position is encoded and framed once (autobahn's ``prepareMessage``) and the same frame is
handed to every subscriber; each client then decides, by its own back-pressure state,
whether to write it now or keep it as the newest pending position of that device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .access import Access
from .messages import Position, encode_position
from .metrics import LiveMetrics

__all__ = ["Hub", "Subscriber"]


class Subscriber(Protocol):
    access: Access | None
    subscribed: set[str]
    everything: bool

    def deliver(self, position: Position, prepared: Any, size: int) -> None: ...


class Hub:
    """The subscription index of one live feed.

    ``subscribed``/``everything`` on each subscriber mirror the index (the client reads them,
    only the hub writes them). ``everything`` is a ``"*"`` subscription with a token that
    sees every device; a ``"*"`` with a scoped token is the token's device list.
    """

    def __init__(
        self,
        metrics: LiveMetrics,
        prepare: Callable[[bytes], Any],
        now_ms: Callable[[], int],
    ) -> None:
        self._metrics = metrics
        self._prepare = prepare
        self._now_ms = now_ms
        self._by_device: dict[str, set[Subscriber]] = {}
        self._everything: set[Subscriber] = set()
        self._count = 0  # subscriptions (the gauge)

    # -- subscriptions ------------------------------------------------------

    def subscribe(self, client: Subscriber, devices: Iterable[str] | None) -> None:
        """Add ``devices`` (None: everything; only for a token that sees every device)."""
        if devices is None:
            if not client.everything:
                self._remove(client, set(client.subscribed))
                client.everything = True
                self._everything.add(client)
                self._count += 1
        elif not client.everything:
            for device in devices:
                if device in client.subscribed:
                    continue
                client.subscribed.add(device)
                self._by_device.setdefault(device, set()).add(client)
                self._count += 1
        self._metrics.subscriptions.set(self._count)

    def unsubscribe(self, client: Subscriber, devices: Iterable[str] | None) -> None:
        """Remove ``devices`` (None: all of the client's subscriptions)."""
        if devices is None:
            if client.everything:
                client.everything = False
                self._everything.discard(client)
                self._count -= 1
            self._remove(client, set(client.subscribed))
        else:
            self._remove(client, set(devices) & client.subscribed)
        self._metrics.subscriptions.set(self._count)

    def _remove(self, client: Subscriber, devices: set[str]) -> None:
        for device in devices:
            client.subscribed.discard(device)
            subs = self._by_device.get(device)
            if subs is not None:
                subs.discard(client)
                if not subs:
                    del self._by_device[device]
            self._count -= 1

    def drop(self, client: Subscriber) -> None:
        """The client is gone."""
        self.unsubscribe(client, None)

    # -- fan-out -------------------------------------------------------------

    def publish(self, position: Position) -> int:
        """Hand one position to its subscribers; returns how many got it."""
        subs = self._by_device.get(position.device_id)
        everything = self._everything
        if not subs and not everything:
            return 0
        now = self._now_ms()
        payload = encode_position(position, now)
        prepared = self._prepare(payload)
        size = len(payload)
        n = 0
        for group in (subs, everything):
            if group:
                for client in tuple(group):  # a delivery may close (and drop) a client
                    client.deliver(position, prepared, size)
                    n += 1
        if position.entry_ms is not None:
            self._metrics.lag.observe(max(0, self._now_ms() - position.entry_ms) / 1000.0)
        return n
