"""Connection registry, instance heartbeat and the registry janitor (contract.md §2).

* ``connections:registry`` hash: IMEI -> instance id holding that device's socket.
* ``instance:heartbeat:{id}``: epoch ms, ``SET EX 90`` every 30 s.

Registry trouble never blocks telemetry: every write here is fire-and-forget from the
session's point of view; failures are logged and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from teltonika_ingest.redis.client import RedisClient, RedisUnavailable, Script
from teltonika_ingest.server.budget import RepeatLimiter, suppressed_note
from teltonika_ingest.server.metrics import Metrics

log = Logger()

REGISTRY_KEY = "connections:registry"
HEARTBEAT_PREFIX = "instance:heartbeat:"

# Delete each field of ARGV[2..] only if it still names ARGV[1]; returns the count deleted.
COMPARE_AND_DELETE = Script(
    """
local n = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
"""
)

# Delete every field naming ARGV[1] (HSCAN: the hash is walked in steps, never copied whole).
PURGE_INSTANCE = Script(
    """
local cursor, n = '0', 0
repeat
  local reply = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 1000)
  cursor = reply[1]
  local kv = reply[2]
  for i = 1, #kv, 2 do
    if kv[i + 1] == ARGV[1] then
      n = n + redis.call('HDEL', KEYS[1], kv[i])
    end
  end
