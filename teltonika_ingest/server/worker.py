"""One worker process of ``--workers N``.

Forked by the fork server (``server/forkserver.py``) on the supervisor's request
(``server/workers.py``), never started by hand. :func:`run` adopts the listening sockets the
supervisor opened (inherited descriptors), and runs the ordinary
:class:`~teltonika_ingest.server.tap.IngestService` with its own instance id. SIGTERM drains
it exactly as a single-process service (contract.md §7). It asks the kernel for SIGTERM when
its parent (the fork server) dies (``PR_SET_PDEATHSIG``), so no worker outlives them.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from zope.interface import implementer

from teltonika_ingest.config import Config


@attrs.frozen
class WorkerSpec:
    """What the supervisor hands a worker: its index, its configuration (instance id already
    suffixed, ``workers`` = 1) and the inherited descriptors to adopt."""

    index: int
    config: Config
    listen_fd: int
    metrics_fd: int
    udp_fd: int | None
    logfile: str | None  # None: standard output


@attrs.frozen
class AdoptedSockets:
    listen_fd: int
    metrics_fd: int
    udp_fd: int | None


@implementer(IStreamServerEndpoint)
class AdoptedStreamEndpoint:
    """A server endpoint over an already listening TCP socket (an inherited descriptor)."""

    def __init__(self, reactor: Any, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd

    def listen(self, factory: Any) -> defer.Deferred[IListeningPort]:
        with socket.socket(fileno=os.dup(self.fd)) as probe:  # a dup: closing it keeps fd
            family = probe.family
        try:
            port = self.reactor.adoptStreamPort(self.fd, family, factory)
        except Exception:
            return defer.fail()
        return defer.succeed(port)


class AdoptedUdpService(service.Service):
    """Like ``internet.UDPServer``, over an inherited bound UDP socket."""

    def __init__(self, reactor: Any, fd: int, protocol: Any, max_packet_size: int = 8192):
        self.reactor = reactor
        self.fd = fd
        self.protocol = protocol
        self.max_packet_size = max_packet_size
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptDatagramPort(
            self.fd, socket.AF_INET, self.protocol, self.max_packet_size
        )

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else None


def _prctl(option: int, arg: Any) -> bool:
    """``prctl(2)`` (Linux); False where there is none."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):
        return False
    return True


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """``sig`` to this process when its parent dies (Linux; elsewhere a no-op)."""
    if _prctl(1, int(sig)) and os.getppid() != parent_pid:  # PR_SET_PDEATHSIG
        os.kill(os.getpid(), sig)  # it died before prctl: nobody would signal us


def set_process_name(name: str) -> None:
    """The name ``top``, ``ps -o comm`` and ``pgrep`` show (Linux, at most 15 bytes; the
    command line stays the fork server's)."""
    _prctl(15, name.encode()[:15])  # PR_SET_NAME


def run(spec: WorkerSpec, parent_pid: int) -> int:
    """Run worker ``spec`` until it stops (forked by the fork server)."""
    die_with_parent(parent_pid)
    set_process_name(f"teltonika-w{spec.index}")

    from twisted.internet import reactor as _reactor
    from twisted.logger import ILogObserver, Logger, globalLogBeginner

    from teltonika_ingest import logsetup
    from teltonika_ingest.server.tap import IngestService

    reactor: Any = _reactor
    config = spec.config
    observer = logsetup.twistd_observer(
        config.log_format, config.log_level, {"logfile": spec.logfile or "-", "nodaemon": True}
    )
    system = f"worker-{spec.index}"

    @implementer(ILogObserver)
    def tagged(event: dict[str, Any]) -> None:
        # text lines read "[worker-1 namespace#level]", JSON ones carry "worker": 1
        if "log_system" not in event:
            level = event.get("log_level")
            name = getattr(level, "name", "-")
            event["log_system"] = f"{system} {event.get('log_namespace', '-')}#{name}"
        event["worker"] = spec.index
        observer(event)

    globalLogBeginner.beginLoggingTo([tagged], redirectStandardIO=False)
    svc = IngestService(
        config,
        reactor=reactor,
        adopted=AdoptedSockets(spec.listen_fd, spec.metrics_fd, spec.udp_fd),
        process_wide=True,  # a worker process of its own
    )
    app = service.MultiService()
    svc.setServiceParent(app)

    stopping = False

    def stop_once(signum: int, frame: Any) -> None:
        # the first SIGTERM/SIGINT drains; a second one (Ctrl-C reaches every process of
        # the group, then the supervisor forwards SIGTERM) must not stop a stopping reactor
        nonlocal stopping
        if stopping:
            return
        stopping = True
        Logger().info("received {name}, shutting down", name=signal.Signals(signum).name)
        reactor.callFromThread(reactor.stop)

    def start() -> None:
        # after reactor.run() installed Twisted's handlers, which stop the reactor each time
        signal.signal(signal.SIGTERM, stop_once)
        signal.signal(signal.SIGINT, stop_once)
        try:
            app.startService()
        except Exception:
            Logger().failure("worker {index} could not start", index=spec.index)
            svc.exit_code = 1
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", app.stopService)
    reactor.run()
    return svc.exit_code or 0
