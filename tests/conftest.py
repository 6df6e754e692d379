"""Shared fixtures and the suite's deadlines. Reactor tests use pytest-twisted (its default
reactor).

Deadlines: every test has pytest-timeout's 60 s (pyproject.toml). A reactor test (an
``async def`` under ``pytest_twisted.ensureDeferred``) also gets :data:`REACTOR_TEST_DEADLINE_S`:
past it the test is cancelled (its pending ``await`` raises ``CancelledError``, so its
``finally`` blocks stop what it started) and fails with a message naming the deadline, while
the reactor keeps running for the next tests. SIGALRM alone cannot do that: raised inside the
reactor's loop, Twisted logs it and carries on.

Clean reactor: after every test, delayed calls and sockets that the test left in the reactor
are cancelled and closed, so that a test that failed half-way (and so never reached its own
clean-up) cannot break the tests after it; a ``ReactorLeftDirty`` warning in the summary names
what was left.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from pytest_twisted.three import _async_pytest_pyfunc_call
from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure

from pgproc import PgProcess
from redisproc import RedisProcess

#: a reactor test is cancelled after this long (below pytest-timeout's 60 s, which also
#: counts the fixtures' set-up)
REACTOR_TEST_DEADLINE_S = 40.0
#: a cancelled test's finally blocks get this long to unwind before the test is abandoned
UNWIND_S = 10.0
#: how long the reactor may take, after a test, to finish closing what the test closed
SETTLE_S = 2.0


class ReactorTestTimeout(AssertionError):
    """A reactor test did not finish within its deadline."""


def _bounded(item: pytest.Function, deadline: float) -> defer.Deferred[Any]:
    test = _async_pytest_pyfunc_call(item, item.obj, {})
    result: defer.Deferred[Any] = defer.Deferred()
    expired: list[str] = []

    def finish(outcome: Any) -> None:
        if result.called:
            return
        if expired and isinstance(outcome, Failure) and outcome.check(defer.CancelledError):
            outcome = Failure(ReactorTestTimeout(expired[0]))
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    def abandon() -> None:
        finish(
            Failure(
                ReactorTestTimeout(expired[0] + f"; its clean-up did not end in {UNWIND_S:g} s")
            )
        )

    def timed_out() -> None:
        expired.append(
            f"{item.nodeid} did not finish within {deadline:g} s (a wait without a deadline, "
            "or a behaviour that never happened): cancelled, its clean-up ran"
        )
        unwind.append(reactor.callLater(UNWIND_S, abandon))
        test.cancel()

    unwind: list[Any] = []
    timer = reactor.callLater(deadline, timed_out)

    def settled(outcome: Any) -> None:
        for call in (timer, *unwind):
            if call.active():
                call.cancel()
        finish(outcome)

    test.addBoth(settled)
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Reactor tests run as pytest-twisted runs them, under a deadline."""
    if pytest_twisted._get_mark(pyfuncitem.obj) is None:
        return None  # a plain test (or a hypothesis one): pytest-twisted / pytest run it
    if getattr(pyfuncitem.obj, "hypothesis", None) is not None:
        return None
    marker = pyfuncitem.get_closest_marker("deadline")
    deadline = float(marker.args[0]) if marker else REACTOR_TEST_DEADLINE_S
    pytest_twisted._run_inline_callbacks(_bounded, pyfuncitem, deadline)
    return True


def _selectables() -> set[Any]:
    """The sockets in the reactor, less its own (wakers)."""
    internal = set(getattr(reactor, "_internalReaders", ()))
    return (set(reactor.getReaders()) | set(reactor.getWriters())) - internal  # type: ignore[attr-defined]


class ReactorLeftDirty(UserWarning):
    """A test left delayed calls or sockets in the reactor (they were removed)."""


def _shares_reactor_state(item: Any) -> bool:
    """Whether the test uses a reactor fixture wider than itself (module-scoped services):
    what is in the reactor after it then belongs to that fixture, not to the test."""
    for defs in item._fixtureinfo.name2fixturedefs.values():
        for fixturedef in defs:
            if fixturedef.scope != "function" and pytest_twisted._get_mark(fixturedef.func):
                return True
    return False


@pytest.fixture(autouse=True)
def _clean_reactor(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whatever a test (passed or failed) leaves in the reactor is removed after it, so that
    it cannot break the tests after it; a ``ReactorLeftDirty`` warning names it."""
    calls = set(reactor.getDelayedCalls())  # type: ignore[attr-defined]
    selectables = _selectables()
    yield
    if pytest_twisted._instances.gr_twisted is None or _shares_reactor_state(request.node):
        return

    def leftovers() -> tuple[list[Any], list[Any]]:
        delayed = reactor.getDelayedCalls()  # type: ignore[attr-defined]
        return [c for c in delayed if c not in calls and c.active()], list(
            _selectables() - selectables
        )

    # Connections closed at the end of the test go away over the next turns of the loop.
    settle_until = reactor.seconds() + SETTLE_S
    left_calls, left_sel = leftovers()
    while (left_calls or left_sel) and reactor.seconds() < settle_until:
        pytest_twisted.blockon(task.deferLater(reactor, 0.02, lambda: None))
        left_calls, left_sel = leftovers()
    if not left_calls and not left_sel:
        return
    described = (
        f"{request.node.nodeid} left the reactor dirty: {len(left_calls)} delayed calls "
        f"{[_describe_call(c) for c in left_calls[:5]]}, {len(left_sel)} sockets "
        f"{[type(s).__name__ for s in left_sel[:5]]} (removed)"
    )
    for call in left_calls:
        call.cancel()
    for s in left_sel:
        _close_selectable(s)
    warnings.warn(ReactorLeftDirty(described), stacklevel=1)


def _describe_call(call: Any) -> str:
    func = getattr(call, "func", None)
    name = getattr(func, "__qualname__", None) or repr(func)
    return f"{name} in {call.getTime() - reactor.seconds():.1f} s"


def _close_selectable(s: Any) -> None:
    for how in ("abortConnection", "loseConnection", "stopListening", "connectionLost"):
        fn = getattr(s, how, None)
        if fn is None:
            continue
        try:
            fn() if how != "connectionLost" else fn(Failure(RuntimeError("left by a test")))
        except Exception:
            continue
        break
    reactor.removeReader(s)  # type: ignore[attr-defined]
    reactor.removeWriter(s)  # type: ignore[attr-defined]


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
