"""Whether Redis takes writes, probed in the background so that ``/readyz`` answers at once.

A ``/readyz`` that asks Redis on every request answers only as fast as Redis does: under a
stall (``CLIENT PAUSE``, a blocked server) it took 5.2 s, longer than a container health
check waits. And a ``PING`` is answered by a Redis that refuses every write (out of memory
with ``noeviction``, a read-only replica, a password required): ready on paper, useless.

:class:`RedisWriteProbe` writes one small key, ``instance:probe:{instance_id}`` (``SET ... PX``,
gone by itself), every ``interval`` seconds with a deadline of ``timeout`` seconds, and keeps
the outcome. :meth:`RedisWriteProbe.reason` reads that cached state: ``None`` when the last
probe succeeded recently, else why not (the error reply's code: ``OOM``, ``READONLY``,
``NOAUTH``, ``MISCONF`` ..., or "no answer within ..."). A probe that never comes back makes
the state stale after ``interval + timeout``, so the answer is "not ready" within about a
second and a half of Redis stopping to answer, without any request waiting for Redis.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika_ingest.redis.client import RedisReplyError, RedisTimeout, RedisUnavailable

__all__ = ["PROBE_KEY_PREFIX", "RedisWriteProbe"]

log = Logger()

PROBE_KEY_PREFIX = "instance:probe:"


class RedisWriteProbe(Service):
    """Background write probe of ``redis`` (a ``RedisClient``); see the module docstring."""

    name = "readiness"

    def __init__(
        self,
        redis: Any,
        *,
        instance_id: str,
        clock: Any,
        interval: float = 0.5,
        timeout: float = 0.8,
    ) -> None:
        self.redis = redis
        self.key = PROBE_KEY_PREFIX + instance_id
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.probes = 0
        self._loop: LoopingCall | None = None
        self._in_flight = False
        self._ok_at: float | None = None
        self._error: str | None = None
        self._last_logged: str | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.probe)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("readiness probe loop stopped", failure=f)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    # ------------------------------------------------------------------ probing

    def probe(self) -> None:
        if self._in_flight:
            return  # the last one has not come back: reason() says so once it is stale
        self._in_flight = True
        self.probes += 1
        started = self.clock.seconds()
        ttl_ms = max(1000, int((self.interval + self.timeout) * 4000))
        d = self.redis.execute(
            "SET", self.key, int(started * 1000), "PX", ttl_ms, timeout=self.timeout
        )
        d.addCallbacks(self._succeeded, self._failed)
        d.addErrback(lambda f: log.failure("readiness probe", failure=f))

    def _succeeded(self, _reply: Any) -> None:
        self._in_flight = False
        self._ok_at = self.clock.seconds()
        if self._error is not None:
            log.info("Redis takes writes again; ready")
        self._error = None
        self._last_logged = None

    def _failed(self, failure: Failure) -> None:
        self._in_flight = False
        exc = failure.value
        if isinstance(exc, RedisReplyError):
            self._error = f"redis refuses writes ({_short(str(exc))})"
        elif isinstance(exc, RedisTimeout):
            self._error = f"redis did not answer a write within {self.timeout:g} s"
        else:
            self._error = f"redis unavailable ({_short(failure.getErrorMessage())})"
        if self._error != self._last_logged:
            self._last_logged = self._error
            # Before Redis first answers (start-up) this is expected, not an alarm; if Redis
            # is really unreachable the client warns with the reason (RedisClient.trouble).
            starting = isinstance(exc, RedisUnavailable) and not getattr(
                self.redis, "ever_connected", True
            )
            (log.debug if starting else log.warn)("not ready: {reason}", reason=self._error)

    # ------------------------------------------------------------------ the cached answer

    def reason(self) -> str | None:
        """None when Redis took the last write recently; else why not. Never waits."""
        if self._error is not None:
            return self._error
        if self._ok_at is None:
            return "redis has not taken a write yet"
        late = self.clock.seconds() - self._ok_at
        if late > self.interval + self.timeout:
            return f"redis has not taken a write for {late:.1f} s"
        return None


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
