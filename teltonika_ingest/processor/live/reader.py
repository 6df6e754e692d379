"""The broadcast reader: every position of the telemetry stream, for the live feed.

Why not the durable consumer group: with several processor instances, the group splits the
stream between them, so an instance sees only its share. A client connected to any instance
must see every position of its devices, so each instance's live feed reads the whole stream
itself with plain ``XREAD`` (no group, nothing to acknowledge, nothing pending), starting at
the stream's tail when it starts and then following it. It never touches the durable group,
so a slow or broken live feed can never hold up, claim, or acknowledge the durable path.

It has its own Redis connection (``XREAD BLOCK`` holds the connection while it waits). After
a Redis error it retries from the last entry it saw (entries added meanwhile are broadcast
late rather than lost, as long as the stream still holds them).

Each entry is decoded by the processor's decoder (the same one the durable writer uses) and
handed to ``publish``. An entry that does not decode is counted and skipped: the durable
path dead-letters it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from teltonika_ingest.redis.client import RedisClient, RedisReplyError, RedisUnavailable

from .messages import Position, position_from_row
from .metrics import LiveMetrics

__all__ = ["BroadcastReader", "DecodeFn"]

log = Logger()

#: ``decode(entry_id, fields)`` → the typed position row (a mapping or an attrs instance
#: such as the processor's PositionRow), or None: not a position
DecodeFn = Callable[[str, dict[str, str]], Any]


class BroadcastReader(Service):
    name = "live-reader"

    def __init__(
        self,
        redis: RedisClient,
        stream: str,
        decode: DecodeFn,
        publish: Callable[[Position], object],
        metrics: LiveMetrics,
        *,
        reactor: Any,
        block_ms: int = 1000,
        count: int = 1000,
        retry_delay: float = 1.0,
    ) -> None:
        self._redis = redis
        self.stream = stream
        self._decode = decode
        self._publish = publish
        self._metrics = metrics
        self._reactor = reactor
        self.block_ms = block_ms
        self.count = count
        self.retry_delay = retry_delay
        self.last_id: str | None = None
        self._failing = False
        self._loop: Deferred[None] | None = None
        self.started: Deferred[str] = Deferred()  # fires with the first id read from

    def startService(self) -> None:
        super().startService()
        self.last_id = None
        self._loop = self._run()

    def stopService(self) -> None:
        # the blocked XREAD ends when the reader's Redis client stops (after this service)
        super().stopService()

    @defer.inlineCallbacks
    def _run(self) -> Any:
        timeout = self.block_ms / 1000.0 + self._redis.command_timeout
        while self.running:
            try:
                if self.last_id is None:
                    self.last_id = yield self._tail_id()
                    log.info(
                        "live broadcast reader following {stream} from {id}",
                        stream=self.stream,
                        id=self.last_id,
                    )
                    if not self.started.called:
                        self.started.callback(self.last_id)
                reply = yield self._redis.execute(
                    "XREAD", "COUNT", self.count, "BLOCK", self.block_ms,
                    "STREAMS", self.stream, self.last_id, timeout=timeout,
                )  # fmt: skip
            except Exception as e:
                if not self.running:
                    return
                self._metrics.reads.labels("error").inc()
                if isinstance(e, RedisUnavailable) and not self._redis.ever_connected:
                    # still starting (the client itself warns if Redis stays unreachable)
                    log.debug("live broadcast reader: Redis not connected yet; retrying")
                elif not self._failing:
                    log.warn(
                        "live broadcast reader: {error}; retrying",
                        error=str(e) or type(e).__name__,
                    )
                    self._failing = True
                yield task.deferLater(self._reactor, self.retry_delay, lambda: None)
                continue
            if self._failing:
                log.info("live broadcast reader reading again from {id}", id=self.last_id)
                self._failing = False
            if not reply:
                self._metrics.reads.labels("empty").inc()
                continue
            self._metrics.reads.labels("ok").inc()
            for _key, entries in reply:
                self._handle(entries)

    def _tail_id(self) -> Deferred[str]:
        d = self._redis.execute("XINFO", "STREAM", self.stream)

        def last_generated(reply: list[Any]) -> str:
            info = dict(zip(reply[::2], reply[1::2], strict=False))
            return str(info["last-generated-id"])

        def missing(failure: Any) -> str:
            failure.trap(RedisReplyError)
            if "no such key" in str(failure.value).lower():
                return "0-0"  # no stream yet: everything it will hold is new
            return failure

        return d.addCallbacks(last_generated, missing)

    def _handle(self, entries: list[Any]) -> None:
        for entry_id, flat in entries:
            self.last_id = entry_id
            try:
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                row = self._decode(entry_id, fields)
                if row is None:
                    continue
                position = position_from_row(row, entry_ms=int(entry_id.split("-", 1)[0]))
            except Exception as e:
                self._metrics.decode_errors.inc()
                log.debug("live: entry {id} not broadcast: {error}", id=entry_id, error=repr(e))
                continue
            try:
                self._publish(position)
            except Exception:
                log.failure("live: broadcasting entry {id} failed", id=entry_id)
