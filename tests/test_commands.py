"""GPRS commands at the protocol level: StringTransport + task.Clock, fake Redis writer.

The router is driven through ``handle_entry`` (what its stream reader does for each entry);
outcome writes go to a fake writer whose replies the tests control.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from teltonika_ingest.codec import (
    TYPE_COMMAND,
    TYPE_NACK,
    TYPE_RESPONSE,
    CommandMessage,
    decode_command_frame,
    encode_command,
    encode_command_message,
)
from teltonika_ingest.redis.client import RedisUnavailable
from teltonika_ingest.server.commands.entries import (
    GROUP,
    RESULTS_KEY,
    InvalidCommand,
    entry_time_ms,
    parse_entry,
)
from teltonika_ingest.server.commands.outcomes import RECORD_OUTCOME, OutcomeWriter
from teltonika_ingest.server.commands.router import CommandRouter
from teltonika_ingest.server.protocol import TeltonikaProtocol

from support import IMEI, Harness, avl_frame

T0 = 1_700_000_000.0  # the fake clock starts here (entry ids carry wall-clock ms)
OTHER_IMEI = "352093081452251"


def ack(n: int) -> bytes:
    return struct.pack(">I", n)


def response(text: bytes, codec: str = "12", imei: str | None = None) -> bytes:
    return encode_command_message(CommandMessage(codec, TYPE_RESPONSE, text, imei))


class FakeWriter:
    """Stands in for the shared RedisClient: records every script run.

    ``auto``: answer at once with a new results entry id; otherwise the test fires
    ``calls[i][2]`` itself.
    """

    def __init__(self, auto: bool = True) -> None:
        self.auto = auto
        self.calls: list[tuple[list[Any], list[Any], defer.Deferred[Any]]] = []
        self.written: list[dict[str, str]] = []

    def run_script(self, script: Any, keys: list[Any], args: list[Any]) -> defer.Deferred[Any]:
        assert script is RECORD_OUTCOME
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((keys, args, d))
        d.addCallback(self._record, args)
        if self.auto:
            d.callback(f"{len(self.calls)}-0")
        return d

    def _record(self, reply: Any, args: list[Any]) -> Any:
        if reply != 0:
            self.written.append(fields_of(args))
        return reply


def fields_of(args: list[Any]) -> dict[str, str]:
    flat = [str(a) for a in args[4:]]  # after MAXLEN, group, entry id, max bytes
    return dict(zip(flat[0::2], flat[1::2], strict=True))


class Env:
    """A Harness (factory + fakes on a Clock) with a CommandRouter attached."""

    def __init__(self, writer: FakeWriter | None = None, **router_args: Any) -> None:
        self.h = Harness()
        self.clock = self.h.clock
        self.clock.advance(T0)
        self.writer = writer or FakeWriter()
        self.router = CommandRouter(
            self.h.factory,
            instance_id="test-a",
            writer=self.writer,
            reader=object(),  # never started here: entries are fed with handle_entry
            reactor=self.clock,
            **router_args,
        )
        self._seq = 0

    def device(self, port: int = 40000) -> tuple[TeltonikaProtocol, StringTransport]:
        return self.h.handshaken(port)

    def entry_id(self, age: float = 0.0) -> str:
        self._seq += 1
        return f"{int((self.clock.seconds() - age) * 1000)}-{self._seq}"

    def add(
        self, text: str | None = "getinfo", *, age: float = 0.0, imei: str = IMEI, **fields: Any
    ) -> str:
        """Hand the router one entry; returns its entry id (the command id is ``c<seq>``)."""
        entry_id = self.entry_id(age)
        flat: list[Any] = ["id", f"c{self._seq}", "imei", imei]
        if text is not None:
            flat += ["text", text]
        for name, value in fields.items():
            flat += [name, str(value)]
        self.router.handle_entry(entry_id, flat)
        return entry_id

    @property
    def results(self) -> list[dict[str, str]]:
        return self.writer.written

    def result(self, entry_id: str) -> dict[str, str]:
        found = [r for r in self.results if r.get("entry_id") == entry_id]
        assert len(found) == 1, f"{len(found)} outcomes for {entry_id}: {self.results}"
        return found[0]

    def sample(self, name: str, **labels: str) -> float:
        return self.h.sample(name, **labels)


def written_command(transport: StringTransport) -> CommandMessage:
    data = transport.value()
    transport.clear()
    return decode_command_frame(data)  # checks preamble, length and CRC


class SendingTests(SynchronousTestCase):
    def test_written_at_once_when_idle(self) -> None:
        env = Env()
        _, transport = env.device()
        env.add("getinfo")
        message = written_command(transport)
        self.assertEqual(
            (message.codec, message.type, message.payload), ("12", TYPE_COMMAND, b"getinfo")
        )
        self.assertEqual(env.sample("teltonika_commands_inflight"), 1)
        self.assertEqual(env.results, [])  # no outcome before the device answers

    def test_not_written_while_a_packet_awaits_its_ack_then_right_after_it(self) -> None:
        env = Env()
        proto, transport = env.device()
        proto.dataReceived(avl_frame(2))
        self.assertEqual(len(env.h.publisher.calls), 1)  # publishing: the session is busy
        env.add("getver")
        self.assertEqual(transport.value(), b"")  # not while the packet awaits its ACK
        self.assertEqual(env.sample("teltonika_commands_inflight"), 0)
        env.h.publisher.calls[0][2].callback(2)
        # the ACK first, then the command, in the same turn
        expected = ack(2) + encode_command(b"getver")
        self.assertEqual(transport.value(), expected)
        self.assertEqual(env.sample("teltonika_commands_inflight"), 1)

    def test_one_in_flight_fifo_and_answers_go_to_the_right_command(self) -> None:
        env = Env()
        proto, transport = env.device()
        first = env.add("getinfo")
        second = env.add("getver")
        third = env.add("getstatus")
        self.assertEqual(written_command(transport).payload, b"getinfo")
        self.assertEqual(transport.value(), b"")  # one in flight
        env.clock.advance(0.25)
        proto.dataReceived(response(b"RTC:2024/1/1 Init:..."))
        self.assertEqual(env.result(first)["response"], "RTC:2024/1/1 Init:...")
        self.assertEqual(env.result(first)["id"], "c1")
        self.assertEqual(written_command(transport).payload, b"getver")
        proto.dataReceived(response(b"Ver:03.27.07_00"))
        self.assertEqual(env.result(second)["response"], "Ver:03.27.07_00")
        self.assertEqual(env.result(second)["id"], "c2")
        self.assertEqual(written_command(transport).payload, b"getstatus")
        proto.dataReceived(response(b"Data Link: 1"))
        self.assertEqual(env.result(third)["status"], "ok")
        self.assertEqual([r["status"] for r in env.results], ["ok", "ok", "ok"])
        self.assertEqual(env.sample("teltonika_commands_total", status="ok"), 3)
        self.assertEqual(env.sample("teltonika_commands_inflight"), 0)
        self.assertEqual(env.sample("teltonika_command_roundtrip_seconds_count"), 3)
        self.assertEqual(env.sample("teltonika_command_roundtrip_seconds_sum"), 0.25)
        self.assertEqual(env.router.held, 0)

    def test_avl_packet_while_command_in_flight_is_handled_normally(self) -> None:
        env = Env()
        proto, transport = env.device()
        entry = env.add("getinfo")
        written_command(transport)
        proto.dataReceived(avl_frame(3))
        self.assertEqual(len(env.h.publisher.calls), 1)
        env.h.publisher.calls[0][2].callback(3)
        self.assertEqual(transport.value(), ack(3))
        transport.clear()
        self.assertEqual(env.results, [])  # the command is still in flight
        proto.dataReceived(response(b"answer"))
        self.assertEqual(env.result(entry)["response"], "answer")
        self.assertEqual(transport.value(), b"")  # a response is never ACKed

    def test_outcome_fields(self) -> None:
        env = Env()
        proto, _ = env.device()
        entry = env.add("getver")
        env.clock.advance(1.5)
        proto.dataReceived(response(b"Ver:1"))
        result = env.result(entry)
        self.assertEqual(
            result,
            {
                "id": "c1",
                "imei": IMEI,
                "status": "ok",
                "response": "Ver:1",
                "instance_id": "test-a",
                "at": "2023-11-14T22:13:21.500Z",
                "entry_id": entry,
            },
        )
        keys, args, _ = env.writer.calls[0]
        self.assertEqual(keys, [RESULTS_KEY, "commands:instance:test-a"])
        self.assertEqual(args[:3], [100_000, GROUP, entry])


class TimeoutTests(SynchronousTestCase):
    def test_timeout_then_the_next_command_goes_out(self) -> None:
        env = Env()
        proto, transport = env.device()
        first = env.add("getinfo")
        env.clock.advance(10)
        second = env.add("getver")  # its own timer starts now, when it is accepted
        written_command(transport)
        env.clock.advance(19.9)
        self.assertEqual(env.results, [])
        env.clock.advance(0.1)
        result = env.result(first)
        self.assertEqual(result["status"], "timeout")
        self.assertIn("no answer within 30 s", result["response"])
        self.assertEqual(env.sample("teltonika_commands_total", status="timeout"), 1)
        # the next one goes out at once
        self.assertEqual(written_command(transport).payload, b"getver")
        self.assertEqual(env.sample("teltonika_commands_inflight"), 1)
        # Codec 12 carries no command id: an answer now completes the command in flight,
        # whichever command it was really meant for (documented limitation).
        proto.dataReceived(response(b"Ver:1"))
        self.assertEqual(env.result(second)["response"], "Ver:1")
        self.assertEqual(len(env.results), 2)

    def test_queued_commands_share_the_wait_from_acceptance(self) -> None:
        env = Env()
        _, transport = env.device()
        first = env.add("getinfo")
        second = env.add("getver")
        written_command(transport)
        env.clock.advance(30)
        self.assertEqual(env.result(first)["status"], "timeout")
        result = env.result(second)
        self.assertEqual(result["status"], "timeout")
        self.assertIn("not sent within 30 s", result["response"])
        self.assertEqual(transport.value(), b"")  # the expired one is never written
        self.assertEqual(env.sample("teltonika_commands_inflight"), 0)

    def test_answer_after_timeout_with_nothing_in_flight_is_a_message(self) -> None:
        env = Env()
        proto, transport = env.device()
        entry = env.add("getinfo")
        written_command(transport)
        env.clock.advance(30)
        proto.dataReceived(response(b"late answer"))
        self.assertEqual(env.result(entry)["status"], "timeout")
        self.assertEqual(len(env.results), 2)
        message = env.results[1]
        self.assertEqual(message["status"], "message")
        self.assertEqual(message["id"], "")
        self.assertEqual(message["codec"], "12")
        self.assertEqual(message["response"], "late answer")
        self.assertNotIn("entry_id", message)
        self.assertEqual(env.sample("teltonika_commands_total", status="message"), 1)

    def test_timeout_s_overrides_the_default(self) -> None:
        env = Env(default_timeout=30.0)
        env.device()
        entry = env.add("getinfo", timeout_s="2.5")
        env.clock.advance(2.4)
        self.assertEqual(env.results, [])
        env.clock.advance(0.1)
        self.assertEqual(env.result(entry)["status"], "timeout")
        self.assertEqual(env.sample("teltonika_commands_inflight"), 0)

    def test_queued_command_times_out_without_being_written(self) -> None:
        env = Env()
        proto, transport = env.device()
        proto.dataReceived(avl_frame(1))  # publish never confirmed within the timeout
        entry = env.add("setdigout 1", timeout_s=5)
        env.clock.advance(5)
        result = env.result(entry)
        self.assertEqual(result["status"], "timeout")
        self.assertIn("not sent", result["response"])
        env.h.publisher.calls[0][2].callback(1)
        self.assertEqual(transport.value(), ack(1))  # ACK only: the expired command is gone
        self.assertEqual(env.sample("teltonika_commands_inflight"), 0)

    def test_stale_entry_gets_timeout_without_being_sent(self) -> None:
        env = Env()
        _, transport = env.device()
        entry = env.add("setdigout 1", age=3600, timeout_s=30)
        self.assertEqual(transport.value(), b"")
        result = env.result(entry)
        self.assertEqual(result["status"], "timeout")
        self.assertIn("expired before it was sent", result["response"])
        young = env.add("setdigout 1", age=29, timeout_s=30)
        self.assertEqual(written_command(transport).payload, b"setdigout 1")
        # its timer runs from acceptance: the whole timeout, not what is left of it
        env.clock.advance(29.9)
        self.assertEqual(len(env.results), 1)
        env.clock.advance(0.1)
        self.assertEqual(env.result(young)["status"], "timeout")


class ConnectionTests(SynchronousTestCase):
    def test_close_fails_in_flight_and_queued_with_not_connected(self) -> None:
        env = Env()
        proto, transport = env.device()
        in_flight = env.add("getinfo")
        queued = env.add("getver")
        written_command(transport)
        proto.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(env.result(in_flight)["status"], "not_connected")
        self.assertIn("before the device answered", env.result(in_flight)["response"])
        self.assertEqual(env.result(queued)["status"], "not_connected")
        self.assertIn("before the command could be sent", env.result(queued)["response"])
        self.assertEqual(env.sample("teltonika_commands_total", status="not_connected"), 2)
        self.assertEqual(env.sample("teltonika_commands_inflight"), 0)
        env.clock.advance(60)  # the timers were cancelled: no second outcome
        self.assertEqual(len(env.results), 2)

    def test_unknown_imei_is_not_connected(self) -> None:
        env = Env()
        env.device()
        entry = env.add("getinfo", imei=OTHER_IMEI)
        result = env.result(entry)
        self.assertEqual(result["status"], "not_connected")
        self.assertEqual(result["imei"], OTHER_IMEI)
        self.assertIn("test-a", result["response"])

    def test_command_goes_to_the_newest_connection_of_the_imei(self) -> None:
        env = Env()
        old_proto, old_transport = env.device(40000)
        _, new_transport = env.device(40001)  # the device reconnected
        env.add("getinfo")
        self.assertEqual(old_transport.value(), b"")
        self.assertEqual(written_command(new_transport).payload, b"getinfo")
        self.assertTrue(old_transport.disconnecting)
        del old_proto

    def test_replaced_connection_fails_its_commands(self) -> None:
        env = Env()
        _, old_transport = env.device(40000)
        entry = env.add("getinfo")
        written_command(old_transport)
        env.device(40001)
        self.assertEqual(env.result(entry)["status"], "not_connected")


class Codec14Tests(SynchronousTestCase):
    def test_codec14_command_carries_the_imei_and_ack_is_ok(self) -> None:
        env = Env()
        proto, transport = env.device()
        entry = env.add("getver", codec=14)
        message = written_command(transport)
        self.assertEqual((message.codec, message.type, message.imei), ("14", TYPE_COMMAND, IMEI))
        self.assertEqual(message.payload, b"getver")
        proto.dataReceived(response(b"Ver:2", codec="14", imei=IMEI))
        self.assertEqual(env.result(entry)["status"], "ok")
        self.assertEqual(env.result(entry)["response"], "Ver:2")

    def test_codec14_nack(self) -> None:
        env = Env()
        proto, transport = env.device()
        entry = env.add("getver", codec="14")
        queued = env.add("getinfo", codec="14")
        written_command(transport)
        proto.dataReceived(encode_command_message(CommandMessage("14", TYPE_NACK, b"", OTHER_IMEI)))
        result = env.result(entry)
        self.assertEqual(result["status"], "nack")
        self.assertIn("IMEI mismatch", result["response"])
        self.assertEqual(env.sample("teltonika_commands_total", status="nack"), 1)
        self.assertEqual(env.sample("teltonika_commands_inflight"), 1)  # the next one
        self.assertEqual(written_command(transport).payload, b"getinfo")
        del queued


class SessionErrorTests(SynchronousTestCase):
    def test_session_error_gives_its_commands_not_connected_at_once(self) -> None:
        env = Env()
        proto, transport = env.device()
        in_flight = env.add("getinfo")
        queued = env.add("getver")
        written_command(transport)

        def boom(*args: Any) -> Any:
            raise ValueError("bug in publishing")

        env.h.publisher.publish_frame = boom  # type: ignore[method-assign]
        proto.dataReceived(avl_frame(1))  # the session raises while handling the packet
        self.flushLoggedErrors(ValueError)
        # at once, not after the 30 s command timeout
        self.assertEqual(env.result(in_flight)["status"], "not_connected")
        self.assertEqual(env.result(queued)["status"], "not_connected")
        self.assertEqual(env.sample("teltonika_commands_inflight"), 0)
        self.assertEqual(env.sample("teltonika_disconnects_total", reason="session_error"), 1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(env.router.held, 0)


class MessageTests(SynchronousTestCase):
    def test_codec13_message_is_recorded(self) -> None:
        env = Env()
        proto, transport = env.device()
        proto.dataReceived(
            encode_command_message(
                CommandMessage("13", TYPE_COMMAND, b"Alarm: door", timestamp_ms=1_600_000_000_000)
            )
        )
        self.assertEqual(transport.value(), b"")  # never ACKed
        (message,) = env.results
        self.assertEqual(message["status"], "message")
        self.assertEqual(message["imei"], IMEI)
        self.assertEqual(message["response"], "Alarm: door")
        self.assertEqual(message["device_ts"], "2020-09-13T12:26:40.000Z")
        self.assertEqual(message["codec"], "13")
        self.assertEqual(message["instance_id"], "test-a")
        self.assertEqual(env.writer.calls[0][1][2], "")  # no command entry to acknowledge
        self.assertEqual(env.sample("teltonika_commands_total", status="message"), 1)

    def test_codec13_during_a_command_does_not_complete_it(self) -> None:
        env = Env()
        proto, transport = env.device()
        entry = env.add("getinfo")
        written_command(transport)
        proto.dataReceived(
            encode_command_message(CommandMessage("13", TYPE_COMMAND, b"hi", timestamp_ms=0))
        )
        self.assertEqual([r["status"] for r in env.results], ["message"])
        proto.dataReceived(response(b"info"))
        self.assertEqual(env.result(entry)["response"], "info")


class BinaryTests(SynchronousTestCase):
    def test_hex_command_and_b64_response(self) -> None:
        env = Env()
        proto, transport = env.device()
        entry = env.add(None, hex="00ff10")
        self.assertEqual(written_command(transport).payload, b"\x00\xff\x10")
        proto.dataReceived(response(b"\x01\x02\xfe"))
        result = env.result(entry)
        self.assertEqual(result["status"], "ok")
        self.assertEqual(base64.b64decode(result["response_b64"]), b"\x01\x02\xfe")

    def test_text_command_with_non_ascii_answer_keeps_the_bytes(self) -> None:
        env = Env()
        proto, transport = env.device()
        entry = env.add("getinfo")
        written_command(transport)
        proto.dataReceived(response("temp 21\u00b0C".encode("latin-1")))
        result = env.result(entry)
        self.assertEqual(
            base64.b64decode(result["response_b64"]), "temp 21\u00b0C".encode("latin-1")
        )
        self.assertEqual(result["response"], "temp 21\ufffdC")

    def test_ascii_answer_to_text_command_has_no_b64(self) -> None:
        env = Env()
        proto, transport = env.device()
        entry = env.add("getinfo")
        written_command(transport)
        proto.dataReceived(response(b"line 1\r\nline 2"))
        self.assertNotIn("response_b64", env.result(entry))


INVALID_ENTRIES: list[tuple[list[Any] | None, str]] = [
    (["imei", IMEI, "text", "getinfo"], "missing field 'id'"),
    (["id", "x", "text", "getinfo"], "missing field 'imei'"),
    (["id", "x", "imei", IMEI], "missing field 'text'"),
    (["id", "", "imei", IMEI, "text", "getinfo"], "'id' is empty"),
    (["id", "x", "imei", "12345", "text", "getinfo"], "15 decimal digits"),
    (["id", "x", "imei", "35630704244101a", "text", "getinfo"], "15 decimal digits"),
    (["id", "x", "imei", IMEI, "text", "getinfo", "hex", "00"], "both 'text' and 'hex'"),
    (["id", "x", "imei", IMEI, "text", "set\u00e9"], "not ASCII"),
    (["id", "x", "imei", IMEI, "text", b"\xff\xfe"], "not ASCII"),
    (["id", "x", "imei", IMEI, "text", "get\ninfo"], "control characters"),
    (["id", "x", "imei", IMEI, "text", "a\x00"], "control characters"),
    (["id", "x", "imei", IMEI, "text", ""], "'text' is empty"),
    (["id", "x", "imei", IMEI, "text", "x" * 513], "longer than --max-command-length 512"),
    (["id", "x", "imei", IMEI, "hex", "abc"], "hex"),
    (["id", "x", "imei", IMEI, "hex", "zz"], "hex"),
    (["id", "x", "imei", IMEI, "hex", ""], "'hex' is empty"),
    (["id", "x", "imei", IMEI, "hex", "00" * 513], "longer than --max-command-length"),
    (["id", "x", "imei", IMEI, "text", "getinfo", "codec", "13"], "'codec' must be 12 or 14"),
    (["id", "x", "imei", IMEI, "text", "getinfo", "codec", "8"], "'codec' must be 12 or 14"),
    (["id", "x", "imei", IMEI, "text", "getinfo", "timeout_s", "0"], "'timeout_s'"),
    (["id", "x", "imei", IMEI, "text", "getinfo", "timeout_s", "-1"], "'timeout_s'"),
    (["id", "x", "imei", IMEI, "text", "getinfo", "timeout_s", "3601"], "'timeout_s'"),
    (["id", "x", "imei", IMEI, "text", "getinfo", "timeout_s", "nan"], "'timeout_s'"),
    (["id", "x", "imei", IMEI, "text", "getinfo", "timeout_s", "inf"], "'timeout_s'"),
    (["id", "x", "imei", IMEI, "text", "getinfo", "timeout_s", "soon"], "'timeout_s'"),
    (["id", "x", "imei", IMEI, "text", "a", "text", "b"], "given twice"),
    (["id", "x", "imei"], "odd number"),
    (None, "deleted"),
]


class ValidationTests(SynchronousTestCase):
    def test_invalid_entries(self) -> None:
        for fields, reason in INVALID_ENTRIES:
            with self.subTest(fields=fields):
                with self.assertRaises(InvalidCommand) as caught:
                    parse_entry(fields, max_length=512, default_timeout=30)
                self.assertIn(reason, str(caught.exception))

    def test_invalid_entries_get_an_invalid_outcome_and_nothing_is_sent(self) -> None:
        env = Env()
        _, transport = env.device()
        for i, (fields, _reason) in enumerate(INVALID_ENTRIES):
            entry = f"{int(T0 * 1000)}-{100 + i}"
            env.router.handle_entry(entry, fields)
            result = env.result(entry)
            self.assertEqual(result["status"], "invalid")
            self.assertTrue(result["response"].startswith("invalid command entry: "))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(
            env.sample("teltonika_commands_total", status="invalid"), len(INVALID_ENTRIES)
        )

    def test_invalid_outcome_echoes_id_and_imei_when_present(self) -> None:
        env = Env()
        entry = env.add("x" * 600)
        result = env.result(entry)
        self.assertEqual((result["id"], result["imei"]), ("c1", IMEI))

    def test_max_command_length_is_configurable(self) -> None:
        env = Env(max_command_length=8)
        _, transport = env.device()
        self.assertEqual(env.result(env.add("123456789"))["status"], "invalid")
        env.add("12345678")
        self.assertEqual(written_command(transport).payload, b"12345678")

    def test_valid_entries(self) -> None:
        request = parse_entry(
            ["id", "a", "imei", IMEI, "text", "setdigout 1", "codec", "14", "timeout_s", "2.5",
             "extra", "ignored"],
            max_length=512,
            default_timeout=30,
        )  # fmt: skip
        self.assertEqual(
            (request.id, request.imei, request.payload, request.binary),
            ("a", IMEI, b"setdigout 1", False),
        )
        self.assertEqual((request.codec, request.timeout), ("14", 2.5))
        request = parse_entry(
            ["id", "b", "imei", IMEI, "hex", "DEADbeef"], max_length=4, default_timeout=7
        )
        self.assertEqual((request.payload, request.binary), (b"\xde\xad\xbe\xef", True))
        self.assertEqual((request.codec, request.timeout), ("12", 7))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.sampled_from(["id", "imei", "text", "hex", "codec", "timeout_s"]),
                st.text(max_size=20),
                st.binary(max_size=20),
                st.just(IMEI),
            ),
            max_size=12,
        )
    )
    def test_parse_entry_only_ever_raises_invalid_command(self, fields: list[Any]) -> None:
        try:
            request = parse_entry(fields, max_length=16, default_timeout=30)
        except InvalidCommand:
            return
        self.assertTrue(0 < request.timeout <= 3600)
        self.assertTrue(0 < len(request.payload) <= 16)
        encode_command(request.payload, codec=request.codec, imei=request.imei)

    @given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1))
    def test_printable_ascii_text_is_accepted_as_is(self, text: str) -> None:
        request = parse_entry(
            ["id", "a", "imei", IMEI, "text", text], max_length=10_000, default_timeout=30
        )
        self.assertEqual(request.payload, text.encode())

    def test_entry_time_ms(self) -> None:
        self.assertEqual(entry_time_ms("1700000000000-3"), 1_700_000_000_000)
        self.assertEqual(entry_time_ms("1700000000000"), 1_700_000_000_000)
        self.assertIsNone(entry_time_ms("nope-1"))


class OutcomeWriteTests(SynchronousTestCase):
    def test_failed_write_is_kept_and_retried_with_backoff(self) -> None:
        writer = FakeWriter(auto=False)
        env = Env(writer)
        proto, transport = env.device()
        entry = env.add("getinfo")
        written_command(transport)
        proto.dataReceived(response(b"info"))
        self.assertEqual(len(writer.calls), 1)
        writer.calls[0][2].errback(RedisUnavailable("down"))
        self.assertEqual(env.router.unwritten, 1)
        self.assertEqual(env.router.held, 1)  # still held: the entry stays pending
        env.clock.advance(env.router.outcomes.retry_min)
        self.assertEqual(len(writer.calls), 2)
        writer.calls[1][2].errback(RedisUnavailable("down"))
        env.clock.advance(env.router.outcomes.retry_min)
        self.assertEqual(len(writer.calls), 2)  # backing off: the delay doubled
        env.clock.advance(env.router.outcomes.retry_min)
        self.assertEqual(len(writer.calls), 3)
        self.assertEqual(writer.calls[2][1], writer.calls[0][1])  # the very same outcome
        writer.calls[2][2].callback("5-0")
        self.assertEqual(env.result(entry)["response"], "info")
        self.assertEqual((env.router.unwritten, env.router.held), (0, 0))
        env.clock.advance(120)
        self.assertEqual(len(writer.calls), 3)
        self.assertEqual(env.sample("teltonika_commands_total", status="ok"), 1)

    def test_already_recorded_reply_is_accepted(self) -> None:
        writer = FakeWriter(auto=False)
        env = Env(writer)
        entry = env.add("getinfo", imei=OTHER_IMEI)
        writer.calls[0][2].callback(0)  # the script saw the entry acknowledged already
        self.assertEqual((env.router.unwritten, env.router.held), (0, 0))
        self.assertEqual(writer.written, [])
        del entry

    def test_an_entry_handed_twice_is_handled_once(self) -> None:
        """The reader reads its pending entries again (after a lost connection) while one is
        in flight: the device must not get that command a second time."""
        writer = FakeWriter(auto=False)
        env = Env(writer)
        proto, transport = env.device()
        entry = env.entry_id()
        fields = ["id", "a", "imei", IMEI, "text", "getinfo"]
        env.router.handle_entry(entry, fields)
        env.router.handle_entry(entry, fields, redelivered=True)
        self.assertEqual(written_command(transport).payload, b"getinfo")
        proto.dataReceived(response(b"info"))  # answered: a second copy would go out now
        self.assertEqual(transport.value(), b"")
        env.router.handle_entry(entry, fields, redelivered=True)  # outcome not yet written
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(writer.calls), 1)

    def test_drain_waits_for_unwritten_outcomes(self) -> None:
        writer = FakeWriter(auto=False)
        env = Env(writer)
        env.add("getinfo", imei=OTHER_IMEI)
        drained = env.router.drain(timeout=5)
        self.assertNoResult(drained)
        writer.calls[0][2].callback("1-0")
        self.assertEqual(self.successResultOf(drained), 0)

    def test_drain_gives_up_after_its_timeout(self) -> None:
        writer = FakeWriter(auto=False)
        env = Env(writer)
        env.add("getinfo", imei=OTHER_IMEI)
        writer.calls[0][2].errback(RedisUnavailable("down"))
        drained = env.router.drain(timeout=5)
        env.clock.advance(5)
        self.assertEqual(self.successResultOf(drained), 1)
        calls = len(writer.calls)
        env.clock.advance(600)
        self.assertEqual(len(writer.calls), calls)  # no retries after closing


class OutcomeWriterTests(SynchronousTestCase):
    """The writer on its own (no router): holds, bounds and close."""

    def writer(self, fake: FakeWriter, **kw: Any) -> tuple[OutcomeWriter, list[str]]:
        seen: list[str] = []
        h = Harness()
        outcomes = OutcomeWriter(
            fake,
            clock=h.clock,
            instance_id="test-a",
            stream_key="commands:instance:test-a",
            metrics=h.metrics,
            on_written=lambda o: seen.append(o.key),
            **kw,
        )
        return outcomes, seen

    def test_holds_an_entry_until_written_then_reports_it(self) -> None:
        fake = FakeWriter(auto=False)
        outcomes, seen = self.writer(fake)
        outcomes.record("1-0", "a", IMEI, "timeout", "late")
        self.assertTrue(outcomes.holds("1-0"))
        self.assertEqual((outcomes.unwritten, outcomes.unwritten_entries), (1, 1))
        fake.calls[0][2].callback("9-0")
        self.assertFalse(outcomes.holds("1-0"))
        self.assertEqual((outcomes.unwritten, seen), (0, ["1-0"]))

    def test_device_messages_beyond_the_bound_are_dropped(self) -> None:
        fake = FakeWriter(auto=False)
        outcomes, _ = self.writer(fake, max_messages_unwritten=2)
        for _ in range(3):
            outcomes.message(IMEI, CommandMessage("13", TYPE_COMMAND, b"hi", timestamp_ms=0))
        self.assertEqual(len(fake.calls), 2)
        self.assertEqual((outcomes.unwritten, outcomes.unwritten_entries), (2, 0))
        fake.calls[0][2].callback("1-0")
        outcomes.message(IMEI, CommandMessage("13", TYPE_COMMAND, b"hi", timestamp_ms=0))
        self.assertEqual(len(fake.calls), 3)  # room again

    def test_close_drops_unwritten_and_stops_retrying(self) -> None:
        fake = FakeWriter(auto=False)
        outcomes, seen = self.writer(fake)
        outcomes.record("1-0", "a", IMEI, "ok", "x")
        fake.calls[0][2].errback(RedisUnavailable("down"))
        self.assertEqual(outcomes.close(), 1)
        outcomes.clock.advance(600)
        self.assertEqual((len(fake.calls), seen), (1, []))
        self.assertIsNone(outcomes.record("2-0", "b", IMEI, "ok", "y"))  # counted, not written
        self.assertEqual(len(fake.calls), 1)


class ShutdownTests(SynchronousTestCase):
    def test_stop_leaves_unsent_commands_pending_and_fails_in_flight_ones(self) -> None:
        env = Env()
        proto, transport = env.device()
        in_flight = env.add("getinfo")
        queued = env.add("getver")
        written_command(transport)
        env.router._stopping = True  # what stopService does before the connections close
        env.h.factory.close_all("shutdown")
        self.assertEqual(env.result(in_flight)["status"], "not_connected")
        self.assertEqual([r["entry_id"] for r in env.results], [in_flight])  # queued: no outcome
        self.assertEqual(env.router.held, 0)
        self.assertEqual(self.successResultOf(env.router.drain()), 0)
        del queued, proto

    def test_answer_arriving_before_close_is_recorded(self) -> None:
        env = Env()
        proto, transport = env.device()
        entry = env.add("getinfo")
        written_command(transport)
        env.router._stopping = True
        proto.dataReceived(response(b"info"))
        env.h.factory.close_all("shutdown")
        self.assertEqual(env.result(entry)["status"], "ok")
