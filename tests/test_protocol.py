"""Device protocol tests: StringTransport + task.Clock, a fake publisher, no sockets."""

from __future__ import annotations

import struct

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from teltonika_ingest.codec import (
    CommandMessage,
    encode_command_message,
    encode_imei,
)
from teltonika_ingest.server.session import State

from support import HANDSHAKE, IMEI, Harness, avl_frame, vector_bytes


def ack(n: int) -> bytes:
    return struct.pack(">I", n)


class HandshakeTests(SynchronousTestCase):
    def test_accept(self) -> None:
        h = Harness()
        proto, transport = h.connect()
        proto.dataReceived(HANDSHAKE)
        self.assertEqual(transport.value(), b"\x01")
        self.assertEqual(proto.imei, IMEI)
        self.assertEqual(h.registry.registered, [IMEI])
        self.assertEqual(h.sample("teltonika_handshakes_total", result="accepted"), 1)
        self.assertFalse(transport.disconnecting)

    def test_handshake_in_single_bytes(self) -> None:
        h = Harness()
        proto, transport = h.connect()
        for i in range(len(HANDSHAKE)):
            self.assertEqual(transport.value(), b"")
            proto.dataReceived(HANDSHAKE[i : i + 1])
        self.assertEqual(transport.value(), b"\x01")

    def test_malformed_non_digits(self) -> None:
        h = Harness()
        proto, transport = h.connect()
        proto.dataReceived(b"\x00\x0f" + b"35630704244101X")
        self.assertEqual(transport.value(), b"\x00")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.registry.registered, [])
        self.assertEqual(h.sample("teltonika_handshakes_total", result="malformed"), 1)

    def test_malformed_length_rejected_early(self) -> None:
        # A declared IMEI length of 0x4000 is garbage: rejected on the length alone.
        h = Harness()
        proto, transport = h.connect()
        proto.dataReceived(b"\x40\x00")
        self.assertEqual(transport.value(), b"\x00")
        self.assertTrue(transport.disconnecting)

    def test_rejected_by_authority(self) -> None:
        class DenyAll:
            def check(self, imei: str) -> bool:
                return False

        h = Harness()
        h.factory.authority = DenyAll()
        proto, transport = h.connect()
        proto.dataReceived(HANDSHAKE)
        self.assertEqual(transport.value(), b"\x00")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.sample("teltonika_handshakes_total", result="rejected"), 1)
        self.assertEqual(h.registry.registered, [])

    def test_async_authority_buffers_the_first_packet(self) -> None:
        decision: defer.Deferred[bool] = defer.Deferred()

        class Later:
            def check(self, imei: str) -> defer.Deferred[bool]:
                return decision

        h = Harness()
        h.factory.authority = Later()
        proto, transport = h.connect()
        proto.dataReceived(HANDSHAKE + avl_frame(2))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(h.publisher.calls, [])
        decision.callback(True)
        self.assertEqual(transport.value(), b"\x01")
        self.assertEqual(len(h.publisher.calls), 1)

    def test_timeout(self) -> None:
        h = Harness(handshake_timeout=10)
        proto, transport = h.connect()
        proto.dataReceived(HANDSHAKE[:5])
        h.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        h.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.sample("teltonika_handshakes_total", result="timeout"), 1)

    def test_no_timeout_after_accept(self) -> None:
        h = Harness(handshake_timeout=10, idle_timeout=0)
        _proto, transport = h.handshaken()
        h.clock.advance(100)
        self.assertFalse(transport.disconnecting)


