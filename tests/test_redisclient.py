"""RedisClient: deadlines, fail-fast, NOSCRIPT, and recovery, against real redis-server
processes (plus a few pure tests with a fake connection and task.Clock)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport

from teltonika_ingest.config import RedisTarget
from teltonika_ingest.redis.client import (
    RedisClient,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
    Script,
)
from teltonika_ingest.redis.resp import encode_command

from redisproc import RedisProcess

GET_SCRIPT = Script("return redis.call('GET', KEYS[1])")


async def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> None:
    """Poll a predicate (its value may be a Deferred) every 20 ms until truthy; fail
    after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, defer.Deferred):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or predicate}")
        await task.deferLater(reactor, 0.02, lambda: None)


async def connected_client(proc: RedisProcess, **kw: Any) -> RedisClient:
    db = kw.pop("db", 0)
    client = RedisClient(RedisTarget(host="127.0.0.1", port=proc.port, db=db), **kw)
    client.startService()
    await wait_until(lambda: client.connected, what="client connected")
    return client


async def failure_of(d: defer.Deferred[Any]) -> BaseException:
    try:
        result = await d
    except Exception as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


@pytest_twisted.async_yield_fixture
async def client(redis_session: RedisProcess) -> AsyncIterator[RedisClient]:
    c = await connected_client(redis_session)
    try:
        yield c
    finally:
        await c.stopService()


# -- pure ---------------------------------------------------------------------


def test_script_sha1() -> None:
    assert GET_SCRIPT.sha1 == hashlib.sha1(GET_SCRIPT.source.encode()).hexdigest()


def testencode_command() -> None:
    assert encode_command(("SET", b"k\x00", 7, 0.1, "é")) == (
        b"*5\r\n$3\r\nSET\r\n$2\r\nk\x00\r\n$1\r\n7\r\n$3\r\n0.1\r\n$2\r\n\xc3\xa9\r\n"
    )
    assert encode_command((25.2793217,)).endswith(b"25.2793217\r\n")  # not rounded to 6 places


def test_target_required() -> None:
    with pytest.raises(ValueError):
        RedisClient(RedisTarget())


@pytest_twisted.ensureDeferred
async def test_not_started_fails_fast() -> None:
    c = RedisClient(RedisTarget(host="127.0.0.1", port=1))
    assert c.redis_state() == "not started"
    assert isinstance(await failure_of(c.execute("PING")), RedisUnavailable)
    assert await c.ping() is False


class _FakeConnection:
    """What RedisClient uses of a txredisapi protocol, without a socket."""

    def __init__(self) -> None:
        self.connected = 1
        self.transport = StringTransport()
        self.replyQueue = txredisapi.ReplyQueue()


def _fake_client(clock: task.Clock) -> tuple[RedisClient, _FakeConnection]:
    c = RedisClient(RedisTarget(host="127.0.0.1", port=1), reactor=clock, command_timeout=1.0)
    conn = _FakeConnection()
    c._pool = [conn]
    return c, conn


def test_timeout_and_late_reply_is_harmless() -> None:
    clock = task.Clock()
    c, conn = _fake_client(clock)
    first = c.execute("GET", "a")
    clock.advance(0.5)
    second = c.execute("GET", "b")
    results: list[Any] = []
    first.addBoth(results.append)
    second.addBoth(results.append)
    clock.advance(0.6)
    c._sweep()  # the LoopingCall's job
    assert len(results) == 1 and results[0].check(RedisTimeout)  # only the expired one
    # the late reply to the first command must not be taken for the second's
    conn.replyQueue.put("late-a")
    conn.replyQueue.put("b")
    assert results[1] == "b"
    assert conn.transport.value().count(b"GET") == 2


def test_per_call_timeout_uses_the_reactor() -> None:
    clock = task.Clock()
    c, conn = _fake_client(clock)
    d = c.execute("XREADGROUP", "BLOCK", 5000, timeout=6.0)
    results: list[Any] = []
    d.addBoth(results.append)
    clock.advance(5.9)
    c._sweep()
    assert results == []
    clock.advance(0.2)
    assert results[0].check(RedisTimeout)
    conn.replyQueue.put(None)  # late: swallowed


