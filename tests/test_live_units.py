"""The live feed's pure parts: messages, tokens, the hub's subscription index."""

from __future__ import annotations

import json
import sys
import types
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import defer

from teltonika_ingest.processor.live.access import (
    Access,
    ConnectionInfo,
    LiveAuthorizer,
    TokenFile,
    TokenFileError,
    load_hook,
    parse_tokens,
    token_from_request,
)
from teltonika_ingest.processor.live.hub import Hub
from teltonika_ingest.processor.live.messages import (
    MAX_DEVICES_PER_REQUEST,
    Position,
    ProtocolViolation,
    Request,
    encode_error,
    encode_position,
    encode_subscribed,
    encode_unsubscribed,
    parse_request,
    position_from_row,
)
from teltonika_ingest.processor.live.metrics import LiveMetrics

A = "356307042441013"
B = "356307042441021"

# --------------------------------------------------------------------------- requests


def test_parse_subscribe_and_unsubscribe() -> None:
    assert parse_request(json.dumps({"type": "subscribe", "devices": [A, B, A]})) == Request(
        "subscribe", frozenset({A, B})
    )
    assert parse_request(b'{"type":"unsubscribe","devices":"*"}') == Request("unsubscribe", None)
    assert parse_request(b'{"type":"subscribe","devices":[]}') == Request("subscribe", frozenset())


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("nope", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"devices":"*"}', "unknown message type None"),
        ('{"type":"publish","devices":"*"}', "unknown message type 'publish'"),
        ('{"type":"subscribe"}', '"devices" must be'),
        ('{"type":"subscribe","devices":"all"}', '"devices" must be'),
        ('{"type":"subscribe","devices":[356307042441013]}', "not an IMEI"),
        ('{"type":"subscribe","devices":["35630704244101x"]}', "not an IMEI"),
        ('{"type":"subscribe","devices":["3563070424410130"]}', "not an IMEI"),
    ],
)
def test_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(ProtocolViolation, match=reason.replace("(", r"\(").replace("*", r"\*")):
        parse_request(text)


def test_parse_bounds_the_device_list() -> None:
    devices = [f"{i:015d}" for i in range(MAX_DEVICES_PER_REQUEST + 1)]
    with pytest.raises(ProtocolViolation, match='use "\\*"'):
        parse_request(json.dumps({"type": "subscribe", "devices": devices}))


def test_outbound_control_messages() -> None:
    assert json.loads(encode_subscribed([B, A])) == {"type": "subscribed", "devices": [A, B]}
    assert json.loads(encode_subscribed(None)) == {"type": "subscribed", "devices": "*"}
    assert json.loads(encode_unsubscribed(None)) == {"type": "unsubscribed", "devices": "*"}
    assert json.loads(encode_error("not permitted", {B})) == {
        "type": "error", "reason": "not permitted", "devices": [B]
    }  # fmt: skip
    assert json.loads(encode_error("x")) == {"type": "error", "reason": "x"}


# --------------------------------------------------------------------------- positions


@attrs.frozen
class FakeRow:
    """The processor's PositionRow shape (decode_entry's result)."""

    entry_id: str
    device_id: str
    ts: datetime
    received_at: datetime
    speed: int
    attributes: dict[int, Any]
    attributes_json: str
    io_json: str | None
    gps_valid: bool | None


def test_position_from_an_attrs_row_uses_its_json_forms() -> None:
    row = FakeRow(
        entry_id="1-0",
        device_id=A,
        ts=datetime(2026, 12, 1, 10, 0, 0, 123000, tzinfo=UTC),
        received_at=datetime(2026, 12, 1, 10, 0, 1, 0, tzinfo=UTC),
        speed=5,
        attributes={78: 2**64 - 1, 385: b"\x01\x02"},
        attributes_json='{"78":18446744073709551615,"385":"AQI="}',
        io_json='{"external_voltage":{"value":12.5,"unit":"V"}}',
        gps_valid=True,
    )
    p = position_from_row(row, entry_ms=1_796_119_201_500)
    assert p.ts_ms == 1_796_119_200_123 and p.received_ms == 1_796_119_201_000
    msg = json.loads(encode_position(p, now_ms=1_796_119_201_250))
    assert msg == {
        "type": "position", "device_id": A, "ts": "2026-12-01T10:00:00.123Z",
        "received_at": "2026-12-01T10:00:01.000Z", "speed": 5,
        "attributes": {"78": 18446744073709551615, "385": "AQI="},
        "io": {"external_voltage": {"value": 12.5, "unit": "V"}}, "gps_valid": True,
        "lag_ms": 250,
    }  # fmt: skip


def test_position_from_a_mapping() -> None:
    p = position_from_row(
        {"device_id": A, "ts": "2026-12-01T10:00:00.000Z", "received_at": None,
         "attributes": {21: 3, 385: b"\x01"}},
        snapshot=True,
    )  # fmt: skip
    msg = json.loads(encode_position(p, 0))
    assert msg["snapshot"] is True and msg["lag_ms"] is None
    assert msg["attributes"] == {"21": 3, "385": "AQ=="}
    with pytest.raises(KeyError):
        position_from_row({"ts": "2026-12-01T10:00:00.000Z"})


# --------------------------------------------------------------------------- tokens


