"""Shared fixtures. Reactor tests use pytest-twisted (its default reactor)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
