"""The fork server of ``--workers N``: ``python -m teltonika_ingest.server.forkserver``.

Started only by the supervisor (``server/workers.py``), never by hand. Why it exists: each
worker is a whole Python process, and most of what one holds before its first connection
(~45 MiB of interpreter heap: the code and module objects of Twisted, txredisapi,
prometheus_client, cryptography and this package) is the same in every worker. This process
imports all of it once, *without a reactor* (a reactor's epoll descriptor and threads do not
survive ``fork()``), moves it out of the collector's reach (``gc.freeze()``, so collections
in the workers do not write to those pages), and then forks each worker on the supervisor's
request. The workers share those pages copy-on-write: BENCHMARKS.md "Connected devices" has
what that saved at 100,000 devices.

The supervisor talks to it over two pipes:

* standard input (supervisor -> here): length-prefixed pickled
  :class:`~teltonika_ingest.server.worker.WorkerSpec` (one per worker to start);
* descriptor :data:`REPORT_FD` (here -> supervisor), one line per event:
  ``started INDEX PID`` and ``exited INDEX PID CODE SIGNAL`` (``-`` when not applicable).

It inherits every worker's sockets (worker *i*: listening socket at ``SOCKETS_BASE + 3i``,
its metrics socket at ``+1``, its UDP socket at ``+2`` when there is one) so it can start a
worker again on the same sockets after one died. A forked worker moves its three to
descriptors 3, 4, 5, closes the rest and runs exactly what ``server/worker.py`` runs.

It ignores SIGTERM and SIGINT (those are for the workers: systemd signals every process of
the unit, a terminal the whole process group) and exits when its standard input closes and no
worker is left; the kernel kills it if the supervisor dies, and each worker gets SIGTERM
(and drains) when the fork server dies.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import selectors
import signal
import struct
import sys
from typing import Any

#: the descriptor the fork server writes its reports on
REPORT_FD = 6
#: worker i's sockets are inherited at SOCKETS_BASE + 3i (+0 listen, +1 metrics, +2 UDP)
SOCKETS_BASE = 10
_LENGTH = struct.Struct("!I")


#: where a forked worker finds its listening, metrics and UDP sockets
WORKER_FDS = (3, 4, 5)


def _hold(fds: tuple[int, ...]) -> None:
    """Point ``fds`` at /dev/null, so that nothing opened later is given one of them."""
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in fds:
        if fd != null:
            os.dup2(null, fd)
    if null not in fds:
        os.close(null)


def socket_fds(index: int) -> tuple[int, int, int]:
    base = SOCKETS_BASE + 3 * index
    return base, base + 1, base + 2


def encode_request(spec: Any) -> bytes:
    body = pickle.dumps(spec)
    return _LENGTH.pack(len(body)) + body


#: what the fork server imports before it forks: everything heavy a worker runs (~44 of the
#: ~45 MiB a worker's imports take) but txredisapi and the modules that import it, because
#: txredisapi installs the reactor when imported (so does prometheus_client.twisted, which
#: ``ops/http.py`` therefore imports late); a worker imports those few itself
PRELOAD = (
    "hiredis",
    "prometheus_client",
    "prometheus_client.parser",
    "twisted.application.internet",
    "twisted.internet.endpoints",
    "twisted.internet.epollreactor",
    "twisted.internet.tcp",
    "twisted.internet.udp",
    "twisted.logger",
    "twisted.web.client",
    "twisted.web.server",
    "teltonika_ingest.codec",
    "teltonika_ingest.config",
    "teltonika_ingest.logsetup",
    "teltonika_ingest.ops.http",
    "teltonika_ingest.ops.loophealth",
    "teltonika_ingest.ops.sdnotify",
    "teltonika_ingest.ops.startup",
    "teltonika_ingest.redis.embedded",
    "teltonika_ingest.redis.resp",
    "teltonika_ingest.server.budget",
    "teltonika_ingest.server.memory",
    "teltonika_ingest.server.metrics",
    "teltonika_ingest.server.protocol",
    "teltonika_ingest.server.session",
    "teltonika_ingest.server.worker",
)


def preload() -> None:
    """Import :data:`PRELOAD` and the endpoint plugins, without installing a reactor: a
    reactor's epoll descriptor and waker pipe would be shared by every forked worker."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    list(getPlugins(IStreamServerEndpointStringParser))  # --listen's parsers (plugins)
    if "twisted.internet.reactor" in sys.modules:
        raise RuntimeError("a reactor was installed while preloading the worker modules")


