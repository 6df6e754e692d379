"""Publisher: one script call per packet, bounded in-flight publishes, drain, failure reasons."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from teltonika_ingest.codec import AvlPacket
from teltonika_ingest.metrics import Metrics
from teltonika_ingest.publisher import PUBLISH_SCRIPT, Publisher, PublishOverflow
from teltonika_ingest.redisclient import RedisTimeout, RedisUnavailable
from teltonika_ingest.tap import raise_open_files_limit

from support import make_record


class FakeRedis:
    def __init__(self) -> None:
        self.scripts: list[tuple[Any, list[Any], list[Any], defer.Deferred[Any]]] = []
        self.commands: list[tuple[Any, ...]] = []

    def run_script(self, script: Any, keys: list[Any], args: list[Any]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.scripts.append((script, keys, args, d))
        return d

    def execute(self, *args: Any) -> defer.Deferred[Any]:
        self.commands.append(args)
        return defer.succeed(b"1-0")


class PublisherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.redis = FakeRedis()
        self.metrics = Metrics()
        self.clock = Clock()
        self.publisher = Publisher(
            self.redis,  # type: ignore[arg-type]
            stream="telemetry:teltonika",
            maxlen=1000,
            max_inflight=2,
            metrics=self.metrics,
            clock=self.clock,
            instance_id="a",
        )
        self.packet = AvlPacket(codec="8E", records=(make_record(0), make_record(1)))

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels or None) or 0.0

    def test_one_script_call_with_every_record_in_order(self) -> None:
        self.publisher.publish("356307042441013", self.packet, 1_700_000_000_123)
        ((script, keys, args, _),) = self.redis.scripts
        self.assertIs(script, PUBLISH_SCRIPT)
        self.assertEqual(keys, ["telemetry:teltonika"])
        self.assertEqual(args[:3], ["1000", "356307042441013", "8E"])
        self.assertEqual(len(args), 3 + 2 * 2)
        self.assertEqual(args[3], "2023-11-14T22:13:20.000Z")
        self.assertIn(b'"received_at":"2023-11-14T22:13:20.123Z"', args[4])
        self.assertEqual(args[5], "2023-11-14T22:13:21.000Z")

    def test_overflow_refused_and_counted(self) -> None:
        first = self.publisher.publish("1", self.packet, 0)
        self.publisher.publish("2", self.packet, 0)
        third = self.publisher.publish("3", self.packet, 0)
        self.failureResultOf(third, PublishOverflow)
        self.assertEqual(len(self.redis.scripts), 2)
        self.assertEqual(self.sample("teltonika_publish_overflow_total"), 1)
        self.assertEqual(self.sample("teltonika_publish_failures_total", reason="overflow"), 1)
        self.assertEqual(self.sample("teltonika_publish_inflight"), 2)
        self.redis.scripts[0][3].callback(2)
        self.assertEqual(self.successResultOf(first), 2)
        self.publisher.publish("4", self.packet, 0)  # room again
        self.assertEqual(len(self.redis.scripts), 3)

    def test_failures_counted_by_reason_and_duration_observed(self) -> None:
        results = [self.publisher.publish("1", self.packet, 0) for _ in range(2)]
        self.clock.advance(0.002)
        self.redis.scripts[0][3].errback(RedisTimeout("no answer"))
        self.redis.scripts[1][3].errback(RedisUnavailable("not connected"))
        self.failureResultOf(results[0], RedisTimeout)
        self.failureResultOf(results[1], RedisUnavailable)
        self.assertEqual(self.sample("teltonika_publish_failures_total", reason="timeout"), 1)
        self.assertEqual(self.sample("teltonika_publish_failures_total", reason="unavailable"), 1)
        self.assertEqual(self.sample("teltonika_publish_duration_seconds_count"), 0)
        d = self.publisher.publish("1", self.packet, 0)
        d.addErrback(lambda _: None)
        self.clock.advance(0.003)
        self.redis.scripts[2][3].callback(2)
        self.assertEqual(self.sample("teltonika_publish_duration_seconds_count"), 1)
        self.assertAlmostEqual(self.sample("teltonika_publish_duration_seconds_sum"), 0.003)

    def test_drain_fires_when_nothing_in_flight(self) -> None:
        a = self.publisher.publish("1", self.packet, 0)
        drained = self.publisher.drain()
        self.assertNoResult(drained)
        self.redis.scripts[0][3].callback(2)
        self.successResultOf(a)
        self.successResultOf(drained)
        self.successResultOf(self.publisher.drain())

    def test_dead_letter_fields(self) -> None:
        self.publisher.dead_letter("356307042441013", "8E", "malformed: x", b"\x00\x01", 0)
        (cmd,) = self.redis.commands
        self.assertEqual(cmd[:6], ("XADD", "telemetry:teltonika:dlq", "MAXLEN", "~", "1000", "*"))
        fields = dict(zip(cmd[6::2], cmd[7::2], strict=True))
        self.assertEqual(
            fields,
            {
                "imei": "356307042441013",
                "codec": "8E",
                "reason": "malformed: x",
                "raw_b64": "AAE=",
                "received_at": "1970-01-01T00:00:00.000Z",
                "instance_id": "a",
            },
        )


class OpenFilesTests(SynchronousTestCase):
    def test_soft_limit_raised_to_hard(self) -> None:
        import resource

        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, before[1]), before[1]))
            soft, hard = raise_open_files_limit()
            self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], soft)
            if hard != resource.RLIM_INFINITY:
                self.assertEqual(soft, hard)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, before)
