"""Queued commands: entry checks (pure) and every Lua script against a real redis-server.

The scripts are run with EVAL exactly as the service runs them (same arguments), so each
state change and each outcome can be checked key by key. Deadlines are moved into the past
by editing the hash and the index ("the TTL passed"), not by waiting.
"""

from __future__ import annotations

from typing import Any

import pytest

from teltonika_ingest.redis.client import Script
from teltonika_ingest.server.commands.entries import GROUP, RESULTS_KEY, InvalidCommand
from teltonika_ingest.server.commands.queue import (
    ACCEPT,
    CANCEL,
    CLAIM,
    EXPIRY_KEY,
    MAX_ATTEMPTS,
    QUEUE_KEY,
    SETTLE,
    SWEEP,
    WRITTEN,
    CancelRequest,
    QueuedRequest,
    cancel_args,
    device_key,
    parse_duration,
    parse_queue_entry,
    queued_key,
    wake_stream,
)

from redisproc import RedisProcess

IMEI = "356307042441013"
OTHER = "352093081452251"
AT = "2026-12-01T16:00:00.000Z"


def parse(*fields: str, **defaults: Any) -> QueuedRequest | CancelRequest:
    options = dict(max_length=512, default_timeout=30.0, default_ttl=86400.0, default_attempts=3)
    options.update(defaults)
    return parse_queue_entry(list(fields), **options)


# --------------------------------------------------------------------------- entries


def test_parse_defaults_and_fields() -> None:
    plain = parse("id", "a", "imei", IMEI, "text", "getver")
    assert isinstance(plain, QueuedRequest)
    assert (plain.ttl, plain.max_attempts, plain.kind, plain.payload_text) == (
        86400.0,
        3,
        "text",
        "getver",
    )
    given = parse(
        "id", "b", "imei", IMEI, "hex", "01ff", "codec", "14", "timeout_s", "5",
        "ttl_s", "3600", "max_attempts", "7",
    )  # fmt: skip
    assert isinstance(given, QueuedRequest)
    assert (given.ttl, given.max_attempts, given.kind, given.payload_text) == (
        3600,
        7,
        "hex",
        "01ff",
    )
    assert (given.request.codec, given.request.timeout) == ("14", 5.0)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["ttl_s", "0"], "'ttl_s' must be > 0"),
        (["ttl_s", "2592001"], "30 days"),
        (["ttl_s", "soon"], "'ttl_s' must be a number"),
        (["max_attempts", "0"], "'max_attempts' must be a whole number 1..100"),
        (["max_attempts", str(MAX_ATTEMPTS + 1)], "1..100"),
        (["max_attempts", "2.5"], "1..100"),
    ],
)
def test_parse_refuses_bad_ttl_and_attempts(extra: list[str], reason: str) -> None:
    with pytest.raises(InvalidCommand, match=reason) as e:
        parse("id", "a", "imei", IMEI, "text", "getver", *extra)
    assert (e.value.id, e.value.imei) == ("a", IMEI)  # the outcome can still name them


def test_parse_cancel_and_long_ids() -> None:
    assert parse("cancel", "cmd-7") == CancelRequest("cmd-7")
    with pytest.raises(InvalidCommand, match="'cancel' must name"):
        parse("cancel", "")
    with pytest.raises(InvalidCommand, match="longer than 128"):
        parse("id", "x" * 129, "imei", IMEI, "text", "getver")
    with pytest.raises(InvalidCommand, match="missing field 'text'"):
        parse("id", "a", "imei", IMEI)


def test_parse_duration() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "15m", "1h", "2d", "250ms")] == [
        90,
        90,
        900,
        3600,
        172800,
        0.25,
    ]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("1 week")


# --------------------------------------------------------------------------- scripts


