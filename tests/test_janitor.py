"""The registry janitor (``Registry.sweep``) against a real redis-server.

A ``connections:registry`` field whose instance has no heartbeat key is removed; fields of live
instances stay; each removal is a compare-and-delete, so sweeping on every instance at once is
safe and a field re-registered in the meantime is left alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from teltonika_ingest.config import RedisTarget
from teltonika_ingest.redis.client import RedisClient
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.registry import COMPARE_AND_DELETE, REGISTRY_KEY, Registry

from device import wait_for
from redisproc import RedisProcess

pytestmark = pytest.mark.integration

LIVE, DEAD, SELF = "inst-live", "inst-dead", "inst-self"


@pytest_twisted.async_yield_fixture
async def client(redis_session: RedisProcess) -> AsyncIterator[RedisClient]:
    redis = RedisClient(RedisTarget(host="127.0.0.1", port=redis_session.port), reactor=reactor)
    redis.startService()
    await wait_for(lambda: redis.connected)
    yield redis
    await redis.stopService()


def registry(redis: RedisClient, instance_id: str = SELF, **kwargs: float) -> Registry:
    return Registry(redis, instance_id=instance_id, metrics=Metrics(), clock=reactor, **kwargs)


def fields(redis: RedisProcess) -> dict[str, str]:
    flat = redis.cmd("HGETALL", REGISTRY_KEY)
    return dict(zip(flat[0::2], flat[1::2], strict=True))


@pytest_twisted.ensureDeferred
async def test_field_of_instance_without_heartbeat_disappears_live_one_stays(
    client: RedisClient, redis_session: RedisProcess
) -> None:
    redis_session.cmd("SET", f"instance:heartbeat:{LIVE}", "1", "EX", 90)
    redis_session.cmd(
        "HSET", REGISTRY_KEY,
        "356307042441013", DEAD,
        "356307042441014", LIVE,
        "356307042441015", SELF,  # the sweeping instance itself (alive by definition)
    )  # fmt: skip
    reg = registry(client)
    removed = await reg.sweep()
    assert removed == 1
    assert fields(redis_session) == {"356307042441014": LIVE, "356307042441015": SELF}
    assert reg.metrics.registry.get_sample_value("teltonika_janitor_removed_total") == 1
    assert await reg.sweep() == 0  # nothing left to remove


@pytest_twisted.ensureDeferred
async def test_sweep_covers_more_fields_than_one_scan_page(
    client: RedisClient, redis_session: RedisProcess
) -> None:
    redis_session.cmd("SET", f"instance:heartbeat:{LIVE}", "1", "EX", 90)
    args: list[str] = []
    for i in range(2500):
        args += [f"35630704{i:07d}", DEAD if i % 2 else LIVE]
    redis_session.cmd("HSET", REGISTRY_KEY, *args)
    assert await registry(client).sweep() == 1250
    left = fields(redis_session)
    assert len(left) == 1250 and set(left.values()) == {LIVE}


@pytest_twisted.ensureDeferred
async def test_every_instance_sweeping_at_once_is_safe(
    client: RedisClient, redis_session: RedisProcess
) -> None:
    redis_session.cmd("SET", f"instance:heartbeat:{LIVE}", "1", "EX", 90)
    for i in range(300):
        redis_session.cmd("HSET", REGISTRY_KEY, f"35630704{i:07d}", DEAD if i < 200 else LIVE)
    sweepers = [registry(client, f"inst-{n}") for n in range(4)]
    removed = await defer.gatherResults([s.sweep() for s in sweepers])
    assert sum(removed) == 200  # each field removed exactly once
    assert set(fields(redis_session).values()) == {LIVE}


@pytest_twisted.ensureDeferred
async def test_field_reregistered_by_a_live_instance_is_kept(
    client: RedisClient, redis_session: RedisProcess
) -> None:
    # What the janitor does per dead field, after the device moved to a live instance
    # between the janitor's scan and its delete: the compare-and-delete leaves it alone.
    redis_session.cmd("HSET", REGISTRY_KEY, "356307042441013", LIVE)
    n = await client.run_script(COMPARE_AND_DELETE, [REGISTRY_KEY], [DEAD, "356307042441013"])
    assert n == 0
    assert fields(redis_session) == {"356307042441013": LIVE}


@pytest_twisted.ensureDeferred
async def test_janitor_runs_on_its_cadence(
    client: RedisClient, redis_session: RedisProcess
) -> None:
    redis_session.cmd("HSET", REGISTRY_KEY, "356307042441013", DEAD, "356307042441014", SELF)
    reg = registry(client, janitor_interval=0.1)
    reg.startService()  # also starts this instance's heartbeat
    try:
        await wait_for(lambda: redis_session.cmd("HEXISTS", REGISTRY_KEY, "356307042441013") == 0)
        assert fields(redis_session) == {"356307042441014": SELF}
        # a dead instance's field added later goes on the next pass
        redis_session.cmd("HSET", REGISTRY_KEY, "356307042441015", DEAD)
        await wait_for(lambda: redis_session.cmd("HEXISTS", REGISTRY_KEY, "356307042441015") == 0)
    finally:
        await reg.stopService()
    assert redis_session.cmd("EXISTS", f"instance:heartbeat:{SELF}") == 1
