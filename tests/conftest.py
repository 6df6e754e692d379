"""Shared fixtures. Reactor tests use pytest-twisted (its default reactor)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from pgproc import PgProcess
from redisproc import RedisProcess


@pytest.fixture
def redis_proc() -> Iterator[RedisProcess]:
    """A fresh redis-server (appendonly, so restarts keep data) for one test."""
    proc = RedisProcess(appendonly=True).start()
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture(scope="session")
def _redis_session_server() -> Iterator[RedisProcess]:
    proc = RedisProcess().start()
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture
def redis_session(_redis_session_server: RedisProcess) -> RedisProcess:
    """The session's shared redis-server, emptied (FLUSHALL) for this test.
    Tests that stop, kill or pause a server use ``redis_proc`` instead."""
    proc = _redis_session_server
    if not proc.running:  # a test broke the rules: give the others a live one
        proc.start()
    proc.cmd("FLUSHALL")
    return proc


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgProcess]:
    """The session's own PostgreSQL (never the machine's shared one on 5432)."""
    proc = PgProcess().start()
    try:
        yield proc
    finally:
        proc.close()


_databases = itertools.count()


@pytest.fixture
def pg_url(pg_server: PgProcess) -> str:
    """A fresh, empty database on the session's PostgreSQL; its URL."""
    if not pg_server.running:  # a test stopped it and failed before starting it again
        pg_server.start()
    return pg_server.create_database(f"test_{os.getpid()}_{next(_databases)}")
