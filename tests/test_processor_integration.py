"""The processor in-process against a real redis-server and a real PostgreSQL that the suite
started itself: rows exactly once, resends, PostgreSQL down, poison entries, claims,
migrations, partitions, device state, metrics and probes."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import pytest_twisted

from teltonika_ingest.codec import decode_avl_frame, record_payload
from teltonika_ingest.config import ProcessorConfig
from teltonika_ingest.processor import migrate
from teltonika_ingest.processor.tap import ProcessorService

from device import wait_for
from pgproc import PgProcess
from procsupport import (
    DLQ,
    GROUP,
    IMEI,
    STREAM,
    Running,
    add,
    add_many,
    count_rows,
    device_id,
    fields,
    payload,
    pending,
    processor_args,
    query,
    start_processor,
)
from redisproc import RedisProcess
from support import VECTORS, make_record

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


async def post(running: Running, path: str) -> tuple[int, bytes]:
    from twisted.internet import reactor
    from twisted.web.client import Agent, readBody

    response: Any = await Agent(reactor).request(
        b"POST", f"http://127.0.0.1:{running.http_port}{path}".encode()
    )
    return response.code, await readBody(response)


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={"PATH": str(BIN)})


@pytest_twisted.async_yield_fixture
async def processor(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path
) -> AsyncIterator[Running]:
    running = await start_processor(redis_session, pg_url, tmp_path)
    yield running
    await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_every_vector_lands_exactly_with_its_values(
    processor: Running, redis_session: RedisProcess, pg_url: str
) -> None:
    bodies: list[tuple[str, bytes]] = []
    for v in VECTORS:
        if v["kind"] == "avl":
            packet = decode_avl_frame(bytes.fromhex(v["hex"]))
            for r in packet.records:
                bodies.append(
                    (
                        packet.codec,
                        record_payload(r, IMEI, packet.codec, "2026-11-22T10:00:00.123Z"),
                    )
                )
    edge = make_record(
        99, io8={78: 2**64 - 1}, iox={385: b"\x01\x02\x03\x04"},
        longitude=-252793217, latitude=-546872135,
    )  # fmt: skip
    bodies.append(("8E", record_payload(edge, IMEI, "8E", "2026-11-22T10:00:00.123Z")))
    with redis_session.client() as c:
        c.pipeline(["XADD", STREAM, "*", *fields(b, IMEI, codec)] for codec, b in bodies)
    await wait_for(lambda: count_rows(pg_url) == len(bodies), timeout=10)
    await wait_for(lambda: pending(redis_session) == 0)
    rows = query(
        pg_url,
        "SELECT codec, ts, longitude, latitude, attributes, generation_type, io, gps_valid "
        "FROM positions ORDER BY ts",
    )
    by_ts = {r[1]: r for r in rows}
    for codec, body in bodies:
        p = orjson.loads(body)
        ts = datetime.fromisoformat(p["timestamp"])
        row = by_ts[ts]
        assert row[0] == codec
        assert (row[2], row[3]) == (p["longitude"], p["latitude"])
        assert row[5] == p["generation_type"]
        assert row[6] is None and row[7] is p["gps_valid"]  # the flags of contract.md §8
        attrs_db = row[4]
        for key, value in p["attributes"].items():
            if isinstance(value, dict) and "__bigint" in value:
                assert attrs_db[key] == int(value["__bigint"])
            elif isinstance(value, dict):
                assert attrs_db[key] == value["__buffer_b64"]
            else:
                assert attrs_db[key] == value
    edge_row = next(r for r in rows if r[2] == -25.2793217)
    assert edge_row[4]["78"] == 18446744073709551615 and edge_row[3] == -54.6872135
    # exact in jsonb: the number as PostgreSQL holds it
    assert query(pg_url, "SELECT attributes->>'78' FROM positions WHERE longitude < 0") == [
        ("18446744073709551615",)
    ]
    newest = max(by_ts)
    assert query(pg_url, "SELECT device_id, ts FROM last_positions") == [(IMEI, newest)]
    s = processor.sample
    assert s("processor_consumer_records_total") == len(bodies)
    assert s("processor_position_writes_total", status="inserted") == len(bodies)
    assert s("processor_acks_total") == len(bodies)
    assert s("processor_consumer_reads_total", result="ok") >= 1
    assert s("processor_consumer_reads_total", result="empty") >= 1
    assert s("processor_write_duration_seconds_count") >= 1
    # one observation per packet (consecutive rows sharing received_at): every record here
    # has the same one, so one per batch written
    assert s("processor_commit_delay_seconds_count") == s("processor_write_duration_seconds_count")
    assert s("processor_device_state_size") == 1
    assert s("processor_device_state_loads_total") >= 1
    assert s("processor_postgres_up") == 1 and s("processor_redis_up") == 1
    code, text = await processor.get("/metrics")
    assert code == 200 and b'processor_position_writes_total{status="inserted"}' in text
    tool = str(BIN / "teltonika-ingest")
    as_json = cli(tool, "positions", IMEI, "--database-url", pg_url, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    lines = [orjson.loads(x) for x in as_json.stdout.splitlines()]
    assert len(lines) == len(bodies) and lines[-1]["timestamp"] == max(
        orjson.loads(b)["timestamp"] for _c, b in bodies
    )
    geo = cli(tool, "positions", IMEI, "--database-url", pg_url, "--format", "geojson",
              "--since", "2019-06-10T10:04:47Z", "--limit", "2")  # fmt: skip
    features = orjson.loads(geo.stdout)["features"]
    assert len(features) == 2
    assert all(f["properties"]["timestamp"] >= "2019-06-10T10:04:47" for f in features)
    table = cli(tool, "positions", IMEI, "--database-url", pg_url, "--since", "1h")
    assert table.returncode == 0 and table.stdout.count("\n") == 1  # the header only
    bad = cli(tool, "positions", IMEI, "--database-url", pg_url, "--since", "yesterday")
    assert bad.returncode == 1 and "expected an ISO 8601 time" in bad.stderr


@pytest_twisted.ensureDeferred
async def test_resend_is_a_duplicate_not_a_second_row(
    processor: Running, redis_session: RedisProcess, pg_url: str
) -> None:
    body = payload(1)
    add(redis_session, [body])
    await wait_for(lambda: count_rows(pg_url) == 1)
    add(redis_session, [body, body])  # the device resent after a lost ACK, twice
    await wait_for(lambda: processor.sample("processor_acks_total") == 3)
    assert count_rows(pg_url) == 1
    assert processor.sample("processor_position_writes_total", status="duplicate") == 2
    assert processor.sample("processor_position_writes_total", status="inserted") == 1
    assert pending(redis_session) == 0


@pytest_twisted.ensureDeferred
async def test_postgres_down_nothing_acknowledged_then_everything_exactly_once(
    redis_session: RedisProcess, pg_server: PgProcess, pg_url: str, tmp_path: Path
) -> None:
    running = await start_processor(
        redis_session, pg_url, tmp_path, "--write-retry-max", "0.5", "--batch-size", "20"
    )
    try:
        add_many(redis_session, 50, devices=5)
        await wait_for(lambda: count_rows(pg_url) == 50, timeout=10)
        pg_server.stop()
        try:
            add_many(redis_session, 100, devices=5, start=50)
            await wait_for(lambda: running.sample("processor_write_retries_total") >= 2, timeout=10)
            assert running.sample("processor_acks_total") == 50
            assert running.sample("processor_postgres_up") == 0
            assert pending(redis_session) > 0  # read, not acknowledged
            await wait_for(lambda: running.sample("processor_consumer_lag") > 0, timeout=5)
            assert running.sample("processor_consumer_pending") > 0
            await wait_for(
                lambda: running.svc.readiness().addCallback(lambda r: r is not None), timeout=20
            )
            code, body = await running.get("/readyz")
            assert code == 503 and b"postgres" in body
        finally:
            pg_server.start()
        await wait_for(lambda: running.sample("processor_acks_total") == 150, timeout=20)
        assert count_rows(pg_url) == 150
        assert query(pg_url, "SELECT count(DISTINCT (device_id, ts)) FROM positions") == [(150,)]
        assert pending(redis_session) == 0
        await wait_for(lambda: running.sample("processor_consumer_lag") == 0)
        assert running.sample("processor_postgres_up") == 1
        await wait_for(lambda: running.svc.readiness().addCallback(lambda r: r is None), timeout=10)
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_poison_entry_dead_lettered_after_n_deliveries(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path
) -> None:
    running = await start_processor(
        redis_session, pg_url, tmp_path,
        "--dlq-attempts", "3", "--claim-idle", "0.2", "--claim-interval", "0.2",
    )  # fmt: skip
    try:
        bad_id = redis_session.cmd(
            "XADD", STREAM, "*", "imei", IMEI, "codec", "8E", "ts", "x", "payload", "{broken"
        )
        add_many(redis_session, 10)
        await wait_for(lambda: count_rows(pg_url) == 10)
        await wait_for(lambda: running.sample("processor_dead_letters_total") == 1, timeout=10)
        letters = redis_session.cmd("XRANGE", DLQ, "-", "+")
        assert len(letters) == 1
        letter = dict(zip(letters[0][1][0::2], letters[0][1][1::2], strict=True))
        assert letter["entry_id"] == bad_id
        assert letter["deliveries"] == "3"
        assert letter["error"] == "decode: payload is not JSON"
        assert letter["payload"] == "{broken" and letter["imei"] == IMEI
        assert running.sample("processor_decode_errors_total") == 3
        assert running.sample("processor_claims_total") >= 2
        assert pending(redis_session) == 0
        assert running.sample("processor_acks_total") == 11
        url = f"redis://127.0.0.1:{redis_session.port}/0"
        replay = cli(str(BIN / "teltonika-processor"), "dlq", "replay", "--redis-url", url)
        assert replay.returncode == 2  # still not JSON: stays in the dead-letter stream
        assert "still_failing" in replay.stdout and redis_session.cmd("XLEN", DLQ) == 1
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_row_refused_by_postgres_is_isolated_and_dead_lettered(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path
) -> None:
    running = await start_processor(
        redis_session, pg_url, tmp_path,
        "--dlq-attempts", "2", "--claim-idle", "0.2", "--claim-interval", "0.2",
    )  # fmt: skip
    try:
        # an operator's constraint the decoder knows nothing about
        query(pg_url, "ALTER TABLE positions ADD CONSTRAINT no_999 CHECK (speed <> 999)")
        bodies = [payload(i, speed=999 if i == 7 else 40) for i in range(20)]
        ids = add(redis_session, bodies)
        await wait_for(lambda: count_rows(pg_url) == 19)
        await wait_for(lambda: running.sample("processor_dead_letters_total") == 1, timeout=10)
        letter = redis_session.cmd("XRANGE", DLQ, "-", "+")[0][1]
        letter_fields = dict(zip(letter[0::2], letter[1::2], strict=True))
        assert letter_fields["entry_id"] == ids[7]
        assert "no_999" in letter_fields["error"]
        assert running.sample("processor_position_writes_total", status="failed") >= 2
        assert pending(redis_session) == 0
        url = f"redis://127.0.0.1:{redis_session.port}/0"
        listed = cli(str(BIN / "teltonika-processor"), "dlq", "list", "--redis-url", url)
        assert listed.returncode == 0, listed.stderr
        (line,) = listed.stdout.splitlines()
        assert orjson.loads(line)["entry_id"] == ids[7]
        # the cause fixed, the entry replayed: it is written like any new one
        query(pg_url, "ALTER TABLE positions DROP CONSTRAINT no_999")
        replayed = cli(str(BIN / "teltonika-processor"), "dlq", "replay", "--redis-url", url)
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 1, still failing 0" in replayed.stderr
        await wait_for(lambda: count_rows(pg_url) == 20, timeout=10)
        assert redis_session.cmd("XLEN", DLQ) == 0
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_entries_of_a_dead_consumer_are_claimed(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path
) -> None:
    redis_session.cmd("XGROUP", "CREATE", STREAM, GROUP, "0", "MKSTREAM")
    add_many(redis_session, 30, devices=3)
    redis_session.cmd("XREADGROUP", "GROUP", GROUP, "ghost", "COUNT", 30, "STREAMS", STREAM, ">")
    running = await start_processor(
        redis_session, pg_url, tmp_path, "--claim-idle", "0.3", "--claim-interval", "0.2"
    )
    try:
        await wait_for(lambda: count_rows(pg_url) == 30, timeout=10)
        await wait_for(lambda: pending(redis_session) == 0)
        assert running.sample("processor_claims_total") == 30
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_own_pending_entries_are_read_first_after_a_restart(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path
) -> None:
    redis_session.cmd("XGROUP", "CREATE", STREAM, GROUP, "0", "MKSTREAM")
    add_many(redis_session, 20)
    # a previous life of this consumer read them and died before writing
    redis_session.cmd("XREADGROUP", "GROUP", GROUP, "test-a", "COUNT", 20, "STREAMS", STREAM, ">")
    running = await start_processor(redis_session, pg_url, tmp_path)  # claim-idle 60 s
    try:
        await wait_for(lambda: count_rows(pg_url) == 20, timeout=10)
        await wait_for(lambda: pending(redis_session) == 0)
        assert running.sample("processor_claims_total") == 0
    finally:
        await running.svc.stopService()


def test_migrations_raced_by_two_instances(pg_url: str) -> None:
    results: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def instance() -> None:
        try:
            with psycopg.connect(pg_url) as conn:
                barrier.wait(5)
                results.append(migrate.migrate(conn))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=instance) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(results) == [[], [1]]
    assert query(pg_url, "SELECT version FROM schema_migrations") == [(1,)]
    with psycopg.connect(pg_url) as conn:
        assert migrate.migrate(conn) == []


def test_native_partitioning_fallback_and_partitions_ahead(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        migrate.migrate(conn)
        assert migrate.storage_kind(conn) == "partitioned"  # no TimescaleDB here
        assert migrate.ensure_partitions(conn, -1, 7) == 9
        assert migrate.ensure_partitions(conn, -1, 7) == 0
    today = datetime.now(UTC).date()
    names = {
        r[0]
        for r in query(
            pg_url,
            "SELECT relname FROM pg_class WHERE relname LIKE 'positions_2%' AND relkind = 'r'",
        )
    }
    for offset in range(-1, 8):
        assert f"positions_{(today + timedelta(days=offset)):%Y%m%d}" in names
    # a row of a day without a partition goes to the default one, and moves when its day's
    # partition is made
    cols = (
        "device_id, ts, received_at, codec, priority, longitude, latitude, altitude, angle, "
        "satellites, speed, event_io_id, attributes"
    )
    values = "'1', '2020-02-02T10:00Z', now(), '8', 0, 0, 0, 0, 0, 0, 0, 0, '{}'"
    query(pg_url, f"INSERT INTO positions ({cols}) VALUES ({values})")
    assert query(pg_url, "SELECT count(*) FROM positions_default") == [(1,)]
    assert query(pg_url, "SELECT positions_ensure_partition('2020-02-02')") == [(True,)]
    assert query(pg_url, "SELECT count(*) FROM positions_default") == [(0,)]
    assert query(pg_url, "SELECT count(*) FROM positions_20200202") == [(1,)]
    assert count_rows(pg_url) == 1


@pytest_twisted.ensureDeferred
async def test_device_state_seeded_from_last_positions_bounded_and_forward_only(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path
) -> None:
    first = await start_processor(redis_session, pg_url, tmp_path)
    try:
        add(redis_session, [payload(10)])
        await wait_for(lambda: count_rows(pg_url) == 1)
    finally:
        await first.svc.stopService()
    second = await start_processor(redis_session, pg_url, tmp_path, "--device-state-size", "2")
    try:
        add(redis_session, [payload(5)])  # older than the stored last position
        await wait_for(lambda: second.sample("processor_acks_total") == 1)
        assert second.sample("processor_device_state_loads_total") == 1
        newest = datetime.fromisoformat(orjson.loads(payload(10))["timestamp"])
        assert query(pg_url, "SELECT ts FROM last_positions") == [(newest,)]
        state = second.svc.state.get(IMEI)
        assert state is not None and state.ts == newest
        for k in range(3):
            add(redis_session, [payload(20 + k, device_id(k))], device=device_id(k))
        await wait_for(lambda: second.sample("processor_acks_total") == 4)
        assert second.sample("processor_device_state_size") == 2
        assert second.sample("processor_device_state_evictions_total") == 2
        assert query(pg_url, "SELECT count(*) FROM last_positions") == [(4,)]
        # force-rehydrate: forgotten, then loaded again on the device's next record
        dev = device_id(2)
        assert second.svc.state.get(dev) is not None
        code, body = await post(second, f"/rehydrate?device={dev}")
        assert code == 200 and orjson.loads(body) == {"device": dev, "forgotten": True}
        assert dev not in second.svc.state
        loads = second.sample("processor_device_state_loads_total")
        add(redis_session, [payload(30, dev)], device=dev)
        await wait_for(lambda: second.sample("processor_acks_total") == 5)
        assert second.sample("processor_device_state_loads_total") == loads + 1
        code, _ = await post(second, "/rehydrate")
        assert code == 400
    finally:
        await second.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_probes(processor: Running) -> None:
    code, body = await processor.get("/healthz")
    assert code == 200
    await wait_for(lambda: processor.svc.readiness().addCallback(lambda r: r is None))
    code, body = await processor.get("/readyz")
    assert code == 200, body


@pytest_twisted.ensureDeferred
async def test_unhandled_errors_are_counted_and_the_loop_goes_on(
    processor: Running, redis_session: RedisProcess, pg_url: str
) -> None:
    def broken(rows: Any) -> None:
        raise RuntimeError("hook bug")

    processor.svc.consumer.written_hooks.append(broken)
    add_many(redis_session, 3)
    await wait_for(lambda: processor.sample("processor_unhandled_errors_total") >= 1)
    add_many(redis_session, 3, start=3)
    await wait_for(lambda: count_rows(pg_url) == 6)


@pytest_twisted.ensureDeferred
async def test_redis_lost_between_commit_and_xack_gives_duplicates_not_losses(
    redis_proc: RedisProcess, pg_url: str, tmp_path: Path
) -> None:
    running = await start_processor(
        redis_proc, pg_url, tmp_path,
        "--claim-idle", "0.5", "--claim-interval", "0.3", "--batch-size", "100",
    )  # fmt: skip
    try:
        add_many(redis_proc, 50)
        await wait_for(lambda: count_rows(pg_url) == 50)
        with psycopg.connect(pg_url) as lock:
            lock.execute("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")
            add_many(redis_proc, 50, start=50)
            # all 50 read (a batch blocked in its write, the next one read meanwhile)
            await wait_for(lambda: pending(redis_proc) == 50, timeout=10)
            await wait_for(lambda: running.sample("processor_consumer_pending") > 0)
            redis_proc.stop()  # AOF kept: the pending entries survive the restart
            await wait_for(lambda: running.sample("processor_redis_up") == 0)
        # the lock is released: the writes commit, their XACKs fail
        await wait_for(lambda: count_rows(pg_url) == 100, timeout=10)
        await wait_for(lambda: running.sample("processor_ack_failures_total") >= 1)
        assert running.sample("processor_acks_total") == 50
        await wait_for(
            lambda: running.sample("processor_consumer_reads_total", result="error") >= 1
        )
        redis_proc.start()
        # claimed again after --claim-idle: written again as duplicates, then acknowledged
        await wait_for(lambda: pending(redis_proc) == 0, timeout=15)
        assert running.sample("processor_position_writes_total", status="duplicate") == 50
        assert count_rows(pg_url) == 100
        assert running.sample("processor_redis_up") == 1
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_postgres_down_at_start_waits_then_migrates_and_writes(
    redis_session: RedisProcess, pg_server: PgProcess, pg_url: str, tmp_path: Path
) -> None:
    config = ProcessorConfig.from_args(
        processor_args(redis_session, pg_url, "--write-retry-max", "0.5"),
        environ={},
        cwd=tmp_path,
    )
    add_many(redis_session, 10)
    pg_server.stop()
    svc = ProcessorService(config)
    svc.startService()
    try:
        try:

            def waiting_for_postgres() -> Any:
                return svc.readiness().addCallback(
                    lambda r: r is not None and r.startswith("starting: postgres:")
                )

            await wait_for(waiting_for_postgres, timeout=10)
            assert not svc.migrated.called and count_rows_or_none(pg_url) is None
        finally:
            pg_server.start()
        await wait_for(lambda: svc.migrated.called, timeout=15)
        await wait_for(lambda: count_rows(pg_url) == 10, timeout=10)
        await wait_for(lambda: pending(redis_session) == 0)
    finally:
        await svc.stopService()


def count_rows_or_none(url: str) -> int | None:
    try:
        return count_rows(url)
    except psycopg.Error:
        return None


def test_tune_garbage_collector_sets_thresholds_and_freezes() -> None:
    import gc

    from teltonika_ingest.processor.tap import tune_garbage_collector

    thresholds = gc.get_threshold()
    gc.set_threshold(701, 11, 12)
    gc.unfreeze()
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == (50_000, 20, 100)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest_twisted.ensureDeferred
async def test_garbage_collector_tuned_by_the_real_start_only(
    redis_session: RedisProcess,
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real twistd start (makeService) tunes the collector, as the ingest's does; a
    service built in a test leaves the process's collector alone."""
    from teltonika_ingest.processor import tap

    calls: list[str] = []
    monkeypatch.setattr(tap, "tune_garbage_collector", lambda: calls.append("tuned"))
    config = ProcessorConfig.from_args(
        processor_args(redis_session, pg_url), environ={}, cwd=tmp_path
    )
    in_test = ProcessorService(config)
    in_test.startService()
    await in_test.stopService()
    assert calls == []
    real = tap.makeService({"config": config})
    assert isinstance(real, ProcessorService) and real.process_wide
    real.startService()
    try:
        assert calls == ["tuned"]
    finally:
        await real.stopService()