def test_caller_cancel_is_not_a_timeout() -> None:
    clock = task.Clock()
    c, _conn = _fake_client(clock)
    d = c.execute("GET", "a")
    d.cancel()
    f = []
    d.addErrback(f.append)
    assert f[0].check(defer.CancelledError)


def test_error_values_become_redis_errors() -> None:
    clock = task.Clock()
    c, conn = _fake_client(clock)
    d1, d2 = c.execute("X"), c.execute("Y")
    conn.replyQueue.put(txredisapi.ResponseError("WRONGTYPE Operation against a key"))
    conn.replyQueue.put(txredisapi.ConnectionError("Lost connection"))
    e1, e2 = [], []
    d1.addErrback(lambda f: e1.append(f.value))
    d2.addErrback(lambda f: e2.append(f.value))
    assert isinstance(e1[0], RedisReplyError) and e1[0].code == "WRONGTYPE"
    assert isinstance(e2[0], RedisUnavailable)


class _FakeFactory:
    def __init__(self, *conns: _FakeConnection) -> None:
        self.pool = list(conns)
        self.disconnected = False

    def disconnect(self) -> defer.Deferred[None]:
        self.disconnected = True
        return defer.succeed(None)


def test_rebuild_keeps_serving_until_the_new_pool_connects() -> None:
    """A pool txredisapi gave up on keeps serving its live connections until the
    rebuilt one has a connection; the rebuild waits a bounded, growing backoff."""
    clock = task.Clock()
    c = RedisClient(RedisTarget(host="127.0.0.1", port=1), reactor=clock, command_timeout=1.0)
    old_conn, new_conn = _FakeConnection(), _FakeConnection()
    old, new = _FakeFactory(old_conn), _FakeFactory()
    built = [new]
    c._start_factory = lambda: built.pop()  # type: ignore[method-assign]
    c.running = 1
    c._factory = c._serving = old  # type: ignore[assignment]
    c._pool = old.pool
    c._gave_up(old, "Redis error: could not set dbid=3: Lost connection")  # type: ignore[arg-type]
    assert c.redis_state() == "gave up (could not set dbid=3: Lost connection), rebuilding in 0.5s"
    c._gave_up(old, "again")  # type: ignore[arg-type]  # one rebuild per give-up
    clock.advance(0.5)
    assert c._factory is new and c.rebuilds == 1
    c.execute("PING")
    assert old_conn.transport.value() and not old.disconnected  # still serving
    new.pool.append(new_conn)
    c._connection_added(new)  # type: ignore[arg-type]
    assert old.disconnected and c._pool is new.pool
    c.execute("PING")
    assert new_conn.transport.value()
    assert c._rebuild_delay == c.rebuild_delay_min  # reset once connected


