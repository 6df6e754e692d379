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
