"""Unregisters of one pass of the event loop go to Redis as one compare-and-delete.

When a cell outage drops a whole fleet, the reactor reads thousands of closed sockets in one
pass; one script call per device held its Deferreds (~2 KB) until the pass ended and Redis
was reached (+32 MiB at 15,000 devices, BENCHMARKS.md "Disconnect storm"). A fake Redis client
here records what is sent and answers when told; order against a later register of the same
IMEI is kept (a reconnect must not lose its field).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.python.failure import Failure

from teltonika_ingest.redis.client import RedisUnavailable
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.registry import (
    COMPARE_AND_DELETE,
    REGISTRY_KEY,
    UNREGISTER_BATCH,
    Registry,
)

INSTANCE = "inst-a"


class FakeRedis:
    """Records each call; ``answer(i)`` fires the i-th call's Deferred."""

    ever_connected = True
    connected = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], defer.Deferred[Any]]] = []

    def execute(self, *args: Any, **_kw: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append(("execute", args, d))
        return d

    def run_script(self, script: Any, keys: Any, args: Any, **_kw: Any) -> defer.Deferred[Any]:
        assert script is COMPARE_AND_DELETE and list(keys) == [REGISTRY_KEY]
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append(("script", tuple(args), d))
        return d

    def sent(self) -> list[tuple[str, tuple[Any, ...]]]:
        return [(kind, args) for kind, args, _d in self.calls]


def make() -> tuple[Registry, FakeRedis, task.Clock, Metrics]:
    redis, clock, metrics = FakeRedis(), task.Clock(), Metrics()
    return (
        Registry(redis, instance_id=INSTANCE, metrics=metrics, clock=clock),  # type: ignore[arg-type]
        redis,
        clock,
        metrics,
    )


def test_unregisters_of_one_pass_are_one_script_call() -> None:
    reg, redis, clock, _ = make()
    results = [reg.unregister(f"35200000000000{i}") for i in range(3)]
    assert redis.sent() == []  # nothing before the pass ends
    clock.advance(0)
    assert redis.sent() == [
        ("script", (INSTANCE, "352000000000000", "352000000000001", "352000000000002"))
    ]
    assert not any(d.called for d in results)
    redis.calls[0][2].callback(3)
    assert all(d.called for d in results)
    assert reg.settled().called
    clock.advance(0)
    assert len(redis.calls) == 1  # no empty batch afterwards


def test_a_full_batch_is_sent_at_once_and_the_rest_after_the_pass() -> None:
    reg, redis, clock, _ = make()
    for i in range(UNREGISTER_BATCH + 2):
        reg.unregister(f"{352000000000000 + i}")
    assert [len(args) - 1 for _kind, args in redis.sent()] == [UNREGISTER_BATCH]
    clock.advance(0)
    assert [len(args) - 1 for _kind, args in redis.sent()] == [UNREGISTER_BATCH, 2]


def test_register_of_an_unregistered_imei_waits_for_the_batch() -> None:
    """A device that closes and comes back in the same pass: its HSET is sent only once the
    compare-and-delete was answered (sent together, the pool could serve them reversed)."""
    reg, redis, clock, _ = make()
    reg.unregister("352000000000001")
    reg.unregister("352000000000002")
    reg.register("352000000000001")
    clock.advance(0)
    assert [kind for kind, _ in redis.sent()] == ["script"]
    redis.calls[0][2].callback(1)
    assert redis.sent()[1] == ("execute", ("HSET", REGISTRY_KEY, "352000000000001", INSTANCE))
    redis.calls[1][2].callback(1)
    assert reg.settled().called
    # the IMEI's order is forgotten once answered: a new unregister is batched again
    reg.unregister("352000000000001")
    clock.advance(0)
    assert redis.sent()[2] == ("script", (INSTANCE, "352000000000001"))


def test_unregister_while_its_register_is_unanswered_waits_for_it() -> None:
    reg, redis, clock, _ = make()
    reg.register("352000000000001")
    reg.unregister("352000000000001")
    clock.advance(0)
    assert [kind for kind, _ in redis.sent()] == ["execute"]
    redis.calls[0][2].callback(1)
    assert redis.sent()[1] == ("script", (INSTANCE, "352000000000001"))


def test_a_failed_batch_is_counted_once_and_settles() -> None:
    reg, redis, clock, metrics = make()
    results = [reg.unregister(f"{352000000000000 + i}") for i in range(4)]
    clock.advance(0)
    redis.calls[0][2].errback(Failure(RedisUnavailable("down")))
    assert all(d.called for d in results)
    assert reg.settled().called
    value = metrics.registry.get_sample_value("teltonika_registry_failures_total")
    assert value == 1.0
