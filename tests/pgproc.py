"""A real PostgreSQL server for tests, started and owned by the test process.

``PgProcess`` runs ``initdb`` + ``postgres`` (as the ``postgres`` user when the suite runs
as root, like the embedded default) on a free TCP port of 127.0.0.1 and a unix socket in a
temp dir. It never touches the machine's shared PostgreSQL on 5432. ``fsync`` is off: the
data is disposable, and a stop is always a clean (fast) shutdown that writes everything.
``stop()`` / ``start()`` keep the data directory (the "PostgreSQL restarted" tests).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from typing import Any

import psycopg

from teltonika_ingest.processor.embedded import (
    find_postgres_bindir,
    give_to_service_user,
    initdb,
    postmaster_pid,
    run_as_prefix,
)

from redisproc import free_port

_POLL_S = 0.05


def _kill(proc: subprocess.Popen[bytes], pgdata: str) -> None:
    pid = postmaster_pid(pgdata)
    if pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown
    if proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


class PgProcess:
    def __init__(self) -> None:
        self.bindir = find_postgres_bindir()
        self.prefix, self.user = run_as_prefix()
        self.dir = tempfile.mkdtemp(prefix="pgproc-")
        os.chmod(self.dir, 0o755)  # the postgres user must reach the data dir below
        self.pgdata = os.path.join(self.dir, "data")
        self.socket_dir = os.path.join(self.dir, "sock")
        self.logfile = os.path.join(self.dir, "postgres.log")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._finalizer: Any = None
        weakref.finalize(self, shutil.rmtree, self.dir, True)

    def start(self, timeout: float = 60.0) -> PgProcess:
        if not os.path.exists(os.path.join(self.pgdata, "PG_VERSION")):
            initdb(self.bindir, self.pgdata)
            os.makedirs(self.socket_dir, exist_ok=True)
            give_to_service_user(self.socket_dir)
        first = self.port == 0
        for _attempt in range(3 if first else 1):
            if first:
                self.port = free_port()
            log = open(self.logfile, "ab")  # noqa: SIM115 - handed to the child
            try:
                self.proc = subprocess.Popen(
                    [*self.prefix, os.path.join(self.bindir, "postgres"), "-D", self.pgdata,
                     "-k", self.socket_dir, "-c", "listen_addresses=127.0.0.1",
                     "-p", str(self.port), "-c", "fsync=off", "-c", "full_page_writes=off",
                     "-c", "synchronous_commit=off", "-c", "max_connections=50"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                )  # fmt: skip
            finally:
                log.close()
            if self._finalizer is not None:
                self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _kill, self.proc, self.pgdata)
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError:
                if first and "already in use" in self.log_tail():
                    continue
                raise
        raise RuntimeError("could not find a free port for postgres")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited during start-up:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(_POLL_S)

    @property
    def admin_url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def url(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, dbname: str) -> str:
        """A fresh empty database; returns its URL."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT to the postmaster) and wait."""
        if not self.running:
            return
        assert self.proc is not None
        pid = postmaster_pid(self.pgdata) or self.proc.pid
        os.kill(pid, signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(self.proc, self.pgdata)

    def close(self) -> None:
        if self.proc is not None:
            _kill(self.proc, self.pgdata)
        if self._finalizer is not None:
            self._finalizer.detach()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.logfile, "rb") as f:
                data = f.read()[-8192:]
        except OSError:
            return "(no log file)"
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
