"""Logging discipline: ``--log-format`` (text | json), ``--log-level``, unhandled-error counting.

How it plugs into twistd
------------------------
``twistd`` runs the plugin's ``makeService`` *before* it starts logging:
``ApplicationRunner.run`` calls ``createOrGetApplication`` (``makeService``, then
``service.setServiceParent(application)``), and only then ``AppLogger.start(application)``,
which takes its observer from, in order: ``twistd --logger=FQN``; the application's
``twisted.logger.ILogObserver`` component; its own default (``--logfile`` / ``--syslog`` /
stdout with ``-n``, classic text). The component is the documented way for an application to
choose its log observer, so the service offers one when it is given its parent
(:func:`offer_to_application` from ``setServiceParent``), built by :func:`twistd_observer`
from our options and twistd's own (``options.parent``): same destination rules as twistd
(``--logfile`` with SIGUSR1 reopen, ``--syslog``, stdout with ``-n``), our format, our level.
Nothing is replaced after the fact and no private Twisted state is touched; events logged
before logging starts (``makeService``, config) are buffered by Twisted and replayed through
our observer. An explicit ``twistd --logger=...`` still wins.

JSON lines
----------
One compact object per line: ``time`` (ISO 8601 UTC, ms, ``Z``), ``level``, ``namespace``,
``message`` (the formatted text), every structured field of the event (``imei``, ``peer``,
``codec``, ``records``, ``reason``, ``error``, ...; addresses as ``host:port``, other values
that are not JSON become strings), and for an event carrying a failure ``error`` (``Type:
message``) and ``traceback``. Field names are the event's own: a field named like a key above
is written as ``field_<name>`` (``error`` and ``traceback`` only when a failure sets them). Events
of Twisted's legacy ``log.msg`` have namespace ``twisted``.

Twisted's own chatter
---------------------
:func:`demote_noise` turns Twisted's routine lines into debug events: "Starting factory",
"Stopping factory", "X starting on PORT", "(TCP Port N Closed)", ClientService's "Scheduling
retry N to connect ...", txredisapi's "Redis error: ..." per failed AUTH. They say nothing an
operator acts on, or say it once per retry: the service logs its own "listening on" lines and
reports Redis trouble itself, rate-limited (``RedisClient.trouble``).

Unhandled errors
----------------
:class:`UnhandledErrorCounter` counts events at level critical that carry a failure: a
Deferred garbage-collected with an unhandled failure (``twisted.internet.defer`` logs
"Unhandled error in Deferred:" and then the failure; only the second carries it, so each
such Deferred counts once), ``log.failure(...)`` at its default level (critical), legacy
``twisted.python.log.err(...)``, exceptions in ``callLater`` functions and in the reactor.
It is added to the global log publisher for the life of the service
(:func:`count_unhandled_errors`), independently of where logs go, so the metric moves in
tests and under twistd alike.
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import FrameType
from typing import IO, Any, Final, cast

from prometheus_client import Counter
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.components import Componentized
from zope.interface import implementer

__all__ = [
    "LEVELS",
    "UnhandledErrorCounter",
    "count_unhandled_errors",
    "event_as_json",
    "json_lines_observer",
    "level_predicate",
    "observer_for",
    "offer_to_application",
    "twistd_observer",
]

LEVELS: Final[Mapping[str, LogLevel]] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

FORMATS: Final = ("text", "json")

# Keys of legacy (twisted.python.log) events that are bookkeeping, not structured fields.
_LEGACY_KEYS: Final = frozenset(
    {"message", "format", "isError", "failure", "why", "time", "system", "printed"}
)
_CORE_KEYS: Final = frozenset({"time", "level", "namespace", "message"})
_FAILURE_KEYS: Final = frozenset({"error", "traceback"})
_MAX_DEPTH: Final = 4
LEGACY_NAMESPACE: Final = "twisted"

# Twisted's routine lines, demoted to debug (see the module doc).
_NOISE: Final = re.compile(
    r"Starting factory .*|Stopping factory .*|.+ starting on \S+|\(\w+ Port \S+ Closed\)"
    # txredisapi's line per failed AUTH/SELECT: RedisClient reports it, rate-limited
    r"|Redis error: .*"
)
_NOISY_NAMESPACES: Final = frozenset({"twisted.application._client_service.ClientService"})


# --------------------------------------------------------------------------- level filter


def level_predicate(level: str) -> LogLevelFilterPredicate:
    """Drops events below ``level`` (debug, info, warn/warning, error, critical)."""
    try:
        threshold = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r} (expected debug, info, warn, error or critical)"
        ) from None
    return LogLevelFilterPredicate(defaultLogLevel=threshold)


# --------------------------------------------------------------------------- JSON lines


def format_address(address: Any) -> str | None:
    """``host:port`` (``[v6]:port``) of a Twisted IPv4/IPv6 address, else None."""
    from twisted.internet.address import IPv4Address, IPv6Address

    if isinstance(address, IPv4Address | IPv6Address):
        host = address.host
        return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
    return None


def _jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as something ``json.dumps`` encodes without error (strings otherwise)."""
    if value is None or isinstance(value, bool | str):
        return value
    address = format_address(value)
    if address is not None:
        return address
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [_jsonable(v, depth + 1) for v in value]
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _iso_time(seconds: float | None) -> str:
    if seconds is None:
        seconds = datetime.now(UTC).timestamp()
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _failure_of(event: LogEvent) -> Any:
    """The failure an event carries: ``log.failure`` (new) or ``log.err`` (legacy), else None."""
    failure = event.get("log_failure")
    if failure is None and event.get("isError"):
        failure = event.get("failure")
    return failure