class Queue:
    """Runs the scripts as the service does, against one redis-server."""

    def __init__(self, redis: RedisProcess) -> None:
        self.redis = redis
        redis.cmd("XGROUP", "CREATE", QUEUE_KEY, GROUP, "0", "MKSTREAM")

    def run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        return self.redis.cmd("EVAL", script.source, len(keys), *keys, *args)

    def add(
        self,
        cid: str,
        imei: str = IMEI,
        *,
        refusal: str = "",
        per_device: int = 32,
        total: int = 1000,
        attempts: int = 3,
        ttl_ms: int = 3_600_000,
        consumer: str = "a",
    ) -> list[Any]:
        entry = self.redis.cmd("XADD", QUEUE_KEY, "*", "id", cid, "imei", imei, "text", "getver")
        self.redis.cmd("XREADGROUP", "GROUP", GROUP, consumer, "STREAMS", QUEUE_KEY, ">")
        self.last_entry = entry
        return self.accept(entry, cid, imei, refusal, per_device, total, attempts, ttl_ms)

    def accept(
        self,
        entry: str,
        cid: str,
        imei: str,
        refusal: str = "",
        per_device: int = 32,
        total: int = 1000,
        attempts: int = 3,
        ttl_ms: int = 3_600_000,
    ) -> list[Any]:
        args = [GROUP, entry, 1000, AT, "a", cid, imei, refusal, per_device, total]
        args += ["text", "getver", "12", 30_000, ttl_ms, attempts]
        return list(self.run(ACCEPT, [QUEUE_KEY], args))

    def claim(self, imei: str = IMEI, instance: str = "a", force: bool = True) -> list[Any]:
        args = [imei, instance, 1000, AT, 30_000, "1" if force else ""]
        return list(self.run(CLAIM, [], args))

    def settle(
        self,
        cid: str,
        attempt: int,
        how: str,
        status: str = "",
        text: str = "",
        instance: str = "a",
    ) -> list[Any]:
        return list(self.run(SETTLE, [], [cid, instance, attempt, 1000, AT, how, status, text]))

    def sweep(self) -> list[int]:
        return list(self.run(SWEEP, [], [1000, AT, 100, "a"]))

    def cancel(self, cid: str) -> list[Any]:
        keys, args = cancel_args(cid, "cli", AT, results_maxlen=1000)
        return list(self.run(CANCEL, keys, args))

    def command(self, cid: str) -> dict[str, str]:
        flat = self.redis.cmd("HGETALL", queued_key(cid))
        return dict(zip(flat[0::2], flat[1::2], strict=True))

    def queued(self, imei: str = IMEI) -> list[str]:
        """The ids queued for ``imei``, in delivery order."""
        return [m.split(":", 1)[1] for m in self.redis.cmd("ZRANGE", device_key(imei), 0, -1)]

    def results(self) -> list[dict[str, str]]:
        out = []
        for _id, flat in self.redis.cmd("XRANGE", RESULTS_KEY, "-", "+"):
            out.append(dict(zip(flat[0::2], flat[1::2], strict=True)))
        return out

    def due(self, cid: str, *, expires: bool = True) -> None:
        """Move this command's index deadline (and its TTL if ``expires``) into the past."""
        if expires:
            self.redis.cmd("HSET", queued_key(cid), "expires", 1)
        self.redis.cmd("ZADD", EXPIRY_KEY, 1, cid)


@pytest.fixture
def queue(redis_session: RedisProcess) -> Queue:
    return Queue(redis_session)


def test_accept_stores_the_command_acknowledges_and_wakes_the_holder(queue: Queue) -> None:
    redis = queue.redis
    redis.cmd("HSET", "connections:registry", IMEI, "inst-b")
    assert queue.add("c1") == ["queued", "inst-b", 1]
    assert queue.add("c2") == ["queued", "inst-b", 2]
    assert queue.queued() == ["c1", "c2"]
    c1 = queue.command("c1")
    assert (c1["state"], c1["attempts"], c1["max_attempts"], c1["payload"]) == (
        "queued",
        "0",
        "3",
        "getver",
    )
    assert int(c1["expires"]) - int(c1["enqueued"]) == 3_600_000
    assert redis.cmd("ZSCORE", EXPIRY_KEY, "c1") == c1["expires"]
    # acknowledged and deleted from the entry stream
    assert redis.cmd("XPENDING", QUEUE_KEY, GROUP)[0] == 0
    assert redis.cmd("XLEN", QUEUE_KEY) == 0
    wakes = redis.cmd("XRANGE", wake_stream("inst-b"), "-", "+")
    assert [fields for _id, fields in wakes] == [["imei", IMEI], ["imei", IMEI]]
    assert queue.results() == []
    # a device nobody holds: stored, nobody woken
    assert queue.add("c3", OTHER) == ["queued", "", 1]


