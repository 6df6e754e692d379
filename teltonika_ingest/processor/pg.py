"""A psycopg 3 connection used from one dedicated thread, driven from the reactor.

psycopg's blocking API runs in a one-thread pool (``deferToThreadPool``), so calls on one
worker are serialised and each thread keeps its own connection (what
``twisted.enterprise.adbapi`` does, without its hidden reconnect policy). The asyncio-reactor
alternative was measured and is slower here (BENCHMARKS.md, "Processor").

A broken connection (server restarted, network gone) is closed and opened again on the
next call; the call itself fails with the psycopg error, and the caller decides whether to
retry (:func:`is_transient`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

__all__ = ["PgWorker", "is_transient"]

log = Logger()
T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    """Whether retrying the same statements later may succeed: the server or the link is
    down, restarting, or too slow (not: the data itself is refused)."""
    return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)


class PgWorker:
    """One connection to ``conninfo`` on one thread; :meth:`run` calls ``fn(conn, *args)``.

    ``fn`` runs inside a transaction (psycopg's default); it commits itself. If it raises,
    the transaction is rolled back (or the connection dropped if it is broken).
    """

    def __init__(
        self,
        conninfo: str,
        *,
        reactor: Any,
        name: str,
        connect_timeout: float = 5.0,
        statement_timeout: float = 30.0,
    ) -> None:
        self.conninfo = conninfo
        self.name = name
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._statement_timeout_ms = int(statement_timeout * 1000)
        self._pool = ThreadPool(1, 1, name=name)
        self._conn: psycopg.Connection[Any] | None = None
        self.connects = 0

    def start(self) -> None:
        self._pool.start()

    def run(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, self._call, fn, *args)

    def stop(self) -> defer.Deferred[None]:
        """Close the connection (on its thread), then stop the thread."""
        if not self._pool.started:
            return defer.succeed(None)
        d = deferToThreadPool(self._reactor, self._pool, self._close)
        d.addErrback(lambda _: None)

        def stop_pool(_: object) -> None:
            self._pool.stop()

        return d.addCallback(stop_pool)

    # -- on the worker thread ------------------------------------------------

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.conninfo,
                connect_timeout=max(1, round(self._connect_timeout)),
                options=f"-c statement_timeout={self._statement_timeout_ms}",
                application_name=f"teltonika-processor/{self.name}",
            )
            self.connects += 1
        return self._conn

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self.connection()
        try:
            return fn(conn, *args)
        except BaseException as e:
            if conn.broken or conn.closed or is_transient(e):
                self._close()
            else:
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()
            raise

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
