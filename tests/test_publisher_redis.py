"""The publisher's "a batch lands wholly or not at all", against a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from teltonika_ingest.codec import AvlPacket
from teltonika_ingest.config import RedisTarget
from teltonika_ingest.redis.client import RedisClient, RedisReplyError
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.publisher import PUBLISH_SCRIPT, Publisher

from device import wait_for
from redisproc import RedisProcess
from support import make_record

pytestmark = pytest.mark.integration

STREAM = "telemetry:teltonika"
PACKETS_PER_BATCH = 8
RECORDS_PER_PACKET = 10


@pytest_twisted.async_yield_fixture
async def client(redis_proc: RedisProcess) -> AsyncIterator[RedisClient]:
    target = RedisTarget.parse(f"redis://127.0.0.1:{redis_proc.port}/0")
    redis = RedisClient(target, reactor=reactor, command_timeout=5)
    redis.startService()
    try:
        await wait_for(lambda: redis.connected)
        yield redis
    finally:
        await redis.stopService()


def publisher(client: RedisClient) -> Publisher:
    return Publisher(
        client,
        stream=STREAM,
        maxlen=0,
        max_inflight=64,
        metrics=Metrics(),
        clock=reactor,
        instance_id="t",
    )


async def publish_batch(pub: Publisher, n: int) -> list[tuple[bool, Any]]:
    """``PACKETS_PER_BATCH`` packets handed over in one pass of the loop: one script call."""
    packets = [
        AvlPacket(
            "8E",
            tuple(
                make_record(n * 1000 + p * RECORDS_PER_PACKET + r)
                for r in range(RECORDS_PER_PACKET)
            ),
        )
        for p in range(PACKETS_PER_BATCH)
    ]
    ds = [pub.publish(f"3563070424{p:05d}", packet, 0) for p, packet in enumerate(packets)]
    results = await defer.DeferredList(ds, consumeErrors=True)
    return [(ok, value) for ok, value in results]


@pytest_twisted.ensureDeferred
async def test_batches_land_wholly_or_not_at_all_under_maxmemory_noeviction(
    client: RedisClient, redis_proc: RedisProcess
) -> None:
    pub = publisher(client)
    used = _used_memory(redis_proc)
    redis_proc.cmd("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis_proc.cmd("CONFIG", "SET", "maxmemory", str(used + 400_000))
    landed = 0
    crossed = False  # a batch that started under maxmemory and ended over it
    refused: list[Any] = []
    for n in range(200):
        before = _used_memory(redis_proc)
        outcome = await publish_batch(pub, n)
        oks = [ok for ok, _ in outcome]
        assert len(set(oks)) == 1, f"batch {n} was split: {oks}"  # every packet alike
        if oks[0]:
            landed += 1
            limit = int(redis_proc.cmd("CONFIG", "GET", "maxmemory")[1])
            crossed = crossed or (before <= limit < _used_memory(redis_proc))
        else:
            refused = [value for _, value in outcome]
        assert redis_proc.cmd("XLEN", STREAM) == landed * PACKETS_PER_BATCH * RECORDS_PER_PACKET
        if refused:
            break
    assert refused, "memory never ran out: the test did not reach maxmemory"
    assert crossed, "no batch crossed the limit: the partial case was not provoked"
    failure = refused[0]
    assert failure.check(RedisReplyError) and "OOM" in failure.getErrorMessage()
    assert pub.inflight == 0
    # memory back: the next batch lands whole
    redis_proc.cmd("CONFIG", "SET", "maxmemory", "0")
    assert all(ok for ok, _ in await publish_batch(pub, 999))
    assert redis_proc.cmd("XLEN", STREAM) == (landed + 1) * PACKETS_PER_BATCH * RECORDS_PER_PACKET


def _used_memory(redis_proc: RedisProcess) -> int:
    info = redis_proc.cmd("INFO", "memory")
    for line in info.splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":", 1)[1])
    raise AssertionError("no used_memory in INFO")


@pytest_twisted.ensureDeferred
async def test_a_batch_that_cannot_be_written_whole_writes_nothing(
    client: RedisClient, redis_proc: RedisProcess
) -> None:
    """The script checks the whole batch before its first write: a second packet whose
    arguments do not match its record count must not leave the first packet written."""
    good = ["356307042441013", "8E", 1, "2024-01-01T00:00:00.000Z", b"{}"]
    short = ["356307042441014", "8E", 2, "2024-01-01T00:00:01.000Z", b"{}"]  # one pair of two
    with pytest.raises(RedisReplyError) as refused:
        await client.run_script(PUBLISH_SCRIPT, [STREAM], ["0", *good, *short])
    assert redis_proc.cmd("XLEN", STREAM) == 0, "half the batch was written"
    assert "nothing written" in str(refused.value)
    redis_proc.cmd("SET", "not-a-stream", "x")
    with pytest.raises(RedisReplyError, match="WRONGTYPE"):
        await client.run_script(PUBLISH_SCRIPT, ["not-a-stream"], ["0", *good])
    assert await client.run_script(PUBLISH_SCRIPT, [STREAM], ["0", *good, *good]) == 2