def test_an_entry_older_than_its_ttl_is_expired_not_stored(queue: Queue) -> None:
    """The TTL runs from the entry's id (Redis's clock when it was added), e.g. an entry that
    waited while no instance ran."""
    redis = queue.redis
    seconds, _micros = redis.cmd("TIME")
    old = f"{(int(seconds) - 120) * 1000}-0"  # added two minutes ago
    redis.cmd("XADD", QUEUE_KEY, old, "id", "c1", "imei", IMEI, "text", "setdigout 1")
    redis.cmd("XREADGROUP", "GROUP", GROUP, "a", "STREAMS", QUEUE_KEY, ">")
    assert queue.accept(old, "c1", IMEI, ttl_ms=60_000) == ["expired"]
    (result,) = queue.results()
    assert result["status"] == "expired"
    assert result["response"].startswith("expired before it was stored: the entry is 12")
    assert queue.queued() == [] and queue.command("c1") == {}
    assert redis.cmd("XPENDING", QUEUE_KEY, GROUP)[0] == 0
    # within its TTL it is stored, with the TTL counted from the entry
    fresh = f"{(int(seconds) - 120) * 1000}-1"
    redis.cmd("XADD", QUEUE_KEY, fresh, "id", "c2", "imei", IMEI, "text", "getver")
    redis.cmd("XREADGROUP", "GROUP", GROUP, "a", "STREAMS", QUEUE_KEY, ">")
    assert queue.accept(fresh, "c2", IMEI, ttl_ms=600_000)[0] == "queued"
    assert int(queue.command("c2")["expires"]) == (int(seconds) - 120) * 1000 + 600_000


def test_accept_twice_is_a_no_op(queue: Queue) -> None:
    """A retry after a lost reply (or another instance taking the entry over)."""
    queue.add("c1")
    again = queue.accept(queue.last_entry, "c1", IMEI)
    assert again == ["duplicate"]
    assert queue.queued() == ["c1"]
    assert queue.results() == []


def test_accept_refusals_are_invalid_outcomes(queue: Queue) -> None:
    assert queue.add("c1", per_device=2)[0] == "queued"
    assert queue.add("c2", per_device=2)[0] == "queued"
    full = queue.add("c3", per_device=2)
    assert full[0] == "invalid" and "queue full: 2 commands already queued for this IMEI" in full[1]
    total = queue.add("c4", OTHER, total=2)
    assert total[0] == "invalid" and "2 commands queued in all" in total[1]
    same_id = queue.add("c1", OTHER)
    assert same_id[0] == "invalid" and "already queued" in same_id[1]
    bad = queue.add("c5", refusal="invalid command entry: 'ttl_s' must be > 0")
    assert bad == ["invalid", "invalid command entry: 'ttl_s' must be > 0"]
    results = queue.results()
    assert [(r["id"], r["status"]) for r in results] == [
        ("c3", "invalid"),
        ("c4", "invalid"),
        ("c1", "invalid"),
        ("c5", "invalid"),
    ]
    assert all(r["entry_id"] and r["instance_id"] == "a" for r in results)
    assert queue.queued() == ["c1", "c2"] and queue.queued(OTHER) == []
    assert queue.redis.cmd("XPENDING", QUEUE_KEY, GROUP)[0] == 0


def test_claim_delivers_the_head_in_order_one_at_a_time(queue: Queue) -> None:
    assert queue.claim() == ["empty", ""]
    queue.add("c1")
    queue.add("c2")
    first = queue.claim()
    assert first[:3] == ["deliver", "", "c1"]
    assert first[3:9] == ["text", "getver", "12", "30000", 1, "3"]
    assert first[11] == ""  # nobody delivered it before
    command = queue.command("c1")
    assert (command["state"], command["instance"], command["attempts"]) == ("delivering", "a", "1")
    lease = int(queue.redis.cmd("ZSCORE", EXPIRY_KEY, "c1"))
    assert lease == int(command["claimed"]) + 30_000 + 30_000
    assert queue.run(WRITTEN, [], ["c1", "a", 1, 30_000]) == 1
    assert queue.run(WRITTEN, [], ["c1", "a", 2, 30_000]) == 0  # not this delivery
    # answered: one outcome, gone from every structure, and c2 is next
    settled = queue.settle("c1", 1, "answer", "ok", "Ver:1")
    assert settled[0] == "ok"
    (result,) = queue.results()
    assert (result["id"], result["status"], result["response"], result["attempts"]) == (
        "c1",
        "ok",
        "Ver:1",
        "1",
    )
    assert queue.command("c1") == {}
    assert queue.redis.cmd("ZSCORE", EXPIRY_KEY, "c1") is None
    assert queue.claim()[2] == "c2"


