"""The processor as real twistd processes: a SIGKILLed instance's entries are claimed by
another, two instances split a load, SIGTERM during load drains the batch in flight."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from procsupport import GROUP, STREAM, add_many, count_rows, pending, query, spawn_processor
from redisproc import RedisProcess, RespError

pytestmark = pytest.mark.integration


def wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def migrated(url: str) -> bool:
    try:
        return bool(query(url, "SELECT 1 FROM schema_migrations"))
    except psycopg.Error:
        return False


def pending_of(redis: RedisProcess, consumer: str) -> int:
    for name, count in redis.cmd("XPENDING", STREAM, GROUP)[3] or []:
        if name == consumer:
            return int(count)
    return 0


def consumers(redis: RedisProcess) -> list[Any]:
    """XINFO CONSUMERS of the group; none before the group exists."""
    try:
        return list(redis.cmd("XINFO", "CONSUMERS", STREAM, GROUP))
    except RespError:
        return []


class TableLock:
    """Holds an exclusive lock on positions: writers block inside their transaction."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url)
        self.conn.execute("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


def test_sigkilled_instance_entries_are_claimed_by_another(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    claim = ("--claim-idle", "1", "--claim-interval", "0.3", "--batch-size", "100")
    a = spawn_processor(redis_session, pg_url, tmp_path, "a", *claim)
    procs.append(a)
    wait(lambda: migrated(pg_url), 30, "migrations")
    wait(lambda: count_rows(pg_url) == 0 and pending(redis_session) == 0, 5, "a idle")
    lock = TableLock(pg_url)
    try:
        add_many(redis_session, 300, devices=10)
        wait(lambda: pending_of(redis_session, "a") > 0, 20, "a read entries")
        a.kill()  # SIGKILL: no drain, entries stay pending in consumer a
        a.wait(10)
    finally:
        lock.release()
    assert count_rows(pg_url) == 0
    b = spawn_processor(redis_session, pg_url, tmp_path, "b", *claim)
    procs.append(b)
    wait(lambda: count_rows(pg_url) == 300, 30, "all rows written by b")
    wait(lambda: pending(redis_session) == 0, 10, "everything acknowledged")
    assert query(pg_url, "SELECT count(DISTINCT (device_id, ts)) FROM positions") == [(300,)]
    assert "claimed" in (tmp_path / "b.log").read_text()


def test_two_instances_split_a_load_without_a_missing_or_doubled_row(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    for name in ("a", "b"):
        procs.append(spawn_processor(redis_session, pg_url, tmp_path, name, "--batch-size", "20"))
    wait(lambda: migrated(pg_url), 30, "migrations")
    wait(lambda: len(consumers(redis_session)) == 2, 20, "both read")
    total = 0
    for burst in range(10):  # bursts: both consumers get deliveries
        add_many(redis_session, 200, devices=50, start=burst * 200)
        total += 200
        time.sleep(0.05)
    wait(lambda: count_rows(pg_url) == total, 60, "all rows")
    wait(lambda: pending(redis_session) == 0, 10, "everything acknowledged")
    assert query(pg_url, "SELECT count(DISTINCT (device_id, ts)) FROM positions") == [(total,)]
    names = {dict(zip(c[0::2], c[1::2], strict=True))["name"] for c in consumers(redis_session)}
    assert names == {"a", "b"}
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("a", "b")}
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(30)
    # each wrote some of the batches
    for name in ("a", "b"):
        text = (tmp_path / f"{name}.log").read_text()
        batches = int(text.rsplit("consumer stopped reading (", 1)[1].split(" ")[0])
        assert batches > 0, (name, logs[name][-2000:])


def test_sigterm_during_load_writes_and_acknowledges_the_batch_in_flight(
    redis_session: RedisProcess, pg_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    a = spawn_processor(redis_session, pg_url, tmp_path, "a", "--batch-size", "500")
    procs.append(a)
    wait(lambda: migrated(pg_url), 30, "migrations")
    wait(lambda: pending(redis_session) == 0 and count_rows(pg_url) == 0, 5, "idle")
    lock = TableLock(pg_url)
    try:
        add_many(redis_session, 2000, devices=20)
        wait(lambda: pending_of(redis_session, "a") > 0, 20, "a batch in flight")
        in_flight = pending_of(redis_session, "a")
        a.send_signal(signal.SIGTERM)
        log_file = tmp_path / "a.log"
        # the signal is handled while the write is blocked on the lock: the drain has begun
        # and waits for the batch in flight
        wait(lambda: "shutdown: 1/5" in log_file.read_text(), 20, "the drain to begin")
        assert "shutdown: 2/5" not in log_file.read_text()
        assert a.poll() is None
    finally:
        lock.release()
    assert a.wait(30) == -signal.SIGTERM  # twistd re-raises the signal after a clean stop
    log = (tmp_path / "a.log").read_text()
    assert "shutdown complete" in log
    # what it had read (the batch in flight, and the one read meanwhile) was written and
    # acknowledged; the rest is still waiting for the group
    written = count_rows(pg_url)
    assert written >= in_flight
    assert pending(redis_session) == 0
    group = redis_session.cmd("XINFO", "GROUPS", STREAM)[0]
    assert dict(zip(group[0::2], group[1::2], strict=True))["lag"] == 2000 - written
