"""Where a slow ACK comes from: reactor lag, GC pauses, frame -> publish call, Redis reply ->
ACK. Each metric moves when its event happens."""

from __future__ import annotations

import gc

from test_publisher import FakeRedis
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from teltonika_ingest.codec import AvlPacket
from teltonika_ingest.ops.loophealth import GcPauseMonitor, ReactorLagMonitor
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.publisher import Publisher

from support import IMEI, Harness, avl_frame, make_record


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


class ReactorLagTests(SynchronousTestCase):
    def test_lateness_of_the_periodic_timer_is_observed(self) -> None:
        metrics, clock = Metrics(), Clock()
        monitor = ReactorLagMonitor(metrics.reactor_lag, clock, interval=0.1, now=clock.seconds)
        monitor.startService()
        clock.advance(0.1)  # on time
        self.assertEqual(sample(metrics, "teltonika_reactor_lag_seconds_count"), 1)
        self.assertEqual(sample(metrics, "teltonika_reactor_lag_seconds_sum"), 0)
        clock.advance(0.4)  # the loop was stuck: the next tick fires 0.3 s late
        self.assertEqual(sample(metrics, "teltonika_reactor_lag_seconds_count"), 2)
        self.assertAlmostEqual(sample(metrics, "teltonika_reactor_lag_seconds_sum"), 0.3)
        self.assertEqual(sample(metrics, "teltonika_reactor_lag_seconds_bucket", le="0.25"), 1)
        self.assertEqual(sample(metrics, "teltonika_reactor_lag_seconds_bucket", le="0.5"), 2)
        monitor.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class GcPauseTests(SynchronousTestCase):
    def test_collections_observed_by_generation_until_stopped(self) -> None:
        metrics = Metrics()
        monitor = GcPauseMonitor(metrics.gc_pause)
        monitor.startService()
        try:
            gc.collect(0)
            gc.collect(2)
        finally:
            monitor.stopService()
        count = "teltonika_gc_pause_seconds_count"
        self.assertGreaterEqual(sample(metrics, count, generation="0"), 1)
        self.assertGreaterEqual(sample(metrics, count, generation="2"), 1)
        self.assertGreater(sample(metrics, "teltonika_gc_pause_seconds_sum", generation="2"), 0)
        before = sample(metrics, count, generation="2")
        gc.collect(2)
        self.assertEqual(sample(metrics, count, generation="2"), before)  # callback removed
        self.assertNotIn(monitor._callback, gc.callbacks)


class FrameToPublishTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics, self.clock, self.redis = Metrics(), Clock(), FakeRedis()
        self.publisher = Publisher(
            self.redis,  # type: ignore[arg-type]
            stream="telemetry:teltonika",
            maxlen=0,
            max_inflight=1,
            metrics=self.metrics,
            clock=self.clock,
            instance_id="a",
        )
        self.packet = AvlPacket(codec="8E", records=(make_record(0),))

    def test_wait_until_the_publish_call_including_a_wait_for_a_slot(self) -> None:
        self.clock.advance(10)
        self.publisher.publish("1", self.packet, 0, frame_at=9.75)
        self.publisher.publish("2", self.packet, 0, frame_at=10.0)  # waits: max_inflight 1
        name = "teltonika_frame_to_publish_seconds"
        self.assertEqual(sample(self.metrics, name + "_count"), 0)  # not sent yet
        self.clock.advance(0)
        self.assertEqual(sample(self.metrics, name + "_count"), 1)
        self.assertAlmostEqual(sample(self.metrics, name + "_sum"), 0.25)
        self.clock.advance(0.5)
        self.redis.scripts[0][3].callback(1)  # slot free: the second one is sent
        self.assertEqual(self.publisher.replied_at, 10.5)
        self.clock.advance(0)
        self.assertEqual(len(self.redis.scripts), 2)
        self.assertEqual(sample(self.metrics, name + "_count"), 2)
        self.assertAlmostEqual(sample(self.metrics, name + "_sum"), 0.75)

    def test_without_a_frame_time_the_enqueue_time_counts(self) -> None:
        self.clock.advance(3)
        self.publisher.publish("1", self.packet, 0)
        self.clock.advance(0.125)
        self.publisher._flush()
        self.assertAlmostEqual(
            sample(self.metrics, "teltonika_frame_to_publish_seconds_sum"), 0.125
        )


class ReplyToAckTests(SynchronousTestCase):
    def test_time_from_the_reply_to_the_ack_write(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        h.clock.advance(5)
        proto.dataReceived(avl_frame(2))
        self.assertEqual(h.publisher.frame_times, [5.0])  # the frame's time reaches publish
        h.clock.advance(1)
        h.publisher.replied_at = 5.75  # the batch's reply came 0.25 s before this callback
        h.publisher.calls[0][2].callback(2)
        self.assertNotEqual(transport.value(), b"")
        self.assertEqual(h.sample("teltonika_reply_to_ack_seconds_count"), 1)
        self.assertAlmostEqual(h.sample("teltonika_reply_to_ack_seconds_sum"), 0.25)
        self.assertAlmostEqual(h.sample("teltonika_ack_latency_seconds_sum"), 1.0)

    def test_udp_ack(self) -> None:
        from test_udp import FakeUdpTransport

        from teltonika_ingest.codec import UdpPacket, encode_udp_datagram
        from teltonika_ingest.server.udp import UdpListener

        from support import FakePublisher

        metrics, clock, publisher = Metrics(), Clock(), FakePublisher()
        listener = UdpListener(
            publisher=publisher,  # type: ignore[arg-type]
            metrics=metrics,
            clock=clock,
            dedup_window=60,
        )
        listener.transport = FakeUdpTransport()  # type: ignore[assignment]
        clock.advance(2)
        packet = AvlPacket(codec="8E", records=(make_record(0),))
        listener.datagramReceived(
            encode_udp_datagram(UdpPacket(1, 1, IMEI, packet)), ("192.0.2.1", 4000)
        )
        self.assertEqual(publisher.frame_times, [2.0])
        clock.advance(0.5)
        publisher.replied_at = 2.375
        publisher.calls[0][2].callback(1)
        self.assertAlmostEqual(sample(metrics, "teltonika_reply_to_ack_seconds_sum"), 0.125)
