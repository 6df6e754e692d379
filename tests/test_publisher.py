"""Publisher: one script call per batch of packets, back-pressure at max_inflight, drain,
failure reasons."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from teltonika_ingest.codec import AvlPacket
from teltonika_ingest.redis.client import RedisTimeout, RedisUnavailable
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.publisher import (
    DEAD_LETTER_SCRIPT,
    PUBLISH_SCRIPT,
    Publisher,
    PublishOverflow,
)
from teltonika_ingest.server.tap import raise_open_files_limit

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

    def test_one_script_call_per_pass_with_every_packet_in_order(self) -> None:
        a = self.publisher.publish("356307042441013", self.packet, 1_700_000_000_123)
        b = self.publisher.publish("356307042441014", self.packet, 1_700_000_000_124)
        self.assertEqual(self.redis.scripts, [])  # sent at the end of this pass of the loop
        self.clock.advance(0)
        ((script, keys, args, d),) = self.redis.scripts
        self.assertIs(script, PUBLISH_SCRIPT)
        self.assertEqual(keys, ["telemetry:teltonika"])
        self.assertEqual(args[0], "1000")
        self.assertEqual(args[1:4], ["356307042441013", "8E", 2])
        self.assertEqual(args[4], "2023-11-14T22:13:20.000Z")
        self.assertIn(b'"received_at":"2023-11-14T22:13:20.123Z"', args[5])
        self.assertEqual(args[6], "2023-11-14T22:13:21.000Z")
        self.assertEqual(args[8:11], ["356307042441014", "8E", 2])
        self.assertIn(b'"device_id":"356307042441014"', args[12])
        self.assertEqual(len(args), 1 + 2 * (3 + 2 * 2))
        self.assertNoResult(a)
        d.callback(4)
        self.assertEqual(self.successResultOf(a), 2)
        self.assertEqual(self.successResultOf(b), 2)
        self.assertEqual(self.sample("teltonika_publish_inflight"), 0)

    def test_a_full_batch_is_sent_at_once(self) -> None:
        self.publisher.batch_max_records = 3
        self.publisher.publish("1", self.packet, 0)
        self.assertEqual(self.redis.scripts, [])
        self.publisher.publish("2", self.packet, 0)  # 4 records >= 3: sent now
        self.assertEqual(len(self.redis.scripts), 1)
        self.clock.advance(0)  # the pass-end flush finds nothing left
        self.assertEqual(len(self.redis.scripts), 1)
        self.redis.scripts[0][3].callback(4)  # max_inflight 2: make room
        self.publisher.batch_max_bytes = 10
        self.publisher.publish("3", self.packet, 0)  # over the byte bound: sent now
        self.assertEqual(len(self.redis.scripts), 2)

    def test_compiled_frame_publishes_the_same_payloads(self) -> None:
        from teltonika_ingest.codec import Framer, encode_avl_frame

        raw = encode_avl_frame(self.packet)
        framer = Framer(expect_handshake=False)
        framer.feed(raw)
        frame = framer.next_event()
        assert frame is not None
        self.assertIsNotNone(frame.parts)  # type: ignore[union-attr]
        self.publisher.publish_frame("356307042441013", frame, 5)  # type: ignore[arg-type]
        self.publisher.publish("356307042441013", self.packet, 5)
        self.clock.advance(0)
        ((_, _, args, _),) = self.redis.scripts

        def text(items: list[Any]) -> list[Any]:
            return [a.decode() if isinstance(a, bytes) else a for a in items]

        compiled, python = text(args[1:8]), text(args[8:15])
        self.assertEqual(compiled, python)

    def test_backpressure_waits_then_refuses(self) -> None:
        pressure: list[bool] = []
        self.publisher.pressure_hooks.append(pressure.append)
        first = self.publisher.publish("1", self.packet, 0)
        self.publisher.publish("2", self.packet, 0)
        self.clock.advance(0)
        self.assertEqual(self.sample("teltonika_publish_inflight"), 2)
        third = self.publisher.publish("3", self.packet, 0)  # waits for a slot
        self.assertEqual(pressure, [])  # one waiting: reading goes on
        fourth = self.publisher.publish("4", self.packet, 0)
        self.assertEqual(pressure, [True])  # as many waiting as in flight: pause
        self.assertEqual(self.sample("teltonika_publish_waiting"), 2)
        self.assertEqual(self.sample("teltonika_publish_backpressure_total"), 1)
        self.publisher.max_waiting = 2  # (8 x max_inflight by default)
        fifth = self.publisher.publish("5", self.packet, 0)  # as many waiting: refused
        self.failureResultOf(fifth, PublishOverflow)
        self.assertEqual(self.sample("teltonika_publish_overflow_total"), 1)
        self.assertEqual(self.sample("teltonika_publish_failures_total", reason="overflow"), 1)
        self.clock.advance(0)
        self.assertEqual(len(self.redis.scripts), 1)  # nothing sent past the bound
        self.redis.scripts[0][3].callback(4)
        self.assertEqual(self.successResultOf(first), 2)
        self.assertEqual(self.sample("teltonika_publish_waiting"), 0)
        self.assertEqual(pressure, [True, False])  # none waits: reading resumes
        self.clock.advance(0)
        ((_, _, args, d),) = self.redis.scripts[1:]
        self.assertEqual((args[1], args[8]), ("3", "4"))  # in arrival order
        d.callback(4)
        self.assertEqual(self.successResultOf(third), 2)
        self.assertEqual(self.successResultOf(fourth), 2)
        self.publisher.publish("6", self.packet, 0)  # room again
        self.clock.advance(0)
        self.assertEqual(len(self.redis.scripts), 3)

    def test_failures_counted_by_reason_and_duration_observed(self) -> None:
        results = [self.publisher.publish("1", self.packet, 0) for _ in range(2)]
        self.clock.advance(0)
        self.clock.advance(0.002)
        self.redis.scripts[0][3].errback(RedisTimeout("no answer"))
        self.failureResultOf(results[0], RedisTimeout)
        self.failureResultOf(results[1], RedisTimeout)
        self.assertEqual(self.sample("teltonika_publish_failures_total", reason="timeout"), 2)
        self.publisher.publish("1", self.packet, 0).addErrback(lambda _: None)
        self.clock.advance(0)
        self.redis.scripts[1][3].errback(RedisUnavailable("not connected"))
        self.assertEqual(self.sample("teltonika_publish_failures_total", reason="unavailable"), 1)
        self.assertEqual(self.sample("teltonika_publish_duration_seconds_count"), 0)
        d = self.publisher.publish("1", self.packet, 0)
        self.clock.advance(0)
        self.clock.advance(0.003)
        self.redis.scripts[2][3].callback(2)
        self.successResultOf(d)
        self.assertEqual(self.sample("teltonika_publish_duration_seconds_count"), 1)
        self.assertAlmostEqual(self.sample("teltonika_publish_duration_seconds_sum"), 0.003)

    def test_drain_fires_when_nothing_in_flight(self) -> None:
        a = self.publisher.publish("1", self.packet, 0)
        drained = self.publisher.drain()
        self.assertNoResult(drained)  # batched, not even sent yet
        self.clock.advance(0)
        self.assertNoResult(drained)
        self.redis.scripts[0][3].callback(2)
        self.successResultOf(a)
        self.successResultOf(drained)
        self.successResultOf(self.publisher.drain())

    def test_dead_letter_fields(self) -> None:
        self.publisher.dead_letter("356307042441013", "8E", "malformed: x", b"\x00\x01", 0)
        ((script, keys, args, _d),) = self.redis.scripts
        self.assertIs(script, DEAD_LETTER_SCRIPT)
        self.assertEqual(keys, ["telemetry:teltonika:dlq"])
        self.assertEqual(args[:2], ["1000", 0])  # MAXLEN ~ 1000, no byte bound
        fields = dict(zip(args[2::2], args[3::2], strict=True))
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

    def test_dead_letter_waits_for_a_slot_like_a_packet(self) -> None:
        """At --max-inflight a dead letter waits (and keeps its device) instead of being
        refused: the device is ACKed once the frame is in the dead-letter stream."""
        self.publisher.publish("1", self.packet, 0)
        self.publisher.publish("2", self.packet, 0)
        self.clock.advance(0)  # a batch of two in flight: max_inflight 2
        dead = self.publisher.dead_letter("3", "8E", "malformed: x", b"\x00", 0)
        self.assertNoResult(dead)
        self.assertEqual(len(self.redis.scripts), 1)  # not sent yet
        self.assertEqual(self.sample("teltonika_publish_waiting"), 1)
        drained = self.publisher.drain()
        self.redis.scripts[0][3].callback(4)  # slots free: the dead letter goes
        ((script, keys, _args, d),) = self.redis.scripts[1:]
        self.assertEqual((script, keys), (DEAD_LETTER_SCRIPT, ["telemetry:teltonika:dlq"]))
        self.assertNoResult(drained)
        d.callback(b"1-0")
        self.assertEqual(self.successResultOf(dead), b"1-0")
        self.successResultOf(drained)
        self.assertEqual(self.sample("teltonika_publish_overflow_total"), 0)
        self.assertEqual(self.sample("teltonika_publish_inflight"), 0)

    def test_dead_letters_past_the_waiting_room_are_refused(self) -> None:
        self.publisher.publish("1", self.packet, 0)
        self.publisher.publish("2", self.packet, 0)
        self.clock.advance(0)
        self.publisher.max_waiting = 1
        waiting = self.publisher.dead_letter("3", "8E", "malformed: x", b"\x00", 0)
        refused = self.publisher.dead_letter("4", "8E", "malformed: x", b"\x00", 0)
        self.assertNoResult(waiting)
        self.failureResultOf(refused, PublishOverflow)
        self.assertEqual(self.sample("teltonika_publish_failures_total", reason="overflow"), 1)


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
