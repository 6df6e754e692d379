"""The live feed inside the real processor (real redis-server, the suite's own PostgreSQL):
subscribe → snapshot from last_positions → live positions; two instances; a stalled client
against the durable path; token scoping; SIGTERM closes clients with 1001."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from teltonika_ingest.processor.live import LiveService
from teltonika_ingest.processor.live.access import Access

from device import deferLater, wait_for
from livefeed import FeedClient, connect, free_tcp_port, write_tokens
from procsupport import (
    IMEI,
    Running,
    add,
    add_many,
    count_rows,
    device_id,
    payload,
    processor_args,
    query,
    spawn_processor,
    start_processor,
)
from redisproc import RedisProcess

pytestmark = pytest.mark.integration

OTHER = device_id(7)


async def start_with_live(
    redis: RedisProcess, pg_url: str, tmp_path: Path, *args: str, tokens: dict[str, str]
) -> tuple[Running, int]:
    token_file = write_tokens(tmp_path / "live-tokens", tokens)
    running = await start_processor(
        redis, pg_url, tmp_path, "--live", "tcp:0:interface=127.0.0.1",
        "--live-tokens", str(token_file), *args,
    )  # fmt: skip
    live = running.svc.live
    assert isinstance(live, LiveService)
    port = await live.listening
    await live.reader.started
    return running, port.getHost().port


@pytest_twisted.ensureDeferred
async def test_subscribe_snapshot_then_live_positions(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path
) -> None:
    running, port = await start_with_live(redis_session, pg_url, tmp_path, tokens={"t": "*"})
    try:
        add(redis_session, [payload(i, speed=10 + i) for i in range(3)])
        await wait_for(lambda: query(pg_url, "SELECT speed FROM last_positions") == [(12,)])

        client = await connect(port, "t")
        client.send_json({"type": "subscribe", "devices": [IMEI, OTHER]})
        assert (await client.expect("subscribed"))["devices"] == sorted([IMEI, OTHER])
        snap = await client.expect("position")
        assert snap["snapshot"] is True and snap["device_id"] == IMEI and snap["speed"] == 12
        assert snap["ts"] == "2023-11-14T22:13:22.000Z"

        add(redis_session, [payload(3, speed=99)])
        live = await client.expect("position")
        assert live["speed"] == 99 and "snapshot" not in live
        assert live["attributes"]["78"] == 2**64 - 1  # 8-byte value decoded, exact
        assert live["received_at"] == "2026-11-22T10:00:00.123Z"
        assert running.sample("processor_live_messages_sent_total", type="position") == 2
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_client_on_one_instance_sees_what_the_other_processed(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, port = await start_with_live(
        redis_session, pg_url, tmp_path / "a", "--consumer", "a", tokens={"t": "*"}
    )
    b = await start_processor(redis_session, pg_url, tmp_path / "b", "--consumer", "b")
    try:
        client = await connect(port, "t")
        client.send_json({"type": "subscribe", "devices": "*"})
        await client.expect("subscribed")
        # a's durable consumer stops: from now on only b writes to PostgreSQL
        await a.svc.consumer.stopService()
        add_many(redis_session, 40, devices=4)
        await wait_for(
            lambda: b.sample("processor_position_writes_total", status="inserted") == 40,
            timeout=20,
        )
        assert a.sample("processor_position_writes_total", status="inserted") == 0
        assert count_rows(pg_url) == 40
        await wait_for(lambda: len(client.received) == 41)  # subscribed + 40 positions
        got = sorted((m["device_id"], m["ts"]) for m in client.received[1:])
        stored = sorted(
            (d, ts.strftime("%Y-%m-%dT%H:%M:%S.000Z"))
            for d, ts in query(pg_url, "SELECT device_id, ts AT TIME ZONE 'UTC' FROM positions")
        )
        assert got == stored
    finally:
        await a.svc.stopService()
        await b.svc.stopService()


class Stalled(FeedClient):
    stalled = False

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        super().connectionMade()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        super().onMessage(payload, isBinary)
        if not self.stalled:
            self.stalled = True
            self.transport.pauseProducing()


@pytest_twisted.ensureDeferred
async def test_a_stalled_client_is_closed_and_never_slows_the_durable_path(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path
) -> None:
    running, port = await start_with_live(redis_session, pg_url, tmp_path, tokens={"t": "*"})
    try:
        client = await connect(port, "t", client_cls=Stalled)
        client.send_json({"type": "subscribe", "devices": "*"})
        await wait_for(lambda: client.stalled)
        (server_side,) = running.svc.live.factory.clients  # type: ignore[union-attr]
        server_side.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        total = 0
        while server_side.state == server_side.STATE_OPEN:  # until the feed gives up on it
            assert total < 60_000, "the stalled client was never closed"
            add_many(redis_session, 2000, devices=10_000, start=total)  # distinct devices
            total += 2000
            await deferLater(0.05)
        await wait_for(lambda: running.sample("processor_live_closes_total", code="4001") == 1)
        # every entry is written, the stalled client notwithstanding
        await wait_for(lambda: count_rows(pg_url) == total, timeout=30)
        assert running.sample("processor_live_positions_dropped_total") > 0
        assert running.sample("processor_live_connections") == 0
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_token_scoping(redis_session: RedisProcess, pg_url: str, tmp_path: Path) -> None:
    running, port = await start_with_live(
        redis_session, pg_url, tmp_path, tokens={"mine": IMEI, "all": "*"}
    )
    try:
        scoped = await connect(port, "mine", via="query")
        scoped.send_json({"type": "subscribe", "devices": "*"})
        assert (await scoped.expect("subscribed"))["devices"] == [IMEI]
        everything = await connect(port, "all")
        everything.send_json({"type": "subscribe", "devices": "*"})
        await everything.expect("subscribed")
        add(redis_session, [payload(1, OTHER)], device=OTHER)
        add(redis_session, [payload(2)])
        assert [(await everything.expect("position"))["device_id"] for _ in range(2)] == [
            OTHER, IMEI
        ]  # fmt: skip
        assert (await scoped.expect("position"))["device_id"] == IMEI
        assert [m["type"] for m in scoped.received] == ["subscribed", "position"]
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_sigterm_closes_clients_with_going_away(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path
) -> None:
    port = free_tcp_port()
    token_file = write_tokens(tmp_path / "live-tokens", {"t": "*"})
    proc = spawn_processor(
        redis_session, pg_url, tmp_path, "sig",
        "--live", f"tcp:{port}:interface=127.0.0.1", "--live-tokens", str(token_file),
    )  # fmt: skip
    try:
        clients: list[FeedClient] = []

        async def two_connected() -> bool:  # start-up (embedded nothing: URLs given) is quick
            assert proc.poll() is None, (tmp_path / "sig.log").read_text()[-2000:]
            try:
                clients.append(await connect(port, "t", timeout=1))
            except Exception:
                return False
            return len(clients) == 2

        await wait_for(two_connected, timeout=30, interval=0.2)
        proc.send_signal(signal.SIGTERM)
        for c in clients:
            assert await c.wait_closed(15) == (1001, "server shutting down")
        await wait_for(lambda: proc.poll() is not None, timeout=30)
        assert proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class SsoHook:
    """What ``--live-auth-hook test_live_processor:SsoHook`` loads (a class: instantiated)."""

    def authorize(self, token: str | None, info: Any) -> Access | None:
        return Access(frozenset({OTHER})) if token == "from-sso" else None


@pytest_twisted.ensureDeferred
async def test_auth_hook_option(redis_session: RedisProcess, pg_url: str, tmp_path: Path) -> None:
    running, port = await start_with_live(
        redis_session, pg_url, tmp_path, "--live-auth-hook", "test_live_processor:SsoHook",
        tokens={"local": IMEI},
    )  # fmt: skip
    try:
        sso = await connect(port, "from-sso")
        sso.send_json({"type": "subscribe", "devices": "*"})
        assert (await sso.expect("subscribed"))["devices"] == [OTHER]
        local = await connect(port, "local")  # the file still answers for its tokens
        local.send_json({"type": "subscribe", "devices": "*"})
        assert (await local.expect("subscribed"))["devices"] == [IMEI]
        refused = await connect(port, "neither")
        assert (await refused.wait_closed())[0] == 1008
    finally:
        await running.svc.stopService()


def test_bad_token_file_or_hook_is_a_start_up_error(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path
) -> None:
    from teltonika_ingest.config import ProcessorConfig
    from teltonika_ingest.ops.startup import StartupError
    from teltonika_ingest.processor.tap import ProcessorService

    bad = tmp_path / "tokens"
    bad.write_text(f"ok {IMEI}\nbroken 12345\n")
    args = ["--live", "tcp:0", "--live-tokens", str(bad)]
    config = ProcessorConfig.from_args(processor_args(redis_session, pg_url, *args), environ={})
    with pytest.raises(StartupError, match=r"--live-tokens .*: .* line 2: not an IMEI"):
        ProcessorService(config)
    args = ["--live", "tcp:0", "--live-auth-hook", "no_such_module_here:Hook"]
    config = ProcessorConfig.from_args(processor_args(redis_session, pg_url, *args), environ={})
    with pytest.raises(StartupError, match=r"--live-auth-hook .*: cannot load the hook: Mod"):
        ProcessorService(config)
