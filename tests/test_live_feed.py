"""The live feed over real WebSockets (autobahn client) against a real redis-server: every
message and close code of contract.md §10, access, snapshot, back-pressure, heartbeat."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from teltonika_ingest.processor.live.access import Access
from teltonika_ingest.processor.live.messages import position_from_row

from device import deferLater, http_get, wait_for
from livefeed import (
    IMEI_A,
    IMEI_B,
    IMEI_C,
    FeedClient,
    Live,
    Snapshots,
    start_live,
    write_tokens,
    xadd,
)
from redisproc import RedisProcess

pytestmark = pytest.mark.integration

TOKENS = {"t-all": "*", "t-a": IMEI_A, "t-ab": f"{IMEI_A},{IMEI_B}"}


def row(imei: str, ts: str, **kw: Any) -> dict[str, Any]:
    base = {
        "device_id": imei, "ts": ts, "received_at": ts, "codec": "8E", "priority": 1,
        "longitude": 25.0, "latitude": 54.0, "altitude": 100, "angle": 0, "satellites": 7,
        "speed": 10, "event_io_id": 0, "generation_type": None, "attributes": {"21": 3},
        "io": None, "gps_valid": True, "time_valid": True,
    }  # fmt: skip
    base.update(kw)
    return base


@pytest_twisted.async_yield_fixture
async def live(redis_session: RedisProcess, tmp_path: Path) -> AsyncIterator[Live]:
    running = await start_live(redis_session, tmp_path, tokens=TOKENS)
    try:
        yield running
    finally:
        await running.stop()


# --------------------------------------------------------------------------- page


@pytest_twisted.ensureDeferred
async def test_page_is_served_at_root_self_contained(live: Live) -> None:
    code, body = await http_get(f"http://127.0.0.1:{live.port}/")
    assert code == 200
    html = body.decode()
    assert "<canvas" in html and "/ws?token=" in html
    # self-contained: nothing fetched from anywhere (no src=, no href= to other files)
    assert "src=" not in html and "href=" not in html and "http" not in html.replace("https:", "")


# --------------------------------------------------------------------------- access


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("token", [None, "nope"])
async def test_missing_or_unknown_token_is_closed_with_1008(live: Live, token: str | None) -> None:
    client = await live.connect(token)
    code, reason = await client.wait_closed()
    assert code == 1008
    assert reason == "bad or missing token"
    assert live.sample("processor_live_closes_total", code="1008") == 1
    assert client.received == []  # no token, no data


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("via", ["header", "query"])
async def test_token_by_header_or_query(live: Live, via: str) -> None:
    client = await live.connect("t-all", via=via)
    client.send_json({"type": "subscribe", "devices": [IMEI_A]})
    assert (await client.expect("subscribed"))["devices"] == [IMEI_A]
    client.sendClose(1000)
    assert (await client.wait_closed())[0] == 1000
    await wait_for(lambda: live.sample("processor_live_closes_total", code="1000") == 1)
    assert live.sample("processor_live_connections") == 0


@pytest_twisted.ensureDeferred
async def test_token_scoping(live: Live, redis_session: RedisProcess) -> None:
    client = await live.connect("t-a")
    client.send_json({"type": "subscribe", "devices": [IMEI_A, IMEI_B]})
    refused = await client.expect("error")
    assert refused == {"type": "error", "reason": "not permitted", "devices": [IMEI_B]}
    assert (await client.expect("subscribed"))["devices"] == [IMEI_A]
    # "*" with a scoped token means the token's devices
    client.send_json({"type": "subscribe", "devices": "*"})
    assert (await client.expect("subscribed"))["devices"] == [IMEI_A]
    xadd(redis_session, IMEI_B, 1)
    xadd(redis_session, IMEI_C, 1)
    xadd(redis_session, IMEI_A, 2)
    pos = await client.expect("position")
    assert pos["device_id"] == IMEI_A  # B and C were never sent
    assert live.sample("processor_live_subscriptions") == 1


@pytest_twisted.ensureDeferred
async def test_sighup_reload_revokes_and_narrows(
    live: Live, redis_session: RedisProcess, tmp_path: Path
) -> None:
    revoked = await live.connect("t-all")
    narrowed = await live.connect("t-ab")
    narrowed.send_json({"type": "subscribe", "devices": [IMEI_A, IMEI_B]})
    assert (await narrowed.expect("subscribed"))["devices"] == [IMEI_A, IMEI_B]

    write_tokens(tmp_path / "live-tokens", {"t-ab": IMEI_A})
    os.kill(os.getpid(), signal.SIGHUP)
    assert await revoked.wait_closed() == (1008, "token revoked")
    assert (await narrowed.expect("unsubscribed"))["devices"] == [IMEI_B]
    assert live.sample("processor_live_token_reloads_total", result="ok") == 2
    xadd(redis_session, IMEI_B, 1)
    xadd(redis_session, IMEI_A, 1)
    assert (await narrowed.expect("position"))["device_id"] == IMEI_A

    # a bad file is refused as a whole: the previous tokens stay
    (tmp_path / "live-tokens").write_text("t-ab 12345\n")
    assert live.svc.reload_tokens() is False
    assert live.sample("processor_live_token_reloads_total", result="error") == 1
    again = await live.connect("t-ab")
    again.send_json({"type": "subscribe", "devices": [IMEI_A]})
    assert (await again.expect("subscribed"))["devices"] == [IMEI_A]


@pytest_twisted.ensureDeferred
async def test_external_hook_for_tokens_the_file_does_not_know(
    redis_session: RedisProcess, tmp_path: Path
) -> None:
    asked: list[tuple[str | None, str]] = []

    class Hook:
        def authorize(self, token: str | None, info: Any) -> defer.Deferred[Access | None]:
            asked.append((token, info.path))
            if token == "from-sso":
                return defer.succeed(Access(frozenset({IMEI_B})))
            return defer.fail(RuntimeError("authorisation service down"))

    running = await start_live(redis_session, tmp_path, tokens={"local": "*"})
    running.svc.authorizer.hook = Hook()
    try:
        local = await running.connect("local")  # known to the file: the hook is not asked
        sso = await running.connect("from-sso")
        sso.send_json({"type": "subscribe", "devices": "*"})
        assert (await sso.expect("subscribed"))["devices"] == [IMEI_B]
        down = await running.connect("other")  # the hook fails: refused
        assert (await down.wait_closed())[0] == 1008
        assert asked == [("from-sso", "/ws"), ("other", "/ws")]
        local.sendClose(1000)
    finally:
        await running.stop()


# --------------------------------------------------------------------------- messages


@pytest_twisted.ensureDeferred
async def test_subscribe_snapshot_then_live_positions(
    redis_session: RedisProcess, tmp_path: Path
) -> None:
    snaps = Snapshots({IMEI_A: row(IMEI_A, "2026-12-01T10:00:00.000Z", speed=33)})
    running = await start_live(redis_session, tmp_path, tokens=TOKENS, snapshot=snaps)
    try:
        client = await running.connect("t-all")
        client.send_json({"type": "subscribe", "devices": [IMEI_A]})
        assert await client.expect("subscribed") == {"type": "subscribed", "devices": [IMEI_A]}
        snap = await client.expect("position")
        assert snap["snapshot"] is True and snap["speed"] == 33
        assert snap["ts"] == "2026-12-01T10:00:00.000Z"
        assert snaps.calls == [frozenset({IMEI_A})]

        xadd(redis_session, IMEI_A, 5, speed=77)
        pos = await client.expect("position")
        assert pos["device_id"] == IMEI_A and pos["speed"] == 77 and "snapshot" not in pos
        assert pos["ts"] == "2023-11-14T22:13:25.000Z"
        assert pos["latitude"] == pytest.approx(54.6874635)
        assert pos["attributes"] == {"21": 3}
        assert isinstance(pos["lag_ms"], int) and pos["lag_ms"] >= 0
        assert running.sample("processor_live_messages_sent_total", type="position") == 2
        assert running.sample("processor_live_messages_sent_total", type="subscribed") == 1
        assert running.sample("processor_live_broadcast_lag_seconds_count") == 1

        client.send_json({"type": "unsubscribe", "devices": [IMEI_A]})
        assert await client.expect("unsubscribed") == {"type": "unsubscribed", "devices": [IMEI_A]}
        assert running.sample("processor_live_subscriptions") == 0
        client.send_json({"type": "subscribe", "devices": [IMEI_B]})
        await client.expect("subscribed")
        xadd(redis_session, IMEI_A, 6)
        xadd(redis_session, IMEI_B, 6)
        assert (await client.expect("position"))["device_id"] == IMEI_B
        assert running.sample("processor_live_messages_sent_total", type="unsubscribed") == 1
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_the_reader_starts_at_the_tail(redis_session: RedisProcess, tmp_path: Path) -> None:
    xadd(redis_session, IMEI_A, 1)  # before the feed started: history, not live
    running = await start_live(redis_session, tmp_path, tokens=TOKENS)
    try:
        client = await running.connect("t-all")
        client.send_json({"type": "subscribe", "devices": [IMEI_A]})
        await client.expect("subscribed")
        xadd(redis_session, IMEI_A, 2)
        assert (await client.expect("position"))["ts"] == "2023-11-14T22:13:22.000Z"
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_redis_going_away_and_back(redis_proc: RedisProcess, tmp_path: Path) -> None:
    running = await start_live(redis_proc, tmp_path, tokens=TOKENS)
    try:
        client = await running.connect("t-all")
        client.send_json({"type": "subscribe", "devices": [IMEI_A]})
        await client.expect("subscribed")
        redis_proc.kill()
        await wait_for(lambda: running.sample("processor_live_reads_total", result="error") >= 1)
        assert client.close_code is None  # the clients stay; the feed is only quiet
        redis_proc.restart()
        xadd(redis_proc, IMEI_A, 3)
        pos = await client.expect("position", timeout=15)  # reconnect backoff is short
        assert pos["ts"] == "2023-11-14T22:13:23.000Z"
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_snapshot_failure_is_an_error_message_not_a_close(
    redis_session: RedisProcess, tmp_path: Path
) -> None:
    def broken(devices: Any) -> defer.Deferred[list[dict[str, Any]]]:
        return defer.fail(ConnectionError("PostgreSQL is down"))

    running = await start_live(redis_session, tmp_path, tokens=TOKENS, snapshot=broken)
    try:
        client = await running.connect("t-all")
        client.send_json({"type": "subscribe", "devices": [IMEI_A]})
        await client.expect("subscribed")
        assert await client.expect("error") == {"type": "error", "reason": "snapshot unavailable"}
        xadd(redis_session, IMEI_A, 4)  # live positions flow all the same
        assert (await client.expect("position"))["device_id"] == IMEI_A
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_star_subscription_and_its_unsubscribe(
    live: Live, redis_session: RedisProcess
) -> None:
    client = await live.connect("t-all")
    client.send_json({"type": "subscribe", "devices": "*"})
    assert (await client.expect("subscribed"))["devices"] == "*"
    xadd(redis_session, IMEI_C, 1)
    assert (await client.expect("position"))["device_id"] == IMEI_C
    client.send_json({"type": "unsubscribe", "devices": [IMEI_C]})
    err = await client.expect("error")
    assert err["reason"].startswith('subscribed to "*"')
    client.send_json({"type": "unsubscribe", "devices": "*"})
    assert (await client.expect("unsubscribed"))["devices"] == "*"
    assert live.sample("processor_live_messages_sent_total", type="error") == 1


@pytest_twisted.ensureDeferred
async def test_live_position_during_snapshot_wins_over_an_older_snapshot(
    redis_session: RedisProcess, tmp_path: Path
) -> None:
    snaps = Snapshots({IMEI_A: row(IMEI_A, "2020-01-01T00:00:00.000Z")})
    snaps.gate = defer.Deferred()
    running = await start_live(redis_session, tmp_path, tokens=TOKENS, snapshot=snaps)
    try:
        client = await running.connect("t-all")
        client.send_json({"type": "subscribe", "devices": [IMEI_A]})
        await client.expect("subscribed")
        xadd(redis_session, IMEI_A, 1)
        await wait_for(lambda: running.sample("processor_live_reads_total", result="ok") >= 1)
        assert client.received[-1]["type"] == "subscribed"  # held while the snapshot runs
        snaps.gate.callback(None)
        pos = await client.expect("position")
        assert "snapshot" not in pos and pos["ts"] == "2023-11-14T22:13:21.000Z"
        # nothing else: send one more and it must be the next message
        xadd(redis_session, IMEI_A, 2)
        assert (await client.expect("position"))["ts"] == "2023-11-14T22:13:22.000Z"
    finally:
        await running.stop()


@pytest.mark.parametrize(
    ("message", "binary"),
    [
        (b"{not json", False),
        (b'{"type":"subscribe","devices":["356307042441013"]}', True),
        (b'{"type":"hello"}', False),
        (b'["subscribe"]', False),
        (b'{"type":"subscribe","devices":["12345"]}', False),
        (b'{"type":"subscribe","devices":"356307042441013"}', False),
    ],
    ids=["bad-json", "binary", "unknown-type", "not-object", "bad-imei", "devices-not-list"],
)
@pytest_twisted.ensureDeferred
async def test_protocol_violation_closes_with_4000(
    live: Live, message: bytes, binary: bool
) -> None:
    client = await live.connect("t-all")
    client.sendMessage(message, isBinary=binary)
    code, _reason = await client.wait_closed()
    assert code == 4000
    assert live.sample("processor_live_closes_total", code="4000") == 1


@pytest_twisted.ensureDeferred
async def test_oversized_message_closes_with_1009(
    redis_session: RedisProcess, tmp_path: Path
) -> None:
    running = await start_live(redis_session, tmp_path, tokens=TOKENS, max_message_bytes=1024)
    try:
        client = await running.connect("t-all")
        client.send_json({"type": "subscribe", "devices": [IMEI_A] * 100})
        assert (await client.wait_closed())[0] == 1009
        await wait_for(lambda: running.sample("processor_live_closes_total", code="1009") == 1)
    finally:
        await running.stop()


# --------------------------------------------------------------------------- shutdown, heartbeat


@pytest_twisted.ensureDeferred
async def test_stop_closes_clients_with_1001(live: Live) -> None:
    clients = [await live.connect("t-all") for _ in range(3)]
    await live.stop()
    for c in clients:
        assert await c.wait_closed() == (1001, "server shutting down")
    assert live.sample("processor_live_closes_total", code="1001") == 3
    assert live.sample("processor_live_connections") == 0


class SilentClient(FeedClient):
    def __init__(self) -> None:
        super().__init__()
        self.answer_pings = False


@pytest_twisted.ensureDeferred
async def test_pings_and_a_client_that_never_pongs_is_dropped(
    redis_session: RedisProcess, tmp_path: Path
) -> None:
    running = await start_live(
        redis_session, tmp_path, tokens=TOKENS, ping_interval=0.3, ping_timeout=2.0
    )
    try:
        alive = await running.connect("t-all")
        silent = await running.connect("t-all", client_cls=SilentClient)
        code, _ = await silent.wait_closed()
        assert code == 1006
        assert running.sample("processor_live_ping_timeouts_total") == 1
        assert running.sample("processor_live_closes_total", code="1006") == 1
        await wait_for(lambda: alive.pings >= 2)
        assert alive.close_code is None  # the one answering pongs stays
    finally:
        await running.stop()


# --------------------------------------------------------------------------- back-pressure


def positions(imei: str, n: int, pad: int = 0) -> list[Any]:
    return [
        position_from_row(row(imei, f"2026-12-01T10:{i // 60:02d}:{i % 60:02d}.000Z",
                              speed=i, pad="x" * pad))
        for i in range(n)
    ]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_slow_client_loses_intermediate_positions_but_gets_the_newest(live: Live) -> None:
    client = await live.connect("t-all")
    client.send_json({"type": "subscribe", "devices": [IMEI_A]})
    await client.expect("subscribed")
    # 300 positions of ~1.4 kB in one turn: the transport's buffer fills, then the
    # rest of the burst collapses into the newest position
    burst = positions(IMEI_A, 300, pad=1000)
    for p in burst:
        live.svc.factory.hub.publish(p)
    dropped = live.sample("processor_live_positions_dropped_total")
    assert dropped > 0
    await wait_for(lambda: client.received and client.received[-1].get("speed") == 299)
    speeds = [m["speed"] for m in client.received if m["type"] == "position"]
    assert speeds == sorted(speeds) and speeds[-1] == 299
    assert len(speeds) == 300 - dropped
    assert client.close_code is None


def live_pending_dropped(running: Live) -> float:
    return running.sample("processor_live_positions_dropped_total")


class StalledClient(FeedClient):
    """Stops reading from its socket once subscribed; a small receive buffer so that the
    kernel does not absorb megabytes first."""

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        super().connectionMade()

    stalled = False

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        super().onMessage(payload, isBinary)
        if not self.stalled:
            self.stalled = True
            self.transport.pauseProducing()


@pytest_twisted.ensureDeferred
async def test_slow_client_is_bounded_then_closed_with_4001(
    redis_session: RedisProcess, tmp_path: Path
) -> None:
    running = await start_live(
        redis_session, tmp_path, tokens=TOKENS, max_pending_bytes=50_000,
        close_handshake_timeout=10.0,
    )  # fmt: skip
    try:
        client = await running.connect("t-all", client_cls=StalledClient)
        client.send_json({"type": "subscribe", "devices": "*"})
        await client.expect("subscribed")
        (server_side,) = running.svc.factory.clients
        server_side.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # distinct devices: nothing to collapse, the pending positions grow to the bound
        hub = running.svc.factory.hub
        for i in range(5000):
            hub.publish(positions(f"35630704{i:07d}", 1, pad=1000)[0])
            if server_side.state != server_side.STATE_OPEN:
                break
            if i % 50 == 49:  # let the reactor write what it can
                await deferLater(0.01)
        assert server_side.state == server_side.STATE_CLOSING
        assert live_pending_dropped(running) > 0
        client.transport.resumeProducing()  # read everything: the close frame is at the end
        code, reason = await client.wait_closed(10)
        assert (code, reason) == (4001, "slow consumer")
        await wait_for(lambda: running.sample("processor_live_closes_total", code="4001") == 1)
    finally:
        await running.stop()
