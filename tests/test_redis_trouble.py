"""Redis unreachable or refusing is reported, not hidden and not flooded: one WARNING with
the reason at the first failure, then at most one per ``trouble_log_interval`` (with the
count in between); the reasons for refused, DNS, AUTH and READONLY are words, not reprs."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import pytest_twisted
from test_redisclient import connected_client, failure_of, wait_until
from twisted.internet import reactor, task
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from teltonika_ingest.config import RedisTarget
from teltonika_ingest.redis.client import (
    RedisClient,
    RedisReplyError,
    connect_failure_reason,
    refusal,
)
from teltonika_ingest.redis.embedded import EmbeddedRedisTarget

from redisproc import RedisProcess


@pytest.fixture
def warnings() -> Iterator[Callable[[], list[str]]]:
    """The WARNINGs of the Redis client logged so far (a function: call it to look)."""
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)

    def current() -> list[str]:
        return [
            formatEvent(e)
            for e in seen
            if e.get("log_level") is LogLevel.warn
            and e.get("log_namespace") == "teltonika_ingest.redis.client"
        ]

    try:
        yield current
    finally:
        globalLogPublisher.removeObserver(seen.append)


def test_rate_limited_with_the_count_in_between(warnings: Callable[[], list[str]]) -> None:
    clock = task.Clock()
    client = RedisClient(RedisTarget(host="127.0.0.1", port=1), reactor=clock)
    client.trouble_log_interval = 30.0
    client.trouble("connection refused")
    for _ in range(5):
        clock.advance(5)  # 25 s: all within the interval
        client.trouble("connection refused")
    assert warnings() == ["Redis 127.0.0.1:1 (redis) unreachable or refusing: connection refused"]
    clock.advance(5)
    client.trouble("connection refused")
    assert warnings()[1:] == [
        "Redis 127.0.0.1:1 (redis) unreachable or refusing: connection refused "
        "(5 more failures since the last report)"
    ]


def test_reasons_in_words() -> None:
    assert connect_failure_reason(Failure(ConnectionRefusedError())) == "connection refused"
    missing = ConnectError(osError=2, string="No such file or directory")
    assert connect_failure_reason(Failure(missing)) == "No such file or directory"
    dns = connect_failure_reason(Failure(DNSLookupError("no results for hostname lookup: x.")))
    assert "x." in dns and "<" not in dns
    assert refusal(RedisReplyError("READONLY You can't write against a read only replica."))
    script = "ERR Error running script: @user_script:1: -READONLY You can't write against"
    assert refusal(RedisReplyError(script))
    assert refusal(RedisReplyError("NOAUTH Authentication required."))
    assert refusal(RedisReplyError("WRONGTYPE Operation against a key")) is None
    assert refusal(ValueError("READONLY")) is None


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_readonly_replica_warns_once(
    redis_proc: RedisProcess, warnings: Callable[[], list[str]]
) -> None:
    redis_proc.cmd("REPLICAOF", "127.0.0.1", "1")  # a replica (of nothing): read-only
    client = await connected_client(redis_proc)
    try:
        for _ in range(3):
            exc = await failure_of(client.execute("SET", "k", "v"))
            assert isinstance(exc, RedisReplyError) and exc.code == "READONLY"
        assert len(warnings()) == 1
        assert "unreachable or refusing: READONLY" in warnings()[0]
    finally:
        await client.stopService()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_wrong_password_warns_with_the_reason(
    redis_proc: RedisProcess, warnings: Callable[[], list[str]]
) -> None:
    redis_proc.cmd("CONFIG", "SET", "requirepass", "right")
    client = RedisClient(
        RedisTarget(host="127.0.0.1", port=redis_proc.port, password="wrong"), reactor=reactor
    )
    client.startService()
    try:
        await wait_until(warnings, what="a warning")
        [line] = warnings()
        assert "unreachable or refusing" in line and "WRONGPASS" in line
    finally:
        await client.stopService()


def test_no_trouble_while_the_embedded_redis_is_starting(
    warnings: Callable[[], list[str]],
) -> None:
    """Clients start with the embedded Redis, before its socket exists: failing to reach it
    then is expected; once it has answered (or given up), failures are trouble again."""
    starting = [True]
    target = EmbeddedRedisTarget(unix_path="/nonexistent/redis.sock", starting=lambda: starting[0])
    client = RedisClient(target, reactor=task.Clock())
    client.trouble("No such file or directory")
    assert warnings() == []
    starting[0] = False
    client.trouble("No such file or directory")
    assert len(warnings()) == 1
