"""One worker process of ``--workers N``: ``python -m teltonika_ingest.server.worker``.

Started only by the supervisor (``server/workers.py``), never by hand. It reads its
:class:`WorkerSpec` (pickled) from standard input, adopts the listening sockets the
supervisor opened and passed as inherited file descriptors, and runs the ordinary
:class:`~teltonika_ingest.server.tap.IngestService` with its own instance id. SIGTERM drains
it exactly as a single-process service (contract.md §7). It asks the kernel for SIGTERM when
the supervisor dies (``PR_SET_PDEATHSIG``), so no worker outlives its supervisor.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
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
    supervisor_pid: int
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


def _die_with_parent(supervisor_pid: int) -> None:
    """SIGTERM to this process when the supervisor dies (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor_pid:  # it died before prctl: nobody would signal us
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    spec: WorkerSpec = pickle.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    _die_with_parent(spec.supervisor_pid)

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

    def start() -> None:
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


if __name__ == "__main__":
    sys.exit(main())