# -- against a real redis-server ----------------------------------------------


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_commands_and_reply_types(client: RedisClient) -> None:
    assert client.redis_state() == "connected"
    assert await client.execute("SET", "imei", "356307042441013") == "OK"
    assert await client.execute("GET", "imei") == "356307042441013"  # stays a string
    assert await client.execute("INCR", "n") == 1
    assert await client.execute("GET", "missing") is None
    assert await client.execute("SET", "bin", b"\xff\x00") == "OK"
    assert await client.execute("GET", "bin") == b"\xff\x00"
    entry_id = await client.execute("XADD", "s", "*", "imei", "1", "payload", "{}")
    assert isinstance(entry_id, str) and "-" in entry_id
    assert await client.execute("XRANGE", "s", "-", "+") == [
        [entry_id, ["imei", "1", "payload", "{}"]]
    ]
    err = await failure_of(client.execute("LPUSH", "s", "x"))
    assert isinstance(err, RedisReplyError) and err.code == "WRONGTYPE"
    assert await client.ping() is True


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_transaction(client: RedisClient) -> None:
    replies = await client.transaction([("INCR", "t"), ("XADD", "s", "*", "a", "1"), ("GET", "t")])
    assert replies[0] == 1 and replies[2] == "1"
    # refused at queue time (wrong arity): nothing applied
    err = await failure_of(client.transaction([("INCR", "t"), ("GET",)]))
    assert isinstance(err, RedisReplyError) and err.code == "EXECABORT"
    assert await client.execute("GET", "t") == "1"
    # a command failing inside EXEC: reported, the others applied
    await client.execute("SET", "str", "x")
    err = await failure_of(client.transaction([("INCR", "t"), ("LPUSH", "str", "y")]))
    assert isinstance(err, RedisReplyError) and "command 1" in str(err)
    assert await client.execute("GET", "t") == "2"
    # the pool still answers in order afterwards
    assert [await client.execute("ECHO", str(i)) for i in range(4)] == ["0", "1", "2", "3"]


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_run_script_survives_script_flush(
    client: RedisClient, redis_session: RedisProcess
) -> None:
    await client.execute("SET", "k", "v")
    assert await client.run_script(GET_SCRIPT, ["k"], []) == "v"
    redis_session.cmd("SCRIPT", "FLUSH")
    assert redis_session.cmd("SCRIPT", "EXISTS", GET_SCRIPT.sha1) == [0]
    assert await client.run_script(GET_SCRIPT, ["k"], []) == "v"  # NOSCRIPT -> EVAL
    assert redis_session.cmd("SCRIPT", "EXISTS", GET_SCRIPT.sha1) == [1]  # cached again
    err = await failure_of(client.run_script(Script("return redis.call('NOPE')"), [], []))
    assert isinstance(err, RedisReplyError)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_stop_closes_connections(redis_session: RedisProcess) -> None:
    c = await connected_client(redis_session, poolsize=2)
    await wait_until(lambda: len(c._pool) == 2)
    assert str(redis_session.cmd("CLIENT", "LIST")).count("\n") >= 2
    await c.stopService()
    assert c.redis_state() == "stopped"
    assert isinstance(await failure_of(c.execute("PING")), RedisUnavailable)
    # only the CLIENT LIST connection itself is left
    await wait_until(lambda: str(redis_session.cmd("CLIENT", "LIST")).strip().count("\n") == 0)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_paused_redis_times_out_then_recovers(redis_proc: RedisProcess) -> None:
    c = await connected_client(redis_proc, command_timeout=0.5)
    try:
        redis_proc.pause()
        pending = [c.execute("SET", "late", "applied"), c.execute("GET", "late")]
        ping = c.execute("PING")
        assert not ping.called  # waits for Redis (for its timeout), does not fail at once
        err = await failure_of(ping)
        assert isinstance(err, RedisTimeout)
        assert "0.5" in str(err), err  # the configured timeout ran out, not another one
        for d in pending:
            assert isinstance(await failure_of(d), RedisTimeout)
        assert await c.ping() is False
        assert c.connected  # stalled, not disconnected
        assert c.redis_state() == "connected, not answering (no reply from Redis within 0.5s)"
        redis_proc.resume()
        await wait_until(c.ping, timeout=5)  # ping() never fails
        # the late replies were swallowed; every reply goes to its own command
        echoes = await defer.gatherResults([c.execute("ECHO", str(i)) for i in range(50)])
        assert echoes == [str(i) for i in range(50)]
        assert await c.execute("GET", "late") == "applied"  # (applied late, as documented)
    finally:
        if redis_proc.running:
            redis_proc.resume()
        await c.stopService()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_killed_redis_fails_fast_then_recovers(redis_proc: RedisProcess) -> None:
    events: list[str] = []
    c = RedisClient(RedisTarget(host="127.0.0.1", port=redis_proc.port), command_timeout=5.0)
    c.connection_made_hooks.append(lambda: events.append("made"))
    c.connection_lost_hooks.append(lambda reason: events.append(f"lost: {reason}"))
    c.startService()
    try:
        await wait_until(lambda: c.connected)
        assert c.redis_state() == "connected"
        await c.execute("SET", "k", "kept")  # appendfsync always: survives SIGKILL
        redis_proc.kill()
        await wait_until(lambda: not c.connected, timeout=2, what="loss noticed")
        assert c.redis_state() == "reconnecting"
        get = c.execute("GET", "k")
        assert get.called  # failed at once: not queued until Redis comes back
        err = await failure_of(get)
        assert isinstance(err, RedisUnavailable)
        assert await c.ping() is False
        redis_proc.start()
        await wait_until(lambda: c.connected, timeout=10, what="reconnected")
        assert await c.execute("GET", "k") == "kept"
        assert events == ["made", "lost: connection lost", "made"]
    finally:
        await c.stopService()
    assert events[-1] == "lost: client stopped"


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_gave_up_during_handshake_is_rebuilt(redis_proc: RedisProcess) -> None:
    """txredisapi stops reconnecting for good when SELECT fails during a reconnect
    (upstream issues 126/146). Provoked deterministically: Redis is paused, the
    client's connections drop, it reconnects (the kernel accepts; SELECT gets no
    answer), then Redis dies -> SELECT fails with "Lost connection" -> txredisapi
    gives up. The client must rebuild its pool and recover once Redis is back."""
    c = await connected_client(redis_proc, db=3, command_timeout=1.0)
    try:
        await c.execute("SET", "in-db-3", "yes")
        redis_proc.pause()
        factory = c._factory
        for conn in list(c._pool):
            conn.transport.abortConnection()
        await wait_until(lambda: not c.connected, timeout=2)
        # a reconnect is in its handshake: TCP up (kernel backlog), SELECT unanswered
        await wait_until(
            lambda: any(s.protocol is not None for s in factory.slots), timeout=5, what="handshake"
        )
        redis_proc.kill()
        await wait_until(lambda: c.redis_state().startswith("gave up"), timeout=5)
        assert factory.stopped  # txredisapi really gave up on this pool
        assert "could not set dbid=3" in c.redis_state()
        assert isinstance(await failure_of(c.execute("PING")), RedisUnavailable)
        redis_proc.start()
        await wait_until(lambda: c.connected, timeout=10, what="recovered by rebuilding")
        assert c.rebuilds >= 1 and c._factory is not factory
        assert await c.execute("GET", "in-db-3") == "yes"  # SELECT 3 again
    finally:
        await c.stopService()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_restart_while_loading_with_db_number(redis_proc: RedisProcess) -> None:
    """Redis restarted with appendonly and a database number in the target, with a
    slow load (``key-load-delay``, deterministic): the client must see LOADING
    (not crash, not hang) and then work again by itself."""
    with redis_proc.client() as raw:
        raw.cmd("SELECT", 5)
        raw.pipeline([("SET", f"key:{i}", i) for i in range(20000)])
    c = await connected_client(redis_proc, db=5, command_timeout=1.0)
    try:
        assert await c.execute("GET", "key:19999") == "19999"
        # ~20k AOF entries x 100 us: about 2 s of LOADING
        redis_proc.restart(wait="accept", config={"key-load-delay": "100"})
        seen: set[str] = set()

        async def probe() -> bool:
            try:
                return await c.execute("GET", "key:19999") == "19999"
            except RedisReplyError as e:
                seen.add(e.code)
                if e.code == "LOADING" and not await c.ping():
                    assert c.redis_state().startswith("connected, not answering ("), c

            except (RedisUnavailable, RedisTimeout) as e:
                seen.add(type(e).__name__)
            return False

        deadline = time.monotonic() + 20
        while not await probe():
            assert time.monotonic() < deadline, f"no recovery; seen {seen}, {c.redis_state()}"
            await task.deferLater(reactor, 0.05, lambda: None)
        assert "LOADING" in seen, seen  # the window was really observed
        assert await c.ping() is True
        assert c.redis_state() == "connected"
    finally:
        await c.stopService()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_run_script_after_restart(redis_proc: RedisProcess) -> None:
    c = await connected_client(redis_proc)
    try:
        await c.execute("SET", "k", "v")
        assert await c.run_script(GET_SCRIPT, ["k"], []) == "v"
        redis_proc.restart()  # empty script cache, data kept (AOF)
        # (the reactor was blocked during restart(): the loss is noticed only now)
        await wait_until(c.ping, timeout=10)
        assert await c.run_script(GET_SCRIPT, ["k"], []) == "v"
    finally:
        await c.stopService()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_unix_socket_target(tmp_path: Any) -> None:
    with RedisProcess(unix_socket=True) as proc:
        proc.start()
        assert proc.unix_path is not None
        c = RedisClient(RedisTarget(unix_path=proc.unix_path, db=1))
        c.startService()
        try:
            await wait_until(lambda: c.connected)
            await c.execute("SET", "u", "1")
            with proc.client() as raw:
                raw.cmd("SELECT", 1)
                assert raw.cmd("GET", "u") == "1"
        finally:
            await c.stopService()