def test_order_follows_the_entry_stream_whichever_instance_stores_first(queue: Queue) -> None:
    """Two instances read entries 1 and 2; the one with entry 2 stores it first."""
    redis = queue.redis
    one = redis.cmd("XADD", QUEUE_KEY, "*", "id", "c1", "imei", IMEI, "text", "getinfo")
    two = redis.cmd("XADD", QUEUE_KEY, "*", "id", "c2", "imei", IMEI, "text", "getver")
    redis.cmd("XREADGROUP", "GROUP", GROUP, "a", "COUNT", 1, "STREAMS", QUEUE_KEY, ">")
    redis.cmd("XREADGROUP", "GROUP", GROUP, "b", "COUNT", 1, "STREAMS", QUEUE_KEY, ">")
    assert queue.accept(two, "c2", IMEI)[0] == "queued"
    # c2 must not go out while c1's entry waits: the device would get them swapped
    assert queue.claim() == ["waiting", ""]
    assert queue.accept(one, "c1", IMEI)[0] == "queued"
    assert queue.queued() == ["c1", "c2"]
    assert queue.claim()[2] == "c1"


def test_claim_only_where_the_registry_names_the_device(queue: Queue) -> None:
    queue.add("c1")
    queue.redis.cmd("HSET", "connections:registry", IMEI, "b")
    assert queue.claim(instance="a") == ["elsewhere", "b"]
    assert queue.command("c1")["state"] == "queued"
    assert queue.claim(instance="b")[2] == "c1"


def test_takeover_after_a_hop_and_the_stale_answer_is_fenced(queue: Queue) -> None:
    queue.add("c1")
    assert queue.claim(instance="a")[7] == 1
    # the device hopped to b before answering: b waits for a first (a may be recording the
    # answer), then takes the delivery over
    assert queue.claim(instance="b", force=False) == ["busy", "a"]
    takeover = queue.claim(instance="b")
    assert (takeover[2], takeover[7], takeover[11]) == ("c1", 2, "a")
    # a's late answer (or its release when the old socket closes) changes nothing
    assert queue.settle("c1", 1, "answer", "ok", "late", instance="a") == ["fenced"]
    assert queue.settle("c1", 1, "unanswered", text="closed", instance="a") == ["fenced"]
    assert queue.settle("c1", 2, "answer", "ok", "Ver:2", instance="b")[0] == "ok"
    assert [(r["status"], r["response"], r["instance_id"]) for r in queue.results()] == [
        ("ok", "Ver:2", "b")
    ]


def test_settle_wakes_the_new_holder_when_the_device_moved(queue: Queue) -> None:
    queue.add("c1")
    queue.add("c2")
    queue.claim(instance="a")
    queue.redis.cmd("HSET", "connections:registry", IMEI, "b")  # the device is on b now
    assert queue.settle("c1", 1, "answer", "ok", "Ver:1")[0] == "ok"
    assert queue.redis.cmd("XLEN", wake_stream("b")) == 1  # b delivers c2 without waiting
    assert queue.redis.cmd("EXISTS", wake_stream("a")) == 0


def test_unanswered_deliveries_fail_after_max_attempts(queue: Queue) -> None:
    queue.add("c1", attempts=2)
    queue.claim()
    assert queue.settle("c1", 1, "unanswered", text="no answer within 30 s") == ["requeued"]
    assert queue.command("c1")["state"] == "queued"
    assert queue.claim()[7] == 2
    assert queue.settle("c1", 2, "unanswered", text="no answer within 30 s") == ["failed"]
    (result,) = queue.results()
    assert result["status"] == "failed"
    assert result["response"] == (
        "no answer after 2 deliveries (max_attempts 2); last: no answer within 30 s"
    )
    assert queue.queued() == [] and queue.command("c1") == {}


def test_unsent_is_not_an_attempt(queue: Queue) -> None:
    queue.add("c1", attempts=1)
    queue.claim()
    assert queue.settle("c1", 1, "unsent", text="closed before it was written") == ["requeued"]
    assert queue.command("c1")["attempts"] == "0"
    assert queue.claim()[7] == 1