def _is_legacy(event: LogEvent) -> bool:
    # twisted.python.log events always carry "message" (a tuple) and "isError"
    return "isError" in event and isinstance(event.get("message"), tuple)


def event_as_json(event: LogEvent) -> str:
    """One log event as one line of compact JSON (with the trailing newline)."""
    level = event.get("log_level")
    legacy = _is_legacy(event)
    namespace = event.get("log_namespace") or "-"
    if legacy and namespace == "log_legacy":
        namespace = LEGACY_NAMESPACE
    record: dict[str, Any] = {
        "time": _iso_time(event.get("log_time")),
        "level": getattr(level, "name", None) or "info",
        "namespace": namespace,
        "message": formatEvent(event),
    }
    failure = _failure_of(event)
    if failure is not None:
        try:
            record["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            record["traceback"] = failure.getTraceback()
        except Exception:  # a broken failure must not break logging
            record["error"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY_KEYS):
            continue
        clash = key in _CORE_KEYS or (key in _FAILURE_KEYS and failure is not None)
        record["field_" + key if clash else key] = _jsonable(value)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"


def json_lines_observer(out: IO[str]) -> FileLogObserver:
    """Writes every event to ``out`` as one JSON object per line (see :func:`event_as_json`)."""
    return FileLogObserver(out, event_as_json)


def observer_for(log_format: str, log_level: str, out: IO[str]) -> ILogObserver:
    """Format ``log_format`` (text | json) to ``out``, dropping events below ``log_level``."""
    if log_format == "json":
        inner = json_lines_observer(out)
    elif log_format == "text":
        inner = textFileLogObserver(out)
    else:
        raise ValueError(f"unknown log format {log_format!r} (expected text or json)")
    return _filtered(inner, log_level)


def is_noise(event: LogEvent) -> bool:
    """Twisted's routine chatter (see the module doc), at info level."""
    if event.get("log_level") is not LogLevel.info:
        return False
    if event.get("log_namespace") in _NOISY_NAMESPACES:
        return True
    if event.get("isError") or not (_is_legacy(event) or _is_twisted(event)):
        return False
    return bool(_NOISE.fullmatch(formatEvent(event)))


def _is_twisted(event: LogEvent) -> bool:
    """A new-style event of Twisted's own (``Factory.doStart`` logs "Starting factory" in
    the namespace of the factory's class, e.g. ``twisted.internet.protocol.Factory``)."""
    return str(event.get("log_namespace", "")).startswith("twisted.")


@implementer(ILogObserver)
class demote_noise:  # used like a function
    """Wraps ``observer``: Twisted's routine info events reach it at level debug."""

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        if is_noise(event):
            event = dict(event, log_level=LogLevel.debug)
        self.observer(event)


def _filtered(observer: ILogObserver, log_level: str) -> ILogObserver:
    return demote_noise(FilteringLogObserver(observer, [level_predicate(log_level)]))


# --------------------------------------------------------------------------- twistd


def _twistd_log_file(twistd_options: Mapping[str, Any]) -> IO[str]:
    """Where twistd itself would write (``UnixAppLogger._getLogObserver``'s rules)."""
    logfile = twistd_options.get("logfile") or ""
    nodaemon = bool(twistd_options.get("nodaemon"))
    if logfile == "-" or (nodaemon and not logfile):
        return sys.stdout
    from twisted.python.logfile import LogFile

    log_file = LogFile.fromFullPath(logfile or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):  # as twistd: SIGUSR1 reopens (rotates) the file

        def rotate(signum: int, frame: FrameType | None) -> None:
            from twisted.internet import reactor

            cast(Any, reactor).callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return cast(IO[str], log_file)


def twistd_observer(
    log_format: str, log_level: str, twistd_options: Mapping[str, Any] | None
) -> ILogObserver:
    """The observer twistd should log through: twistd's destination (``--logfile``,
    ``--syslog``, stdout with ``-n``; stdout when not under twistd), our format and level.

    ``twistd_options``: twistd's ``ServerOptions`` (``options.parent`` in ``makeService``).
    With ``--syslog`` the format is syslog's own text (syslog frames every line itself).
    """
    options: Mapping[str, Any] = (
        twistd_options if twistd_options is not None else {"nodaemon": True}
    )
    if options.get("syslog"):
        from twisted.python import syslog

        emit = syslog.SyslogObserver(options.get("prefix") or "twisted").emit
        return _filtered(LegacyLogObserverWrapper(cast(Any, emit)), log_level)
    return observer_for(log_format, log_level, _twistd_log_file(options))


def offer_to_application(parent: object, observer: ILogObserver) -> bool:
    """Make ``observer`` the log observer of a twistd ``Application`` that has none yet.

    Call it from the service's ``setServiceParent``: twistd reads the application's
    ``ILogObserver`` component when it starts logging, right after ``makeService``. Returns
    False (and does nothing) if ``parent`` is not a component holder or already has one.
    """
    if not isinstance(parent, Componentized):
        return False
    if parent.getComponent(ILogObserver, None) is not None:
        return False
    parent.setComponent(ILogObserver, observer)
    return True


# --------------------------------------------------------------------------- unhandled errors


@implementer(ILogObserver)
class UnhandledErrorCounter:
    """Counts critical events carrying a failure (unhandled errors, see the module doc)."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") is LogLevel.critical and _failure_of(event) is not None:
            self.counter.inc()


def count_unhandled_errors(
    counter: Counter, publisher: LogPublisher | None = None
) -> Callable[[], None]:
    """Start counting unhandled errors in ``counter``; returns the function that stops it."""
    target = globalLogPublisher if publisher is None else publisher
    observer = UnhandledErrorCounter(counter)
    target.addObserver(observer)
    return lambda: target.removeObserver(observer)
