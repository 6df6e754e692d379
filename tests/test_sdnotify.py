"""systemd notify protocol against a real unix datagram socket: READY=1 only once the device
listener is up and Redis took a write, WATCHDOG=1 from the reactor, STATUS= lines,
STOPPING=1 at shutdown; unit-level with task.Clock, and a real ``twistd`` under
``NOTIFY_SOCKET``/``WATCHDOG_USEC`` as systemd would start it."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_startup import TWISTD, clean_env
from twisted.internet import defer, task

from teltonika_ingest.ops.sdnotify import SystemdNotifier, notify_address, watchdog_interval

from redisproc import RedisProcess, free_port


class NotifySocket:
    """What systemd listens on: a bound AF_UNIX datagram socket; ``messages`` reads them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []

    def until(self, predicate: object, timeout: float = 15.0) -> list[str]:
        """Read datagrams until ``predicate(received)`` is true; fail after ``timeout`` s."""
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        while not predicate(self.received):
            left = deadline - time.monotonic()
            assert left > 0, f"not within {timeout}s; got {self.received}"
            self.sock.settimeout(min(left, 1.0))
            with contextlib.suppress(TimeoutError):
                self.received.append(self.sock.recv(4096).decode())
        return self.received

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


def count(messages: list[str], line: str) -> int:
    return sum(line in m.split("\n") for m in messages)


# --------------------------------------------------------------------------- unit


def test_environment_parsing() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abstract") == b"\0abstract"
    assert notify_address("vsock:2:1234") is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 15.0
    assert watchdog_interval({}, 7) is None
    env = {"NOTIFY_SOCKET": "relative", "WATCHDOG_USEC": "1"}
    assert SystemdNotifier.from_environment(env, clock=None, ready_check=None, status=None) is None
    assert env == {}  # read once and removed: children do not inherit them


def test_ready_watchdog_status_stopping_with_a_clock(notify_socket: NotifySocket) -> None:
    clock = task.Clock()
    answers: list[str | None] = ["redis not connected (connecting)"]
    notifier = SystemdNotifier(
        str(notify_socket.path),
        clock=clock,
        ready_check=lambda: defer.succeed(answers[-1]),
        status=lambda elapsed: f"status after {elapsed:g} s",
        watchdog=1.0,
        poll_interval=0.25,  # binary fractions: the clock's sums stay exact
        status_interval=5.0,
    )
    notifier.startService()
    for _ in range(8):
        clock.advance(0.25)  # 2 s: two pings beside the first; not ready
    # (read as we go: a unix datagram socket queues only ~10 unread messages)
    got = notify_socket.until(lambda r: count(r, "WATCHDOG=1") == 3, timeout=5)
    assert got[0] == "STATUS=starting: redis not connected (connecting)"  # once, not per poll
    assert count(got, "STATUS=starting: redis not connected (connecting)") == 1
    assert count(got, "READY=1") == 0
    answers.append(None)
    clock.advance(0.25)
    got = notify_socket.until(lambda r: count(r, "READY=1") == 1, timeout=5)
    assert got[-1] == "READY=1\nSTATUS=status after 0 s"
    for _ in range(20):
        clock.advance(0.25)  # 5 s more: five pings, one STATUS line
    got = notify_socket.until(lambda r: count(r, "STATUS=status after 5 s") == 1, timeout=5)
    assert count(got, "WATCHDOG=1") == 3 + 5
    notifier.stopping()
    notifier.stopService()
    got = notify_socket.until(lambda r: "STOPPING=1" in r[-1], timeout=5)
    assert got[-1] == "STOPPING=1\nSTATUS=shutting down"
    assert count(got, "READY=1") == 1


