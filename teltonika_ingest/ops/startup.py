"""Start-up failures as one line: what failed, why, and what to do; then exit status 1.

Shared by both services (the ingest, ``server/``, and the processor, ``processor/``).
OPERATIONS.md ("What is fatal", for each service) promises one line, not a traceback, for
every start-up problem an operator can cause: a bad option, a port in use, no
``redis-server`` / PostgreSQL for the embedded default, an unreadable file, a bad TLS key.
The explanations that only one service needs live with it (``server/endpoints.py``,
``processor/startup.py``); :func:`cannot_listen` is common.

Where each is caught (twistd's order: parse options, ``makeService``, start logging,
``privilegedStartService``, run the reactor, ``startService``):

* options: :func:`option_error` writes the line to stderr (logging has not started; the
  format is taken from ``--log-format`` / ``TELTONIKA_LOG_FORMAT`` when they say ``json``);
* ``makeService``: the service is built inside :func:`building`, which turns a
  :class:`StartupError` into one event sent straight to the service's own log observer (twistd
  has not started logging yet, and never will: we exit);
* binding the ports (``privilegedStartService``) and starting the embedded servers
  (``startService``): :func:`fatal` logs the event through ``twisted.logger``.

Each JSON event has the fields ``what``, ``why`` and ``fix``; text lines read
``start-up failed: WHAT: WHY; FIX``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import IO, Any, NoReturn

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger, LogLevel

from teltonika_ingest import logsetup

__all__ = [
    "NAMESPACE",
    "BindsFirst",
    "StartupError",
    "building",
    "cannot_listen",
    "fatal",
    "option_error",
]

NAMESPACE = "teltonika_ingest.startup"
FORMAT = "start-up failed: {what}: {why}; {fix}"

log = Logger(namespace=NAMESPACE)


class StartupError(Exception):
    """A start-up problem the operator can fix: ``what`` failed, ``why``, and the ``fix``."""

    def __init__(self, what: str, why: str, fix: str) -> None:
        super().__init__(f"{what}: {why}; {fix}")
        self.what = what
        self.why = " ".join(why.split())  # one line, whatever the cause's text held
        self.fix = fix

    def fields(self) -> dict[str, str]:
        return {"what": self.what, "why": self.why, "fix": self.fix}


# --------------------------------------------------------------------------- explanations


def cannot_listen(exc: CannotListenError, what: str, option: str) -> StartupError:
    interface = exc.interface or "0.0.0.0"
    cause = exc.socketError
    why = getattr(cause, "strerror", None) or str(cause)
    port = exc.port
    return StartupError(
        f"cannot listen on {interface}:{port} for the {what}",
        why,
        f"another process holds the port (ss -ltnp 'sport = :{port}' shows which): stop it "
        f"or choose another port with {option}",
    )


# --------------------------------------------------------------------------- the service side


class BindsFirst(service.MultiService):
    """A service tree whose listeners (children named in :attr:`listeners`) bind in
    ``privilegedStartService``, before the reactor runs and before anything else starts: a
    port that cannot be bound is one line and exit 1 (a traceback otherwise).

    ``makeService`` (twistd) sets :attr:`exit_on_startup_failure`; without it (a service
    built in-process, the tests) :meth:`startup_failed` raises the ``StartupError``."""

    #: child service name -> (what it is, the option that sets its endpoint)
    listeners: Mapping[str, tuple[str, str]] = {}
    exit_on_startup_failure = False

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        for child in self:
            try:
                child.privilegedStartService()
            except CannotListenError as e:
                what, option = self.listeners.get(child.name or "", ("listener", "its option"))
                self.startup_failed(cannot_listen(e, what, option))

    def startup_failed(self, failure: StartupError, *, in_reactor: bool = False) -> None:
        if not self.exit_on_startup_failure:
            raise failure
        # in the reactor (startService runs in a start-up trigger, which would log and
        # swallow the exception) nothing else has started yet: leave at once
        fatal(failure, exit_now=os._exit if in_reactor else None)


# --------------------------------------------------------------------------- reporting


def _event(failure: StartupError) -> dict[str, Any]:
    return {
        "log_level": LogLevel.critical,
        "log_namespace": NAMESPACE,
        "log_format": FORMAT,
        "log_time": time.time(),
        "log_source": None,
        **failure.fields(),
    }


@contextmanager
def building(observer: ILogObserver) -> Iterator[None]:
    """Around ``makeService``'s work: a :class:`StartupError` becomes one event on
    ``observer`` (the service's own, in the configured format) and exit status 1."""
    try:
        yield
    except StartupError as failure:
        observer(_event(failure))
        _flush()
        raise SystemExit(1) from None


def fatal(failure: StartupError, *, exit_now: Callable[[int], Any] | None = None) -> NoReturn:
    """Log ``failure`` through ``twisted.logger`` (logging has started) and exit 1.

    Outside the reactor (``privilegedStartService``) that is ``SystemExit(1)``, which twistd
    lets through; inside it (``startService`` runs in a reactor start-up trigger, which would
    log and swallow an exception) pass ``exit_now=os._exit``.
    """
    log.critical(FORMAT, **failure.fields())
    _flush()
    if exit_now is not None:
        exit_now(1)
    raise SystemExit(1)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()


def _wants_json(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    fmt = environ.get("TELTONIKA_LOG_FORMAT", "")
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            fmt = argv[i + 1]
        elif arg.startswith("--log-format="):
            fmt = arg.split("=", 1)[1]
    return fmt.strip().lower() == "json"


def option_error(
    problem: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    out: IO[str] | None = None,
    *,
    prog: str = "twistd teltonika-ingest",
) -> NoReturn:
    """A bad option: one line on stderr ending with "see --help" (not the whole help), exit 1."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    out = sys.stderr if out is None else out
    problem = " ".join(problem.split())
    hint = f"see {prog} --help"
    if _wants_json(argv, environ):
        failure = StartupError("options", problem, hint)
        out.write(logsetup.event_as_json(_event(failure)))
    else:
        out.write(f"{prog}: {problem} ({hint})\n")
    out.flush()
    raise SystemExit(1)
