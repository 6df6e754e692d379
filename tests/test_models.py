"""Which model a device is (server/models.py) and the allow-list file's model column."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from teltonika_ingest.redis.client import RedisUnavailable
from teltonika_ingest.server.authority import parse_allow_list
from teltonika_ingest.server.models import CACHE_SECONDS, DeviceModels

IMEI = "356307042441013"
OTHER = "352093081452251"


class FakeRedis:
    def __init__(self, hash_: dict[str, str] | None = None) -> None:
        self.hash = dict(hash_ or {})
        self.calls: list[tuple[Any, ...]] = []
        self.fail = False

    def execute(self, *args: Any, timeout: float | None = None) -> defer.Deferred[Any]:
        self.calls.append(args)
        if self.fail:
            return defer.fail(RedisUnavailable("no connection"))
        assert args[0] == "HGET"
        value = self.hash.get(args[2])
        return defer.succeed(None if value is None else value.encode())


def resolved(result: Any) -> Any:
    if isinstance(result, defer.Deferred):
        out: list[Any] = []
        result.addCallback(out.append)
        assert out, "the lookup Deferred did not fire"
        return out[0]
    return result


class DeviceModelsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis({IMEI: "TAT100"})
        self.failures = 0
        self.file = {IMEI: "FMB640", OTHER: "FMB920"}

        def failed() -> None:
            self.failures += 1

        self.models = DeviceModels(
            redis=self.redis,  # type: ignore[arg-type]
            key="devices:model",
            file_models=lambda: self.file,
            default="FMC130",
            clock=self.clock,
            on_failure=failed,
        )

    def test_precedence_hash_then_file_then_default(self) -> None:
        self.assertEqual(resolved(self.models.view(IMEI)).model, "TAT100")
        self.assertEqual(resolved(self.models.view(OTHER)).model, "FMB920")
        self.assertEqual(resolved(self.models.view("354017118537444")).model, "FMC130")
        self.assertEqual(self.redis.calls[0], ("HGET", "devices:model", IMEI))

    def test_cached_for_a_while_then_asked_again(self) -> None:
        resolved(self.models.view(IMEI))
        self.redis.hash[IMEI] = "FMB920"
        self.clock.advance(CACHE_SECONDS - 1)
        view = self.models.view(IMEI)
        self.assertNotIsInstance(view, defer.Deferred)  # from the cache, at once
        self.assertEqual(view.model, "TAT100")  # type: ignore[union-attr]
        self.assertEqual(len(self.redis.calls), 1)
        self.clock.advance(2)
        self.assertEqual(resolved(self.models.view(IMEI)).model, "FMB920")
        self.assertEqual(len(self.redis.calls), 2)

    def test_lookup_failure_falls_back_and_counts(self) -> None:
        self.redis.fail = True
        self.assertEqual(resolved(self.models.view(IMEI)).model, "FMB640")  # the file's
        self.assertEqual(self.failures, 1)
        self.redis.fail = False
        # a failure is not cached: the next packet asks again
        self.assertEqual(resolved(self.models.view(IMEI)).model, "TAT100")
        self.assertEqual(self.failures, 1)
        self.flushLoggedErrors()

    def test_unknown_model_names_common_ids_only(self) -> None:
        self.redis.hash[IMEI] = "FMX999"
        view = resolved(self.models.view(IMEI))
        self.assertIsNone(view.model)
        self.assertIsNone(view.get(66))
        self.assertEqual(view.get(239).name, "Ignition")

    def test_without_a_hash_no_redis_at_all(self) -> None:
        models = DeviceModels(redis=None, key=None, clock=self.clock, default=None)
        view = models.view(IMEI)
        self.assertNotIsInstance(view, defer.Deferred)
        self.assertIsNone(view.model)  # type: ignore[union-attr]
        no_key = DeviceModels(redis=self.redis, key=None, clock=self.clock)  # type: ignore[arg-type]
        no_key.view(IMEI)
        self.assertEqual(self.redis.calls, [])


def test_allow_list_file_model_column() -> None:
    parsed = parse_allow_list(
        f"# fleet\n{IMEI} FMB920   # truck 12\n{OTHER}\n354017118537444\tTAT100\n"
        "352093086403655 FMB920 extra\n352093086403656 bad/model\n"
    )
    assert parsed.imeis == {IMEI, OTHER, "354017118537444"}
    assert parsed.models == {IMEI: "FMB920", "354017118537444": "TAT100"}
    assert [(n, why) for n, _, why in parsed.invalid] == [
        (5, "not an IMEI and an optional model"),
        (6, "not an IMEI and an optional model"),
    ]


def test_allow_list_file_without_models_is_unchanged() -> None:
    parsed = parse_allow_list(f"{IMEI}\n{OTHER}  # a comment\n\n")
    assert parsed.imeis == {IMEI, OTHER}
    assert parsed.models == {}
    assert parsed.invalid == ()