def test_takeover_counts_and_can_fail(queue: Queue) -> None:
    queue.add("c1", attempts=1)
    queue.add("c2")
    queue.claim(instance="a")
    # a died mid-delivery; with one attempt allowed, the takeover fails c1 and moves on
    claim = queue.claim(instance="b")
    assert (claim[0], claim[1], claim[2]) == ("deliver", "failed", "c2")
    (result,) = queue.results()
    assert (result["id"], result["status"], result["instance_id"]) == ("c1", "failed", "b")
    assert "before answering the delivery by a" in result["response"]


def test_claim_skips_expired_heads(queue: Queue) -> None:
    queue.add("c1")
    queue.add("c2")
    queue.due("c1")
    claim = queue.claim()
    assert (claim[1], claim[2]) == ("expired", "c2")
    (result,) = queue.results()
    assert (result["id"], result["status"]) == ("c1", "expired")


def test_sweep_expires_due_commands_once(queue: Queue) -> None:
    queue.add("c1")
    queue.add("c2")
    queue.add("c3", OTHER)
    queue.due("c1")
    queue.due("c3")
    assert queue.sweep() == [2, 2, 0, 0, 1]
    assert queue.sweep() == [0, 0, 0, 0, 1]  # nothing twice
    assert sorted((r["id"], r["status"]) for r in queue.results()) == [
        ("c1", "expired"),
        ("c3", "expired"),
    ]
    assert queue.queued() == ["c2"] and queue.queued(OTHER) == []


def test_sweep_puts_back_a_delivery_past_its_lease(queue: Queue) -> None:
    queue.redis.cmd("HSET", "connections:registry", IMEI, "b")
    queue.add("c1")
    queue.claim(instance="b")
    queue.redis.cmd("DEL", wake_stream("b"))
    queue.due("c1", expires=False)  # b died: its lease ran out, the TTL has not
    assert queue.sweep() == [1, 0, 0, 1, 1]
    command = queue.command("c1")
    assert (command["state"], command["attempts"]) == ("queued", "1")
    assert queue.redis.cmd("ZSCORE", EXPIRY_KEY, "c1") == command["expires"]
    assert queue.redis.cmd("XLEN", wake_stream("b")) == 1  # whoever holds it is told
    assert queue.results() == []
    # ... and with its attempts used up, the lapsed lease fails it
    queue.claim(instance="b")
    queue.claim(instance="b")
    queue.due("c1", expires=False)
    assert queue.sweep() == [1, 0, 1, 0, 0]
    assert [r["status"] for r in queue.results()] == ["failed"]


def test_outcomes_keep_the_results_stream_within_its_byte_bound(queue: Queue) -> None:
    for i in range(300):
        queue.add(f"c{i}", f"{350000000000000 + i}")
    limit = 20_000
    for i in range(300):
        keys, args = cancel_args(f"c{i}", "cli", AT, results_maxlen=f"100000:{limit}")
        assert queue.run(CANCEL, keys, args)[0] == "cancelled"
    assert queue.redis.cmd("MEMORY", "USAGE", RESULTS_KEY) <= limit * 1.2
    assert 0 < queue.redis.cmd("XLEN", RESULTS_KEY) < 300


def test_cancel(queue: Queue) -> None:
    queue.add("c1")
    queue.add("c2")
    assert queue.cancel("c2")[0] == "cancelled"
    assert queue.cancel("c2") == ["unknown"]
    queue.claim()
    assert queue.cancel("c1") == ["delivering", "a", "1"]
    (result,) = queue.results()
    assert (result["id"], result["status"], result["instance_id"]) == ("c2", "cancelled", "cli")
    assert queue.queued() == ["c1"]
    assert queue.redis.cmd("ZCARD", EXPIRY_KEY) == 1


def test_cancel_from_the_stream_acknowledges_its_entry(queue: Queue) -> None:
    queue.add("c1")
    entry = queue.redis.cmd("XADD", QUEUE_KEY, "*", "cancel", "c1")
    queue.redis.cmd("XREADGROUP", "GROUP", GROUP, "a", "STREAMS", QUEUE_KEY, ">")
    keys, args = cancel_args("c1", "a", AT, results_maxlen=1000, group=GROUP, entry=entry)
    assert queue.run(CANCEL, keys, args)[0] == "cancelled"
    assert queue.redis.cmd("XPENDING", QUEUE_KEY, GROUP)[0] == 0
    assert queue.redis.cmd("XLEN", QUEUE_KEY) == 0
