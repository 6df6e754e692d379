"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``): READY, WATCHDOG, STOPPING, STATUS.

The protocol is one datagram per message on the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a
path, or ``@name`` for the abstract namespace), newline-separated ``KEY=value`` lines
(sd_notify(3)). It is small enough to write here (about twenty lines, no dependency) rather
than take ``systemd-python`` (needs libsystemd headers to build) or the unmaintained
``sdnotify`` package; the tests talk to a real datagram socket.

:class:`SystemdNotifier` (an ``IService``, started by the service when ``NOTIFY_SOCKET`` is
set) sends

* ``READY=1`` once ``ready_check`` says ready (device listener up and Redis took a write),
  checked every ``poll_interval`` until then;
* ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` from a reactor timer, so a wedged reactor
  stops the pings and systemd restarts the service (``WatchdogSec=`` in the unit);
* ``STATUS=...`` (devices connected, records/s, Redis) every ``status_interval``;
* ``STOPPING=1`` when shutdown begins (:meth:`stopping`).

``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are removed from the environment
once read (as ``sd_notify(unset_environment=1)`` does), so child processes (the embedded
``redis-server``) do not talk to systemd on our behalf.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, MutableMapping
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["SystemdNotifier", "notify_address", "watchdog_interval"]

log = Logger()

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notify_address(value: str) -> str | bytes | None:
    """The socket address ``NOTIFY_SOCKET`` names (``@x`` is abstract: ``\\0x``), or None."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock: and relative paths are not for us


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None when systemd
    asked for no watchdog or for another process's."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return max(0.01, int(usec) / 2e6)


class SystemdNotifier(Service):
    """Sends the service's state to systemd (see the module docstring)."""

    name = "sd-notify"

    def __init__(
        self,
        address: str | bytes,
        *,
        clock: Any,
        ready_check: Callable[[], defer.Deferred[str | None]],
        status: Callable[[float], str],
        watchdog: float | None,
        poll_interval: float = 0.2,
        status_interval: float = 5.0,
    ) -> None:
        self.address = address
        self.clock = clock
        self.ready_check = ready_check
        self.status = status
        self.watchdog = watchdog
        self.poll_interval = poll_interval
        self.status_interval = status_interval
        self.ready = False
        self.sent = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._failing = False
        self._loops: list[LoopingCall] = []
        self._last_status_at: float | None = None
        self._last_reason: str | None = None

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, **kwargs: Any
    ) -> SystemdNotifier | None:
        """A notifier when ``NOTIFY_SOCKET`` is set (and removes the variables), else None."""
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        address = notify_address(value) if value else None
        watchdog = watchdog_interval(env, os.getpid())
        for key in _ENV_KEYS:
            env.pop(key, None)
        if address is None:
            if value:
                log.warn("NOTIFY_SOCKET={value}: not a unix socket path; ignored", value=value)
            return None
        return cls(address, watchdog=watchdog, **kwargs)

    # ------------------------------------------------------------------ sending

    def send(self, *lines: str) -> bool:
        """One datagram; never blocks or raises (a failure is logged once per outage)."""
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            if not self._failing:
                self._failing = True
                log.warn("cannot notify systemd ({error}); continuing", error=e.strerror or e)
            return False
        self._failing = False
        self.sent += 1
        return True

    def stopping(self) -> None:
        """Shutdown begins: STOPPING=1 (systemd then waits for the exit, not for READY)."""
        self.send("STOPPING=1", "STATUS=shutting down")

    # ------------------------------------------------------------------ loops

    def startService(self) -> None:
        super().startService()
        self._loop(self._check_ready, self.poll_interval)
        if self.watchdog is not None:
            self._loop(self._ping, self.watchdog)
            log.info("systemd watchdog: pinging every {interval:g} s", interval=self.watchdog)

    def _loop(self, function: Callable[[], object], interval: float) -> None:
        loop = LoopingCall(function)
        loop.clock = self.clock
        loop.start(interval, now=True).addErrback(
            lambda f: log.failure("systemd notify loop stopped", failure=f)
        )
        self._loops.append(loop)

    def _ping(self) -> None:
        self.send("WATCHDOG=1")

    def _check_ready(self) -> defer.Deferred[None] | None:
        now = self.clock.seconds()
        if self.ready:
            if self._last_status_at is None or now - self._last_status_at >= self.status_interval:
                elapsed = now - (self._last_status_at or now)
                self._last_status_at = now
                self.send("STATUS=" + self.status(elapsed))
            return None
        return self.ready_check().addCallback(self._answered)

    def _answered(self, reason: str | None) -> None:
        if not self.running or self.ready:
            return
        if reason is None:
            self.ready = True
            self._last_status_at = self.clock.seconds()
            self.send("READY=1", "STATUS=" + self.status(0.0))
            log.info("told systemd: ready")
        elif reason != self._last_reason:
            self._last_reason = reason
            self.send("STATUS=starting: " + reason)

    def stopService(self) -> None:
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        self._sock.close()