def test_no_reactor_no_watchdog(notify_socket: NotifySocket) -> None:
    """The pings come from the reactor's timers: time passing without the reactor turning
    (a wedged reactor) sends none, so systemd's watchdog fires."""
    clock = task.Clock()
    notifier = SystemdNotifier(
        str(notify_socket.path),
        clock=clock,
        ready_check=lambda: defer.succeed("not yet"),
        status=lambda elapsed: "",
        watchdog=0.05,
    )
    notifier.startService()
    first = notifier.sent  # the first ping and STATUS, at start
    assert notifier.sent == first  # the reactor (its clock) has not turned: nothing more
    clock.advance(0.05)
    assert notifier.sent == first + 1
    notifier.stopService()


# --------------------------------------------------------------------------- real twistd


def start_twistd(
    tmp_path: Path, notify: NotifySocket, redis_port: int, http: int
) -> subprocess.Popen[str]:
    env = clean_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="200000")
    return subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "teltonika-ingest", "--config", "",
         "--listen", "tcp:0:interface=127.0.0.1",
         "--metrics", f"tcp:{http}:interface=127.0.0.1",
         "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
         "--instance-id", "notify-test", "--log-format", "json"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def readyz(http: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out


@pytest.mark.integration
def test_twistd_ready_only_once_redis_answers(
    tmp_path: Path, notify_socket: NotifySocket, redis_proc: RedisProcess
) -> None:
    redis_proc.stop()  # Redis away at start: the port is known, nobody listens on it
    http = free_port()
    proc = start_twistd(tmp_path, notify_socket, redis_proc.port, http)
    try:
        # the reactor runs (pings arrive) but the service is not ready: no READY=1
        got = notify_socket.until(lambda r: count(r, "WATCHDOG=1") >= 5)
        assert count(got, "READY=1") == 0
        assert [m for m in got if m.startswith("STATUS=starting: ")], got
        assert readyz(http) == 503
        redis_proc.start()
        got = notify_socket.until(lambda r: count(r, "READY=1") == 1)
        ready = next(m for m in got if "READY=1" in m.split("\n"))
        assert ready.startswith("READY=1\nSTATUS=0 device connections, 0 records/s, Redis ")
        assert readyz(http) == 200  # READY=1 means what /readyz means
        before = count(got, "WATCHDOG=1")
        notify_socket.until(lambda r: count(r, "WATCHDOG=1") >= before + 3)
    finally:
        code, out = stop(proc)
    got = notify_socket.until(lambda r: count(r, "STOPPING=1") == 1, timeout=5)
    assert got.index("STOPPING=1\nSTATUS=shutting down") > got.index(ready)
    assert code == -signal.SIGTERM, out
    events = [json.loads(line) for line in out.splitlines()]
    assert any(e["message"] == "told systemd: ready" for e in events)
    assert any(e["message"].startswith("systemd watchdog: pinging every 0.1 s") for e in events)


@pytest.mark.integration
def test_workers_supervisor_notifies_once_every_worker_is_ready(
    tmp_path: Path, notify_socket: NotifySocket, redis_session: RedisProcess
) -> None:
    """--workers 2: the supervisor (the unit's main process) sends READY=1 once both workers
    are ready, and pings the watchdog; the workers never talk to systemd themselves."""
    http = free_port()
    env = clean_env(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="400000")
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "teltonika-ingest", "--config", "", "--workers", "2",
         "--listen", "tcp:0:interface=127.0.0.1",
         "--metrics", f"tcp:{http}:interface=127.0.0.1",
         "--redis-url", f"redis://127.0.0.1:{redis_session.port}/0",
         "--instance-id", "notify-workers"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        got = notify_socket.until(lambda r: count(r, "READY=1") == 1, timeout=60)
        ready = next(m for m in got if "READY=1" in m.split("\n"))
        assert ready == "READY=1\nSTATUS=2 of 2 workers running"
        assert readyz(http) == 200
        notify_socket.until(lambda r: count(r, "WATCHDOG=1") >= 3)
    finally:
        code, out = stop(proc)
    got = notify_socket.until(lambda r: count(r, "STOPPING=1") == 1, timeout=5)
    assert count(got, "READY=1") == 1  # not one per worker
    assert "supervisor shutdown complete" in out, out
    assert code == -signal.SIGTERM, out