until cursor == '0'
return n
"""
)


#: most IMEIs in one compare-and-delete (a Lua call blocks Redis while it runs)
UNREGISTER_BATCH = 500


class _UnregisterBatch:
    """The unregisters of one pass: ``done`` fires with the batch's reply (what each
    ``unregister()`` returns), ``tail`` when it was answered (a later write of one of these
    IMEIs waits for it)."""

    __slots__ = ("done", "imeis", "tail")

    def __init__(self) -> None:
        self.imeis: list[str] = []
        self.done: defer.Deferred[Any] = defer.Deferred()
        self.tail: defer.Deferred[None] = defer.Deferred()


def heartbeat_key(instance_id: str) -> str:
    return HEARTBEAT_PREFIX + instance_id


class Registry(Service):
    """Registers held IMEIs and keeps this instance's heartbeat alive."""

    name = "registry"

    def __init__(
        self,
        redis: RedisClient,
        *,
        instance_id: str,
        metrics: Metrics,
        clock: IReactorTime,
        heartbeat_interval: float = 30.0,
        heartbeat_ttl: int = 90,
        janitor_interval: float = 60.0,
    ) -> None:
        self.redis = redis
        self.instance_id = instance_id
        self.metrics = metrics
        self.clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_ttl = heartbeat_ttl
        self.janitor_interval = janitor_interval
        self.heartbeat_key = heartbeat_key(instance_id)
        self._heartbeat = task.LoopingCall(self.beat)
        self._heartbeat.clock = clock
        self._janitor = task.LoopingCall(self.sweep)
        self._janitor.clock = clock
        self._sweeping: defer.Deferred[int] | None = None
        self._pending: set[defer.Deferred[Any]] = set()
        #: per IMEI, fires when its last registry write has been answered
        self._tails: dict[str, defer.Deferred[None]] = {}
        #: unregisters asked for in this pass of the event loop, sent at its end
        self._unregistering: _UnregisterBatch | None = None
        self._unregister_call: Any = None
        #: failed writes are Redis' doing: a few lines a minute for all devices, not one each
        self.log_limit = RepeatLimiter(clock)

    # ------------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        super().startService()
        # Beat at once if Redis is already there; otherwise the owner calls beat() when the
        # connection comes up (a beat before that would only fail and count a failure).
        self._heartbeat.start(self.heartbeat_interval, now=self.redis.connected)
        if self.janitor_interval > 0:
            self._janitor.start(self.janitor_interval, now=False)

    def stop_timers(self) -> None:
        for loop in (self._heartbeat, self._janitor):
            if loop.running:
                loop.stop()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.stop_timers()
        return defer.succeed(None)

    # ------------------------------------------------------------------ registry

    def register(self, imei: str) -> defer.Deferred[Any]:
        def send() -> defer.Deferred[Any]:
            d = self.redis.execute("HSET", REGISTRY_KEY, imei, self.instance_id)
            d.addErrback(self._failed, "register", imei)
            return d

        return self._track(self._in_order(imei, send))

    def register_many(self, imeis: list[str]) -> defer.Deferred[Any]:
        """Register many IMEIs at once (after a Redis reconnect), in batches of 500."""
        calls = []
        for start in range(0, len(imeis), 500):
            batch = imeis[start : start + 500]
            args: list[str] = []
            for imei in batch:
                args += [imei, self.instance_id]
            d = self.redis.execute("HSET", REGISTRY_KEY, *args)
            d.addErrback(self._failed, "register", f"{len(batch)} IMEIs")
            calls.append(self._track(d))
        return defer.gatherResults(calls, consumeErrors=True)

    def unregister(self, imei: str) -> defer.Deferred[Any]:
        """Remove ``imei`` only if the registry still names this instance (atomic).

        Unregisters asked for in one pass of the event loop go to Redis as one
        compare-and-delete of many IMEIs (at most :data:`UNREGISTER_BATCH`), sent at the end
        of the pass: when a cell outage drops the whole fleet at once, the reactor reads
        thousands of closed sockets in one pass, and one script call (and its Deferreds) per
        device held ~2 KB each until Redis was reached. The returned Deferred (shared by the
        batch) fires once Redis answered the batch."""
        if imei in self._tails:
            # a write for this IMEI is still unanswered: this one waits for it
            def send() -> defer.Deferred[Any]:
                d = self.redis.run_script(
                    COMPARE_AND_DELETE, [REGISTRY_KEY], [self.instance_id, imei]
                )
                d.addErrback(self._failed, "unregister", imei)
                return d

            return self._track(self._in_order(imei, send))
        batch = self._unregistering
        if batch is None:
            batch = self._unregistering = _UnregisterBatch()
            self._track(batch.done)
            self._unregister_call = self.clock.callLater(0, self._send_unregisters)
        batch.imeis.append(imei)
        self._tails[imei] = batch.tail
        if len(batch.imeis) >= UNREGISTER_BATCH:
            self._send_unregisters()
        return batch.done

    def _send_unregisters(self) -> None:
        call, self._unregister_call = self._unregister_call, None
        if call is not None and call.active():
            call.cancel()
        batch, self._unregistering = self._unregistering, None
        if batch is None:
            return
        imeis = batch.imeis
        d = self.redis.run_script(COMPARE_AND_DELETE, [REGISTRY_KEY], [self.instance_id, *imeis])
        what = imeis[0] if len(imeis) == 1 else f"{len(imeis)} IMEIs"
        d.addErrback(self._failed, "unregister", what)
        tails, tail = self._tails, batch.tail

        def answered(result: Any) -> Any:
            for imei in imeis:
                if tails.get(imei) is tail:
                    del tails[imei]
            tail.callback(None)
            return result

        d.addBoth(answered).chainDeferred(batch.done)

    def _in_order(self, imei: str, send: Callable[[], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        """Send this IMEI's registry write only once its previous one was answered.

        A device that closes and reconnects to this instance produces an unregister
        (compare-and-delete) then a register (HSET). Sent back to back they can be served
        in the other order (pooled connections, or the NOSCRIPT retry of the script), and
        the compare-and-delete would then remove the live registration.
        """
        previous = self._tails.get(imei)
        if previous is None:
            d = send()
        else:
            d = defer.Deferred()

            def go(_: Any) -> None:
                send().chainDeferred(d)

            previous.addCallback(go)
        tail = _observe(d)
        self._tails[imei] = tail

        def forget(_: Any) -> None:
            if self._tails.get(imei) is tail:
                del self._tails[imei]

        tail.addCallback(forget)
        return d

    def _track(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self._pending.add(d)

        def settled(result: Any) -> Any:
            self._pending.discard(d)
            return result

        d.addBoth(settled)
        return d

    def settled(self) -> defer.Deferred[Any]:
        """Fires once every register/unregister issued so far has been answered."""
        pending = [_observe(d) for d in self._pending]
        return defer.gatherResults(pending, consumeErrors=True) if pending else defer.succeed([])

    def purge_own(self) -> defer.Deferred[Any]:
        """Start-up: remove every field that names this instance id. A process that just
        started holds no device, so such fields are left by a previous run that did not shut
        down cleanly (a crashed and restarted worker keeps its instance id, and its heartbeat
        key may still exist, so the janitor would not remove them)."""

        def done(removed: Any) -> Any:
            if removed:
                log.info(
                    "registry: removed {n} stale fields of instance {instance} (left by a "
                    "previous run that did not shut down cleanly)",
                    n=removed,
                    instance=self.instance_id,
                )
            return removed

        d = self.redis.run_script(PURGE_INSTANCE, [REGISTRY_KEY], [self.instance_id])
        d.addCallbacks(done, self._failed, errbackArgs=("start-up purge", "its own fields"))
        return self._track(d)

    def unregister_all(self, imeis: list[str]) -> defer.Deferred[Any]:
        """Graceful shutdown: remove every field we still own, and our heartbeat key."""
        self.stop_timers()
        calls = []
        for start in range(0, len(imeis), 500):
            batch = imeis[start : start + 500]
            d = self.redis.run_script(
                COMPARE_AND_DELETE, [REGISTRY_KEY], [self.instance_id, *batch]
            )
            d.addErrback(self._failed, "unregister", f"{len(batch)} IMEIs")
            calls.append(d)
        d = self.redis.execute("DEL", self.heartbeat_key)
        d.addErrback(self._heartbeat_failed)
        calls.append(d)
        return defer.gatherResults(calls, consumeErrors=True)

    def _before_first_connection(self, what: str, failure: Any) -> bool:
        """A write that failed because Redis has not answered yet since start-up is not a
        failure: the service registers every held device and beats once Redis connects."""
        if getattr(self.redis, "ever_connected", True) or not failure.check(RedisUnavailable):
            return False
        log.debug("{what} deferred until Redis first connects", what=what)
        return True

    def _failed(self, failure: Any, what: str, imei: str) -> None:
        if self._before_first_connection(f"registry {what} for {imei}", failure):
            return
        self.metrics.registry_failures.inc()
        logged, suppressed = self.log_limit.allow(("registry", what, type(failure.value).__name__))
        if logged:
            log.warn(
                "registry {what} failed for {imei}: {error}{suppressed_note}",
                what=what,
                imei=imei,
                error=failure.getErrorMessage(),
                suppressed=suppressed,
                suppressed_note=suppressed_note(suppressed),
            )

    # ------------------------------------------------------------------ heartbeat

    def beat(self) -> defer.Deferred[Any]:
        now_ms = int(self.clock.seconds() * 1000)
        d = self.redis.execute("SET", self.heartbeat_key, str(now_ms), "EX", self.heartbeat_ttl)
        d.addErrback(self._heartbeat_failed)
        return d

    def _heartbeat_failed(self, failure: Any) -> None:
        if self._before_first_connection("heartbeat", failure):
            return
        self.metrics.heartbeat_failures.inc()
        log.warn(
            "heartbeat {key} failed: {error}",
            key=self.heartbeat_key,
            error=failure.getErrorMessage(),
        )

    # ------------------------------------------------------------------ janitor

    def sweep(self) -> defer.Deferred[int]:
        """Remove registry fields whose instance has no heartbeat key.

        Safe on every instance at once: each deletion is a compare-and-delete, so a
        field re-registered by a live instance in the meantime is left alone.
        """
        if self._sweeping is not None:
            return self._sweeping  # the previous sweep is still running
        d = defer.ensureDeferred(self._sweep())
        d.addErrback(self._sweep_failed)

        def finished(result: int) -> int:
            self._sweeping = None
            return result

        d.addBoth(finished)
        self._sweeping = d
        return d

    async def _sweep(self) -> int:
        removed = 0
        cursor = "0"
        alive: dict[str, bool] = {self.instance_id: True}
        while True:
            reply = await self.redis.execute("HSCAN", REGISTRY_KEY, cursor, "COUNT", 1000)
            cursor = _text(reply[0])
            flat = reply[1]
            dead: dict[str, list[str]] = {}
            for i in range(0, len(flat), 2):
                imei, owner = _text(flat[i]), _text(flat[i + 1])
                if owner not in alive:
                    exists = await self.redis.execute("EXISTS", heartbeat_key(owner))
                    alive[owner] = bool(exists)
                if not alive[owner]:
                    dead.setdefault(owner, []).append(imei)
            for owner, imeis in dead.items():
                n = await self.redis.run_script(COMPARE_AND_DELETE, [REGISTRY_KEY], [owner, *imeis])
                if n:
                    removed += int(n)
                    self.metrics.janitor_removed.inc(int(n))
                    log.info(
                        "janitor removed {count} registry fields of instance {owner} "
                        "(no heartbeat)",
                        count=int(n),
                        owner=owner,
                    )
            if cursor == "0":
                return removed

    def _sweep_failed(self, failure: Any) -> int:
        if self._before_first_connection("janitor sweep", failure):
            return 0
        self.metrics.registry_failures.inc()
        log.warn("registry janitor sweep failed: {error}", error=failure.getErrorMessage())
        return 0


def _observe(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """A Deferred firing when ``d`` does, leaving ``d``'s own result alone."""
    observer: defer.Deferred[Any] = defer.Deferred()

    def fire(result: Any) -> Any:
        observer.callback(None)
        return result

    d.addBoth(fire)
    return observer


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
