"""No false alarms at start: build info, labelled series present at 0, no ``_created``
series, HELP texts naming what is counted, and registry/heartbeat writes that fail only
because Redis has not answered yet are not counted as failures."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest
from twisted.internet import defer, task

from teltonika_ingest.buildinfo import build_info
from teltonika_ingest.redis.client import RedisTimeout, RedisUnavailable
from teltonika_ingest.server import metrics as metrics_module
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.publisher import PublishOverflow, failure_reason
from teltonika_ingest.server.registry import Registry

ZERO_AT_START = {
    "teltonika_publish_failures_total": ("reason", metrics_module.PUBLISH_FAILURE_REASONS),
    "teltonika_dead_letters_total": ("reason", metrics_module.DEAD_LETTER_REASONS),
    "teltonika_udp_datagrams_total": ("result", metrics_module.UDP_RESULTS),
    "teltonika_handshakes_total": ("result", metrics_module.HANDSHAKE_RESULTS),
    "teltonika_commands_total": ("status", metrics_module.COMMAND_STATUSES),
    "teltonika_records_total": ("codec", metrics_module.AVL_CODECS),
}


def test_build_info() -> None:
    m = Metrics()
    info = build_info()
    assert set(info) == {"version", "python", "twisted", "compiled"}
    assert info["compiled"] in ("on", "off", "not_built")
    assert m.registry.get_sample_value("teltonika_build_info", info) == 1.0


@pytest.mark.parametrize("name", sorted(ZERO_AT_START))
def test_labelled_series_exist_at_zero_and_help_names_them(name: str) -> None:
    m = Metrics()
    label, values = ZERO_AT_START[name]
    for value in values:
        assert m.registry.get_sample_value(name, {label: value}) == 0.0, value
    family = name.removesuffix("_total")
    [meta] = [f for f in m.registry.collect() if f.name == family]
    for value in values:
        assert value in meta.documentation, (value, meta.documentation)


def test_no_created_series() -> None:
    text = generate_latest(Metrics().registry).decode()
    assert "teltonika_records_total" in text
    assert "_created" not in text


def test_publish_failure_reasons_are_the_precreated_ones() -> None:
    reasons = {
        failure_reason(exc)
        for exc in (RedisTimeout(), RedisUnavailable(), PublishOverflow(), ValueError())
    }
    assert reasons == set(metrics_module.PUBLISH_FAILURE_REASONS)


class FailingRedis:
    """Every command fails with ``error``; ``ever_connected`` as given."""

    def __init__(self, error: Exception, ever_connected: bool) -> None:
        self.error = error
        self.ever_connected = ever_connected

    def execute(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.fail(self.error)

    def run_script(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.fail(self.error)


@pytest.mark.parametrize(
    ("error", "ever_connected", "counted"),
    [
        (RedisUnavailable("connecting"), False, 0),  # start-up: redone on connect
        (RedisUnavailable("reconnecting"), True, 1),  # lost later: a real failure
        (RedisTimeout("slow"), False, 1),  # connected but not answering
    ],
)
def test_registry_writes_before_redis_first_answered_are_not_failures(
    error: Exception, ever_connected: bool, counted: int
) -> None:
    m = Metrics()
    reg = Registry(
        FailingRedis(error, ever_connected),  # type: ignore[arg-type]
        instance_id="i",
        metrics=m,
        clock=task.Clock(),
    )
    reg.register("356307042441013")
    reg.register_many(["356307042441014"])
    reg.beat()
    reg.sweep()
    value = m.registry.get_sample_value
    assert value("teltonika_registry_failures_total") == 3 * counted
    assert value("teltonika_heartbeat_failures_total") == counted


def test_literal_label_values_in_the_code_are_precreated() -> None:
    """A label value the code uses literally is one of those created at 0 at start (a new
    value added to the code but not to the tuple would appear only on its first event)."""
    import re
    from pathlib import Path

    source = "\n".join(
        p.read_text(encoding="utf-8")
        for p in (Path(__file__).parent.parent / "teltonika_ingest" / "server").rglob("*.py")
    )
    for attr, label, values in (
        ("udp_datagrams", "result", metrics_module.UDP_RESULTS),
        ("publish_failures", "reason", metrics_module.PUBLISH_FAILURE_REASONS),
        ("handshakes", "result", metrics_module.HANDSHAKE_RESULTS),
        ("commands", "status", metrics_module.COMMAND_STATUSES),
    ):
        used = set(re.findall(rf'\.{attr}\.labels\({label}="(\w+)"\)', source))
        assert used, attr
        assert used <= set(values), (attr, used - set(values))


def test_publish_failures_of_a_fleet_are_a_few_lines_a_minute() -> None:
    """Redis away fails every device's publish: the error and close lines are bounded for
    the fleet (not per device), the next window says how many were suppressed, and the
    metrics count every one."""
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    from teltonika_ingest.server.budget import WINDOW_S

    from support import Harness, avl_frame

    seen: list[Any] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        h = Harness()

        def fail_one(port: int) -> None:
            proto, _transport = h.handshaken(port=port, imei=f"35630704{port:07d}")
            proto.dataReceived(avl_frame(1))
            h.publisher.calls[-1][2].errback(RedisUnavailable("connecting"))

        for i in range(20):
            fail_one(41000 + i)
        h.clock.advance(WINDOW_S + 1)
        fail_one(42000)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    errors = [formatEvent(e) for e in seen if e.get("log_level") is LogLevel.error]
    closes = [
        formatEvent(e)
        for e in seen
        if e.get("log_level") is LogLevel.warn and "publish_failed" in formatEvent(e)
    ]
    burst = h.factory.log_limit.burst
    assert len(errors) == burst + 1 and len(closes) == burst + 1, (errors, closes)
    assert errors[-1].endswith(f"({20 - burst} similar lines suppressed)")
    assert h.sample("teltonika_disconnects_total", reason="publish_failed") == 21


def test_registry_failures_of_a_fleet_are_a_few_lines_a_minute() -> None:
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    from teltonika_ingest.server.budget import WINDOW_S

    seen: list[Any] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        m = Metrics()
        clock = task.Clock()
        reg = Registry(
            FailingRedis(RedisUnavailable("reconnecting"), True),  # type: ignore[arg-type]
            instance_id="i",
            metrics=m,
            clock=clock,
        )
        for i in range(20):
            reg.register(f"35630704{i:07d}")
        clock.advance(WINDOW_S + 1)
        reg.register("356307049999999")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [
        formatEvent(e)
        for e in seen
        if e.get("log_level") is LogLevel.warn and "registry register failed" in formatEvent(e)
    ]
    burst = reg.log_limit.burst
    assert len(lines) == burst + 1, lines
    assert lines[-1].endswith(f"({20 - burst} similar lines suppressed)")
    assert m.registry.get_sample_value("teltonika_registry_failures_total") == 21
