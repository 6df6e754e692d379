"""``--workers N``: N worker processes serving the same device (and UDP) port.

The supervisor (this module, the twistd process) opens every socket itself and passes them
to its workers (``server/worker.py``) as inherited file descriptors, which they adopt
(``reactor.adoptStreamPort`` / ``adoptDatagramPort``):

* device TCP: with ``--worker-sockets reuseport`` (default) one ``SO_REUSEPORT`` listening
  socket per worker on the same address (the kernel spreads new connections over them by
  a hash of the addresses); with ``shared`` one socket that every worker accepts from;
* UDP: one ``SO_REUSEPORT`` socket per worker, so the datagrams of one device address keep
  going to one worker (its resend deduplication is per process);
* HTTP: one loopback socket per worker for its own ``/metrics`` and ``/readyz``.

Because the supervisor keeps the sockets, a worker that dies is restarted on the same ones
(connections that arrive meanwhile wait in the kernel's accept queue). Worker *i* runs with
instance id ``<--instance-id>-i``: its own registry heartbeat, registry fields and command
stream, so the business plane's routing (``HGET connections:registry``) stays right.

The ``--metrics`` endpoint is served here: ``/metrics`` merges every worker's metrics with a
``worker`` label plus the supervisor's own; ``/readyz`` is ready when every worker is.
SIGTERM: each worker gets SIGTERM and drains (contract.md §7); the supervisor waits for all.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sys
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.application import internet, service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory, readBody

from teltonika_ingest.config import Config, _split_endpoint, with_backlog
from teltonika_ingest.ops.http import Healthz, Readyz
from teltonika_ingest.server.worker import WorkerSpec

log = Logger()

#: restart delays after a worker died: doubles from the first to the last, back to the first
#: once a worker has run for RESTART_RESET s
RESTART_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
RESTART_RESET = 60.0
#: child descriptor numbers of the adopted sockets
LISTEN_FD, METRICS_FD, UDP_FD = 3, 4, 5


class SupervisorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.workers_running = Gauge(
            "teltonika_workers_running",
            "Worker processes running (--workers).",
            registry=registry,
        )
        self.worker_restarts = Counter(
            "teltonika_worker_restarts_total",
            "Worker processes restarted after they exited unexpectedly.",
            registry=registry,
        )


@attrs.define
class ListenAddress:
    host: str
    port: int
    backlog: int


def parse_tcp_listen(description: str) -> ListenAddress:
    """``tcp:PORT[:interface=IP][:backlog=N]`` -> address; anything else is a ValueError."""
    parts = list(_split_endpoint(description))
    if not parts or parts[0] != (None, "tcp"):
        raise ValueError(f"--workers > 1 needs a tcp: --listen endpoint, got {description!r}")
    host, backlog, port = "0.0.0.0", 1024, None
    for key, value in parts[1:]:
        if (key is None and port is None) or key == "port":
            port = int(value)
        elif key == "interface":
            host = value
        elif key == "backlog":
            backlog = int(value)
        else:
            raise ValueError(f"--listen parameter {key or value!r} not supported with --workers")
    if port is None:
        raise ValueError(f"--listen {description!r} names no port")
    return ListenAddress(host, port, backlog)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def open_tcp(address: ListenAddress, reuseport: bool) -> socket.socket:
    sock = socket.socket(_family(address.host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address.host, address.port))
    sock.listen(address.backlog)
    sock.setblocking(False)
    return sock


def open_udp(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.started_at = supervisor.reactor.seconds()

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.ended.callback(code if code is not None else 128 + (sig or 0))
        self.supervisor._worker_ended(self, code, sig)


class WorkerSupervisor(service.Service):
    """Starts, restarts and stops ``config.workers`` worker processes (see the module doc)."""

    def __init__(
        self,
        config: Config,
        *,
        reactor: Any = None,
        log_observer: Any = None,
        logfile: str | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.log_observer = log_observer
        self.logfile = logfile
        self.exit_code: int | None = None
        self.registry = CollectorRegistry()
        self.metrics = SupervisorMetrics(self.registry)
        self.address = parse_tcp_listen(with_backlog(config.listen, config.listen_backlog))
        self.sockets: list[dict[str, socket.socket]] = []
        self.workers: dict[int, _WorkerProcess] = {}
        self.pids: dict[int, int] = {}
        self._failures: dict[int, int] = {}
        self._restart_calls: dict[int, Any] = {}
        self._stopping = False
        self.metrics.workers_running.set_function(lambda: len(self.workers))
        self.http = internet.StreamServerEndpointService(
            endpoints.serverFromString(reactor, config.metrics), self._site()
        )
        self.http._raiseSynchronously = True
        self._pool = HTTPConnectionPool(reactor)
        self._pool._factory = _QuietClientFactory
        # systemd notify from the supervisor (the unit's main process); read and removed from
        # the environment here, before any worker is spawned, so workers never notify
        from teltonika_ingest.ops.sdnotify import SystemdNotifier

        self.notifier = SystemdNotifier.from_environment(
            clock=reactor, ready_check=self.readiness, status=self.status_line
        )

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.log_observer is not None:
            from teltonika_ingest import logsetup

            logsetup.offer_to_application(parent, self.log_observer)

    # ------------------------------------------------------------------ start

    def _open_sockets(self) -> None:
        config = self.config
        shared: socket.socket | None = None
        reuseport = config.worker_sockets == "reuseport"
        if not reuseport:
            shared = open_tcp(self.address, reuseport=False)
        for _index in range(config.workers):
            tcp = open_tcp(self.address, reuseport=True) if reuseport else shared
            assert tcp is not None
            if reuseport and self.address.port == 0:  # the same port for all
                self.address.port = tcp.getsockname()[1]
            entry = {"listen": tcp, "metrics": open_tcp(ListenAddress("127.0.0.1", 0, 128), False)}
            if config.udp_port:
                entry["udp"] = open_udp(config.udp_interface or "0.0.0.0", config.udp_port)
            self.sockets.append(entry)

    def startService(self) -> None:
        super().startService()
        from teltonika_ingest.server.tap import raise_open_files_limit

        raise_open_files_limit(self.config.max_connections)
        self._open_sockets()
        log.info(
            "teltonika-ingest supervisor: {n} workers ({mode} sockets) on {host}:{port}, "
            "instance ids {first} .. {last}",
            n=self.config.workers,
            mode=self.config.worker_sockets,
            host=self.address.host,
            port=self.sockets[0]["listen"].getsockname()[1],
            first=f"{self.config.instance_id}-0",
            last=f"{self.config.instance_id}-{self.config.workers - 1}",
        )
        for index in range(self.config.workers):
            self._spawn(index)
        self.http.startService()
        if self.notifier is not None:
            self.notifier.startService()  # READY=1 once every worker is ready

    def status_line(self, elapsed: float) -> str:
        """systemd's STATUS=."""
        return f"{len(self.workers)} of {self.config.workers} workers running"

    def _spawn(self, index: int) -> None:
        self._restart_calls.pop(index, None)
        if self._stopping:
            return
        config = self.config
        socks = self.sockets[index]
        child_config = attrs.evolve(
            config,
            instance_id=f"{config.instance_id}-{index}",
            workers=1,
            listen=f"adopted:fd={LISTEN_FD}",
            metrics=f"adopted:fd={METRICS_FD}",
        )
        logfile = f"{self.logfile}.worker-{index}" if self.logfile else None
        spec = WorkerSpec(
            index=index,
            config=child_config,
            listen_fd=LISTEN_FD,
            metrics_fd=METRICS_FD,
            udp_fd=UDP_FD if "udp" in socks else None,
            supervisor_pid=os.getpid(),
            logfile=logfile,
        )
        fds: dict[int, Any] = {
            0: "w",
            1: 1,
            2: 2,
            LISTEN_FD: socks["listen"].fileno(),
            METRICS_FD: socks["metrics"].fileno(),
        }
        if "udp" in socks:
            fds[UDP_FD] = socks["udp"].fileno()
        proto = _WorkerProcess(self, index)
        transport = self.reactor.spawnProcess(
            proto,
            sys.executable,
            [sys.executable, "-m", "teltonika_ingest.server.worker"],
            env=dict(os.environ),
            childFDs=fds,
        )
        transport.write(pickle.dumps(spec))
        transport.closeStdin()
        self.workers[index] = proto
        self.pids[index] = transport.pid
        log.info("worker {index} started: pid {pid}", index=index, pid=transport.pid)

    def _worker_ended(self, proto: _WorkerProcess, code: int | None, sig: int | None) -> None:
        index = proto.index
        if self.workers.get(index) is proto:
            del self.workers[index]
            self.pids.pop(index, None)
        if self._stopping:
            log.info("worker {index} exited ({code})", index=index, code=code)
            return
        ran = self.reactor.seconds() - proto.started_at
        failures = 0 if ran >= RESTART_RESET else self._failures.get(index, 0) + 1
        self._failures[index] = failures
        delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
        log.error(
            "worker {index} exited unexpectedly (status {code}, signal {sig}) after {ran:.1f} s; "
            "restarting it in {delay} s",
            index=index,
            code=code,
            sig=sig,
            ran=ran,
            delay=delay,
        )
        self.metrics.worker_restarts.inc()
        self._restart_calls[index] = self.reactor.callLater(delay, self._spawn, index)

    # ------------------------------------------------------------------ stop

    def stopService(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        self._stopping = True
        super().stopService()
        if self.notifier is not None:
            self.notifier.stopping()
        for call in self._restart_calls.values():
            if call.active():
                call.cancel()
        self._restart_calls.clear()
        running = list(self.workers.values())
        log.info("shutdown: SIGTERM to {n} workers (each drains)", n=len(running))
        for proto in running:
            if proto.transport is not None:
                with contextlib.suppress(OSError, ProcessExitedAlready):
                    proto.transport.signalProcess("TERM")
        ended = defer.DeferredList([p.ended for p in running], consumeErrors=True)
        timer = self.reactor.callLater(self.config.shutdown_timeout + 5.0, self._kill_all, running)
        results = await ended
        if timer.active():
            timer.cancel()
        codes = [code for ok, code in results if ok]
        if any(codes):
            log.error("workers exited with statuses {codes}", codes=codes)
            self.exit_code = 1
        await self.http.stopService()
        await self._pool.closeCachedConnections()
        for entry in self.sockets:
            for sock in entry.values():
                sock.close()
        log.info("supervisor shutdown complete")
        if self.notifier is not None:
            self.notifier.stopService()

    def _kill_all(self, running: list[_WorkerProcess]) -> None:
        for proto in running:
            if not proto.ended.called and proto.transport is not None:
                log.critical("worker {index} did not stop: SIGKILL", index=proto.index)
                with contextlib.suppress(OSError, ProcessExitedAlready):
                    proto.transport.signalProcess("KILL")

    # ------------------------------------------------------------------ HTTP

    def _site(self) -> server.Site:
        root = resource.Resource()
        root.putChild(b"metrics", MergedMetrics(self))
        root.putChild(b"healthz", Healthz())
        root.putChild(b"readyz", Readyz(self.readiness))
        site = server.Site(root)
        site.displayTracebacks = False
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        return site

    def worker_urls(self, path: str) -> list[tuple[int, str]]:
        out = []
        for index, entry in enumerate(self.sockets):
            port = entry["metrics"].getsockname()[1]
            out.append((index, f"http://127.0.0.1:{port}{path}"))
        return out

    async def _get(self, url: str) -> tuple[int, bytes]:
        agent = Agent(self.reactor, pool=self._pool)
        d = agent.request(b"GET", url.encode())
        d.addTimeout(5, self.reactor)
        response = await d
        body = await readBody(response)
        return int(response.code), body

    def readiness(self) -> defer.Deferred[str | None]:
        async def check() -> str | None:
            if self._stopping:
                return "shutting down"
            for index, url in self.worker_urls("/readyz"):
                if index not in self.workers:
                    return f"worker {index} not running"
                try:
                    code, body = await self._get(url)
                except Exception as e:
                    return f"worker {index} not answering: {e}"
                if code != 200:
                    return f"worker {index}: {body.decode(errors='replace').strip()}"
            return None

        return defer.ensureDeferred(check())

    async def merged_metrics(self) -> bytes:
        families: dict[str, Metric] = {}
        urls = [(i, url) for i, url in self.worker_urls("/metrics") if i in self.workers]
        # every worker at once: a scrape takes as long as the slowest worker, not the sum
        replies = await defer.DeferredList(
            [defer.ensureDeferred(self._get(url)) for _, url in urls], consumeErrors=True
        )
        for (index, _url), (ok, reply) in zip(urls, replies, strict=True):
            if not ok:
                failure: Any = reply
                log.warn(
                    "worker {index} metrics not read: {error}",
                    index=index,
                    error=failure.getErrorMessage(),
                )
                continue
            code, body = reply
            if code != 200:
                continue
            for family in text_string_to_metric_families(body.decode()):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    merged.add_sample(
                        sample.name, {**sample.labels, "worker": str(index)}, sample.value
                    )
        registry = CollectorRegistry()
        registry.register(_Fixed(list(families.values())))
        return generate_latest(self.registry) + generate_latest(registry)


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" line per scrape


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class MergedMetrics(resource.Resource):
    isLeaf = True

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        super().__init__()
        self.supervisor = supervisor

    def render_GET(self, request: server.Request) -> Any:
        def done(text: bytes) -> None:
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            request.write(text)
            request.finish()

        def failed(failure: Any) -> None:
            request.setResponseCode(500)
            request.write(f"metrics not collected: {failure.getErrorMessage()}\n".encode())
            request.finish()

        defer.ensureDeferred(self.supervisor.merged_metrics()).addCallbacks(done, failed)
        return server.NOT_DONE_YET
