"""The live feed's broadcast reader: what it says when Redis is not there (yet)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import defer, task
from twisted.logger import LogLevel, globalLogPublisher

from teltonika_ingest.processor.live.metrics import LiveMetrics
from teltonika_ingest.processor.live.reader import BroadcastReader
from teltonika_ingest.redis.client import RedisUnavailable


class _NeverThere:
    """A Redis client that never connects (or, once ``ever_connected``, lost its link)."""

    command_timeout = 1.0

    def __init__(self) -> None:
        self.ever_connected = False
        self.calls = 0

    def execute(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls += 1
        state = "reconnecting" if self.ever_connected else "connecting"
        return defer.fail(RedisUnavailable(state))


def _run(redis: _NeverThere, clock: task.Clock, retries: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "teltonika_ingest.processor.live.reader":
            events.append(event)

    registry = CollectorRegistry()
    reader = BroadcastReader(
        redis,  # type: ignore[arg-type]
        "telemetry:teltonika",
        decode=lambda fields: None,  # type: ignore[arg-type,return-value]
        publish=lambda position: None,
        metrics=LiveMetrics.create(registry),
        reactor=clock,
        retry_delay=1.0,
    )
    globalLogPublisher.addObserver(observe)
    try:
        reader.startService()
        for _ in range(retries):
            clock.advance(1.0)
        reader.stopService()
        clock.advance(1.0)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert redis.calls == retries + 1  # it kept trying, once a retry delay
    assert registry.get_sample_value("processor_live_reads_total", {"result": "error"}) == (
        retries + 1
    )
    return events


def test_not_connected_yet_is_no_warning() -> None:
    """At start the stream's Redis may still be starting (make run starts both services at
    once): retried quietly, no warning, no object repr."""
    events = _run(_NeverThere(), task.Clock(), retries=5)
    assert [e for e in events if e["log_level"] >= LogLevel.warn] == []


def test_lost_connection_is_one_warning_with_the_reason() -> None:
    redis = _NeverThere()
    redis.ever_connected = True
    events = _run(redis, task.Clock(), retries=5)
    warnings = [e for e in events if e["log_level"] >= LogLevel.warn]
    assert len(warnings) == 1
    assert warnings[0]["error"] == "reconnecting"  # the reason, not RedisUnavailable('...')