class AckTests(SynchronousTestCase):
    def test_ack_only_after_publish_fires(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        proto.dataReceived(vector_bytes("codec8-two-records"))
        self.assertEqual(transport.value(), b"")  # not before Redis answered
        self.assertEqual(proto.session.state, State.PUBLISHING)
        imei, packet, d = h.publisher.calls[0]
        self.assertEqual((imei, packet.codec, len(packet.records)), (IMEI, "8", 2))
        d.callback(2)
        self.assertEqual(transport.value(), ack(2))
        self.assertEqual(h.sample("teltonika_records_total", codec="8"), 2)
        self.assertEqual(h.sample("teltonika_frames_total", codec="8", result="ok"), 1)
        self.assertEqual(h.sample("teltonika_ack_latency_seconds_count"), 1)

    def test_no_ack_on_publish_failure(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        proto.dataReceived(avl_frame(3))
        h.publisher.calls[0][2].errback(RuntimeError("redis down"))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.sample("teltonika_records_total", codec="8E"), 0)
        self.assertEqual(h.sample("teltonika_disconnects_total", reason="publish_failed"), 1)

    def test_no_ack_when_connection_closed_before_publish_completes(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        proto.dataReceived(avl_frame(1))
        proto.connectionLost()
        transport.clear()
        h.publisher.calls[0][2].callback(1)
        self.assertEqual(transport.value(), b"")

    def test_two_packets_in_one_read_are_published_one_after_the_other(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        proto.dataReceived(avl_frame(2, start=0) + avl_frame(3, start=10))
        self.assertEqual(len(h.publisher.calls), 1)  # the second waits for the first's ACK
        h.publisher.calls[0][2].callback(2)
        self.assertEqual(transport.value(), ack(2))
        self.assertEqual(len(h.publisher.calls), 2)
        self.assertEqual(len(h.publisher.calls[1][1].records), 3)
        h.publisher.calls[1][2].callback(3)
        self.assertEqual(transport.value(), ack(2) + ack(3))

    def test_packet_in_one_byte_chunks(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        frame = avl_frame(4, codec="16")
        for i in range(len(frame)):
            self.assertEqual(h.publisher.calls, [])
            proto.dataReceived(frame[i : i + 1])
        self.assertEqual(len(h.publisher.calls), 1)
        h.publisher.calls[0][2].callback(4)
        self.assertEqual(transport.value(), ack(4))

    def test_handshake_and_packet_in_one_read(self) -> None:
        h = Harness()
        proto, transport = h.connect()
        proto.dataReceived(HANDSHAKE + vector_bytes("codec8e-one-record"))
        self.assertEqual(transport.value(), b"\x01")
        h.publisher.calls[0][2].callback(1)
        self.assertEqual(transport.value(), b"\x01" + ack(1))

    def test_keepalive_byte_ignored(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        proto.dataReceived(b"\xff")
        proto.dataReceived(b"\xff" + avl_frame(1) + b"\xff")
        self.assertEqual(transport.value(), b"")
        # the last one is buffered while the packet awaits its publish
        self.assertEqual(h.sample("teltonika_keepalives_total"), 2)
        h.publisher.calls[0][2].callback(1)
        self.assertEqual(transport.value(), ack(1))
        self.assertEqual(h.sample("teltonika_keepalives_total"), 3)
        self.assertFalse(transport.disconnecting)

    def test_crc_failure_closes_without_ack(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        frame = bytearray(vector_bytes("codec8-one-record"))
        frame[-1] ^= 0xFF
        proto.dataReceived(bytes(frame))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(h.publisher.calls, [])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.sample("teltonika_frames_total", codec="8", result="crc_fail"), 1)

    def test_oversized_declared_length_closes_at_once(self) -> None:
        h = Harness(max_frame_size=2048)
        proto, transport = h.handshaken()
        proto.dataReceived(b"\x00\x00\x00\x00\xff\xff\xff\xff")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.sample("teltonika_frames_total", codec="unknown", result="too_large"), 1)

    def test_garbage_preamble_closes(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        proto.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(h.sample("teltonika_frames_total", codec="unknown", result="malformed"), 1)

    def test_buffer_bound_while_publishing(self) -> None:
        h = Harness(max_buffer=1000)
        proto, transport = h.handshaken()
        proto.dataReceived(avl_frame(1))
        self.assertEqual(proto.session.state, State.PUBLISHING)
        proto.dataReceived(b"\x00" * 900)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"\x00" * 200)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.sample("teltonika_disconnects_total", reason="buffer_overflow"), 1)

    def test_idle_timeout(self) -> None:
        h = Harness(idle_timeout=60)
        proto, transport = h.handshaken()
        h.clock.advance(50)
        proto.dataReceived(b"\xff")  # activity resets the idle clock
        h.clock.advance(50)
        self.assertFalse(transport.disconnecting)
        h.clock.advance(11)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.sample("teltonika_disconnects_total", reason="idle_timeout"), 1)

    def test_not_idle_while_waiting_for_redis(self) -> None:
        h = Harness(idle_timeout=60)
        proto, transport = h.handshaken()
        proto.dataReceived(avl_frame(1))
        h.clock.advance(120)
        self.assertFalse(transport.disconnecting)


class DeadLetterTests(SynchronousTestCase):
    def test_unknown_codec_is_dead_lettered_then_acked_with_declared_count(self) -> None:
        from teltonika_ingest.codec import crc16_ibm

        body = b"\x99\x03" + b"\x01\x02\x03" + b"\x03"
        frame = b"\x00\x00\x00\x00" + struct.pack(">I", len(body)) + body
        frame += struct.pack(">I", crc16_ibm(body))
        h = Harness()
        proto, transport = h.handshaken()
        proto.dataReceived(frame)
        self.assertEqual(transport.value(), b"")
        imei, _codec, reason, raw, d = h.publisher.dead[0]
        self.assertEqual((imei, raw), (IMEI, frame))
        self.assertIn("unknown_codec", reason)
        d.callback(b"1-0")
        self.assertEqual(transport.value(), ack(3))
        self.assertEqual(h.sample("teltonika_unknown_codec_total"), 1)
        self.assertEqual(h.sample("teltonika_dead_letters_total", reason="unknown_codec"), 1)
        self.assertFalse(transport.disconnecting)

    def test_dead_letter_failure_is_not_acked(self) -> None:
        from teltonika_ingest.codec import crc16_ibm

        body = b"\x99\x01\x00\x01"
        frame = (
            b"\x00" * 4 + struct.pack(">I", len(body)) + body + struct.pack(">I", crc16_ibm(body))
        )
        h = Harness()
        proto, transport = h.handshaken()
        proto.dataReceived(frame)
        h.publisher.dead[0][4].errback(RuntimeError("redis down"))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)


class CommandFrameTests(SynchronousTestCase):
    def test_codec12_response_gets_no_ack(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        proto.dataReceived(vector_bytes("codec12-response-getinfo"))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(h.publisher.calls, [])
        self.assertFalse(transport.disconnecting)

    def test_codec13_message_gets_no_ack(self) -> None:
        h = Harness()
        got = []

        class Sink:
            def device_message(self, imei, message, unsolicited):  # type: ignore[no-untyped-def]
                got.append((imei, message.text, unsolicited))

        h.factory.commands = Sink()  # type: ignore[assignment]
        proto, transport = h.handshaken()
        proto.dataReceived(vector_bytes("codec13-message"))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(got, [(IMEI, "Hello from RS232", False)])

    def test_codec14_frames_get_no_ack(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        proto.dataReceived(vector_bytes("codec14-ack-response") + vector_bytes("codec14-nack"))
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(
            encode_command_message(CommandMessage(codec="12", type=6, payload=b"ok"))
        )
        self.assertEqual(transport.value(), b"")


class ConnectionTrackingTests(SynchronousTestCase):
    def test_active_gauge_and_unregister_on_close(self) -> None:
        h = Harness()
        proto, _ = h.handshaken()
        self.assertEqual(h.sample("teltonika_connections_active"), 1)
        proto.connectionLost()
        self.assertEqual(h.sample("teltonika_connections_active"), 0)
        self.assertEqual(h.registry.unregistered, [IMEI])

    def test_newer_connection_replaces_older_and_older_close_keeps_registration(self) -> None:
        h = Harness()
        old, old_t = h.handshaken(port=1)
        new, _ = h.handshaken(port=2)
        self.assertTrue(old_t.disconnecting)
        old.connectionLost()
        self.assertEqual(h.registry.unregistered, [])
        self.assertIs(h.factory.by_imei[IMEI], new)

    def test_max_connections(self) -> None:
        h = Harness(max_connections=2)
        h.connect(1)
        h.connect(2)
        self.assertIsNone(h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 3)))
        self.assertEqual(
            h.sample("teltonika_connections_refused_total", limit="max_connections"), 1
        )

    def test_exception_in_one_session_closes_only_that_session(self) -> None:
        h = Harness()
        bad, bad_t = h.handshaken(port=1, imei="356307042441013")
        good, good_t = h.handshaken(port=2, imei="352093081452251")

        def boom(data: bytes) -> list:  # type: ignore[type-arg]
            raise ValueError("bug")

        bad.session.receive = boom  # type: ignore[method-assign, union-attr]
        bad.dataReceived(b"\xff")
        self.assertTrue(bad_t.disconnecting)
        self.assertEqual(h.sample("teltonika_session_errors_total"), 1)
        # closed the way every close goes: counted with its reason
        self.assertEqual(h.sample("teltonika_disconnects_total", reason="session_error"), 1)
        self.flushLoggedErrors(ValueError)
        good.dataReceived(avl_frame(1))
        h.publisher.calls[0][2].callback(1)
        self.assertEqual(good_t.value(), ack(1))
        self.assertFalse(good_t.disconnecting)

    def test_second_handshake_bytes_are_frames_not_handshakes(self) -> None:
        h = Harness()
        proto, transport = h.handshaken()
        proto.dataReceived(encode_imei(IMEI))  # not a valid frame preamble
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")


class BackpressureTests(SynchronousTestCase):
    """The publisher's pressure hook pauses reading from every device and resumes it, without
    resuming a connection whose own ACK writes are blocked (the device does not read)."""

    def test_pause_and_resume_every_connection(self) -> None:
        h = Harness()
        p1, t1 = h.handshaken(40001, "356307042441013")
        _p2, t2 = h.handshaken(40002, "356307042441021")
        h.factory.publish_pressure(True)
        self.assertEqual((t1.producerState, t2.producerState), ("paused", "paused"))
        _, t3 = h.connect(40003)  # connects while paused: starts paused
        self.assertEqual(t3.producerState, "paused")
        p1.pauseProducing()  # the transport says: p1's device does not read its ACKs
        h.factory.publish_pressure(False)
        self.assertEqual((t1.producerState, t2.producerState), ("paused", "producing"))
        self.assertEqual(t3.producerState, "producing")
        p1.resumeProducing()  # its ACKs drained
        self.assertEqual(t1.producerState, "producing")

    def test_own_resume_does_not_undo_the_pressure_pause(self) -> None:
        h = Harness()
        p1, t1 = h.handshaken()
        p1.pauseProducing()
        h.factory.publish_pressure(True)
        p1.resumeProducing()  # the device read its ACKs, but publishes are still backed up
        self.assertEqual(t1.producerState, "paused")
        h.factory.publish_pressure(False)
        self.assertEqual(t1.producerState, "producing")
        self.assertEqual(h.factory.read_pauses, 1)