def test_token_file_grants() -> None:
    grants = parse_tokens(f"# comment\n\nall *\n  two   {A},{B}  \none {A}\n")
    assert len(grants) == 3
    tf = TokenFile("unused")
    tf._grants = grants
    assert tf.lookup("all") == Access(None)
    assert tf.lookup("two") == Access(frozenset({A, B}))
    assert tf.lookup("one") == Access(frozenset({A}))
    assert tf.lookup("nope") is None
    assert tf.lookup("ALL") is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("lonely\n", "line 1: expected"),
        (f"a {A}\nb {A} extra\n", "line 2: expected"),
        ("a 1234\n", "line 1: not an IMEI"),
        (f"a {A},x\n", "line 1: not an IMEI"),
        ("a ,\n", "line 1: not an IMEI"),
        ("a *\na *\n", "line 2: the token appears twice"),
    ],
)
def test_token_file_errors_name_the_line(text: str, error: str) -> None:
    with pytest.raises(TokenFileError, match=error):
        parse_tokens(text, "tokens")


def test_the_file_never_keeps_the_tokens_themselves() -> None:
    grants = parse_tokens("s3cr3t *\n")
    assert b"s3cr3t" not in b"".join(grants)


@pytest.mark.parametrize(
    ("headers", "params", "token"),
    [
        ({"authorization": "Bearer abc"}, {}, "abc"),
        ({"authorization": "bearer  abc "}, {"token": ["q"]}, "abc"),
        ({"authorization": "Basic abc"}, {"token": ["q"]}, "q"),
        ({}, {"token": ["q", "r"]}, "q"),
        ({}, {"token": [""]}, None),
        ({"authorization": "Bearer "}, {}, None),
        ({}, {}, None),
    ],
)
def test_token_from_request(headers: dict[str, str], params: dict[str, list[str]],
                            token: str | None) -> None:  # fmt: skip
    assert token_from_request(headers, params) == token


INFO = ConnectionInfo("tcp4:127.0.0.1:1", "/ws", {}, {})


def test_authorizer_recheck_after_reload() -> None:
    tf = TokenFile("unused")
    tf._grants = parse_tokens(f"t {A}\n")
    auth = LiveAuthorizer(tf)
    assert auth.recheck("t", Access(None)) == Access(frozenset({A}))
    assert auth.recheck("gone", Access(None)) is None
    hooked = Access(frozenset({B}), source="hook")
    assert auth.recheck("gone", hooked) is hooked  # the hook's answer holds


def test_hook_answers_and_failures() -> None:
    class Hook:
        def authorize(self, token: str | None, info: ConnectionInfo) -> Any:
            if token == "bad-type":
                return "yes"
            if token == "boom":
                raise RuntimeError("down")
            return Access(frozenset({A})) if token == "ok" else None

    auth = LiveAuthorizer(None, Hook())
    results: list[Any] = []
    for token in ("ok", "no", "boom", "bad-type", None):
        auth.authorize(token, INFO).addCallback(results.append)
    assert results == [Access(frozenset({A}), source="hook"), None, None, None, None]
    results.clear()
    LiveAuthorizer(None).authorize("ok", INFO).addCallback(results.append)
    assert results == [None]  # neither file nor hook: no access


def test_load_hook_by_name() -> None:
    mod = types.ModuleType("live_hook_for_tests")

    class Factory:
        def authorize(self, token: str | None, info: ConnectionInfo) -> Any:
            return defer.succeed(None)

    mod.Factory = Factory  # type: ignore[attr-defined]
    mod.instance = Factory()  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    try:
        assert isinstance(load_hook("live_hook_for_tests:Factory"), Factory)
        assert load_hook("live_hook_for_tests:instance") is mod.instance  # type: ignore[attr-defined]
        for bad in ("live_hook_for_tests", "live_hook_for_tests:missing", ":x"):
            with pytest.raises((ValueError, AttributeError)):
                load_hook(bad)
    finally:
        del sys.modules[mod.__name__]


# --------------------------------------------------------------------------- hub


class Sub:
    def __init__(self, access: Access | None = None) -> None:
        self.access = access
        self.subscribed: set[str] = set()
        self.everything = False
        self.got: list[tuple[str, Any]] = []

    def deliver(self, position: Position, prepared: Any, size: int) -> None:
        self.got.append((position.device_id, prepared))


def pos(device: str, entry_ms: int | None = 1) -> Position:
    return Position(device, 1, None, {"device_id": device}, entry_ms)


def test_hub_routes_frames_once_per_position() -> None:
    registry = CollectorRegistry()
    metrics = LiveMetrics.create(registry)
    prepared: list[bytes] = []
    hub = Hub(metrics, lambda b: prepared.append(b) or len(prepared), lambda: 1000)
    one, two, star = Sub(), Sub(), Sub()
    hub.subscribe(one, [A])
    hub.subscribe(two, [A, B])
    hub.subscribe(star, None)
    hub.subscribe(two, [A])  # again: no change
    assert registry.get_sample_value("processor_live_subscriptions") == 4
    assert hub.publish(pos(A)) == 3
    assert len(prepared) == 1  # encoded and framed once for everybody
    assert hub.publish(pos(B)) == 2
    hub.unsubscribe(two, [A])
    hub.drop(star)
    assert hub.publish(pos(A)) == 1
    assert hub.publish(pos("356307042441039")) == 0
    assert [d for d, _ in one.got] == [A, A]
    assert [d for d, _ in two.got] == [A, B]
    assert registry.get_sample_value("processor_live_subscriptions") == 2
    # observed per position written to someone (the one nobody wanted is not)
    assert registry.get_sample_value("processor_live_broadcast_lag_seconds_count") == 3
    hub.unsubscribe(two, None)
    hub.drop(one)
    assert registry.get_sample_value("processor_live_subscriptions") == 0