class ForkServer:
    def __init__(self, requests: int = 0, reports: int = REPORT_FD) -> None:
        self.requests = requests
        self.reports = reports
        self.buffer = b""
        self.children: dict[int, tuple[int, int]] = {}  # pidfd -> (index, pid)
        self.selector = selectors.DefaultSelector()
        self.selector.register(requests, selectors.EVENT_READ, None)
        self.open = True

    def report(self, *fields: object) -> None:
        line = " ".join(str(f) for f in fields) + "\n"
        with contextlib.suppress(OSError):  # the supervisor is gone: PDEATHSIG follows
            os.write(self.reports, line.encode())

    def run(self) -> int:
        while self.open or self.children:
            for key, _ in self.selector.select():
                if key.data is None:
                    self._read_requests()
                else:
                    self._reap(key.fd, *key.data)
        return 0

    def _read_requests(self) -> None:
        data = os.read(self.requests, 65536)
        if not data:
            self.selector.unregister(self.requests)
            self.open = False
            return
        self.buffer += data
        while len(self.buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < _LENGTH.size + size:
                break
            body = self.buffer[_LENGTH.size : _LENGTH.size + size]
            self.buffer = self.buffer[_LENGTH.size + size :]
            self._start(pickle.loads(body))

    def _start(self, spec: Any) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                self.selector.close()  # this process's epoll and pidfds are not the worker's
                for pidfd in self.children:
                    os.close(pidfd)
                code = _become_worker(spec)
            finally:
                os._exit(code)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (spec.index, pid)
        self.selector.register(pidfd, selectors.EVENT_READ, (spec.index, pid))
        self.report("started", spec.index, pid)

    def _reap(self, pidfd: int, index: int, pid: int) -> None:
        self.selector.unregister(pidfd)
        os.close(pidfd)
        del self.children[pidfd]
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code >= 0:
            self.report("exited", index, pid, code, "-")
        else:
            self.report("exited", index, pid, "-", -code)


def _become_worker(spec: Any) -> int:
    """In the forked child: take this worker's sockets, drop everything else, run it."""
    listen, metrics, udp = socket_fds(spec.index)
    os.dup2(listen, spec.listen_fd)
    os.dup2(metrics, spec.metrics_fd)
    if spec.udp_fd is not None:
        os.dup2(udp, spec.udp_fd)
    keep = max(spec.listen_fd, spec.metrics_fd, spec.udp_fd or 0) + 1
    os.closerange(keep, os.sysconf("SC_OPEN_MAX"))  # the other workers' sockets, the pipes
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # so Twisted takes it
    from teltonika_ingest.server import worker

    return worker.run(spec, parent_pid=os.getppid())


def main() -> int:
    from teltonika_ingest.server.worker import die_with_parent

    # SIGTERM and Ctrl-C are for the workers (systemd signals the whole unit, a terminal the
    # whole process group): this process stays until the supervisor has heard every worker
    # end and closes our standard input; if the supervisor dies, the kernel kills us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid(), signal.SIGKILL)
    # hold the worker's descriptor numbers (3, 4, 5) so nothing opened from here on gets one:
    # a forked worker puts its sockets there
    _hold(WORKER_FDS)
    from teltonika_ingest.server.worker import set_process_name

    set_process_name("teltonika-fork")
    preload()
    gc.collect()
    gc.freeze()  # the workers' collections never touch (and so never copy) these pages
    return ForkServer().run()


if __name__ == "__main__":
    sys.exit(main())
