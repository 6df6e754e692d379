"""Device authority: which IMEIs may connect (``--allow-list``, ``--allow-list-key``, ``--luhn``).

``DeviceAuthority.check(imei)`` answers the handshake (``protocol.Authority``):

1. ``--luhn``: an IMEI whose 15th digit is not its Luhn check digit is refused at once.
2. No allow list configured (neither file nor Redis key): every IMEI passes.
3. ``--allow-list`` file: an IMEI listed there is allowed without asking Redis.
4. ``--allow-list-key`` Redis set: ``SISMEMBER <key> <imei>``; 1 allows, 0 refuses.
   When Redis cannot answer (down, timeout, error reply) the IMEI is **refused**: the device
   is answered ``00``, closes, and retries later, when Redis is back. Failing open would let
   any IMEI in whenever Redis has trouble. IMEIs listed in the file are still allowed then
   (step 3 never asks Redis), so a file of critical devices keeps them connected through a
   Redis outage.

The two lists are a union: an IMEI in either is allowed.

The file holds one IMEI (15 decimal digits) per line; ``#`` starts a comment (whole line or
after the IMEI); blank lines are ignored; any other line is logged (warn, with its line number)
and skipped. It is read at start-up (a file that cannot be read then is fatal) and again by
``reload()``, which ``install_sighup`` wires to SIGHUP (``systemctl reload``). A reload that
cannot read the file keeps the current list and logs an error. Removing an IMEI does not close
a connection already open: the change applies from the device's next handshake.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, Final

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika_ingest.codec.imei import luhn_digit
from teltonika_ingest.redis.client import RedisClient
from teltonika_ingest.server.budget import MonotonicClock, RepeatLimiter, suppressed_note

__all__ = [
    "AllowListFile",
    "AuthorityMetrics",
    "DeviceAuthority",
    "ParsedAllowList",
    "build_authority",
    "install_sighup",
    "luhn_valid",
    "parse_allow_list",
]

log = Logger()

IMEI_DIGITS: Final = 15
RELOAD_RESULTS: Final = ("ok", "error")


# --------------------------------------------------------------------------- Luhn


def luhn_valid(imei: str) -> bool:
    """True if ``imei`` is 15 decimal digits whose last digit is the Luhn check digit of the
    first 14 (the IMEI check digit, 3GPP TS 23.003)."""
    if len(imei) != IMEI_DIGITS or not imei.isascii() or not imei.isdigit():
        return False
    return luhn_digit(imei[:-1]) == int(imei[-1])


# --------------------------------------------------------------------------- file parsing


@attrs.frozen
class ParsedAllowList:
    """The IMEIs of an allow-list file and the lines that were skipped."""

    imeis: frozenset[str]
    # (line number, line text, why it was skipped)
    invalid: tuple[tuple[int, str, str], ...] = ()
    # IMEI -> device model, from the optional second column (``--io-names``)
    models: Mapping[str, str] = attrs.field(factory=dict)


#: a device model in the allow-list file's second column: FMB920, TAT100, FMM13A ...
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


def _is_imei(text: str) -> bool:
    return len(text) == IMEI_DIGITS and text.isascii() and text.isdigit()


def parse_allow_list(text: str, *, luhn: bool = False) -> ParsedAllowList:
    """Parse allow-list text: one IMEI per line, optionally followed by the device model
    (``356307042441013 FMB920``, for ``--io-names``), ``#`` comments, blank lines ignored.

    With ``luhn``, an IMEI that fails the check digit is skipped too (such a device would be
    refused anyway, and the line is probably a typo worth reporting).
    """
    imeis: set[str] = set()
    models: dict[str, str] = {}
    invalid: list[tuple[int, str, str]] = []
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        entry, *rest = entry.split()
        model = rest[0] if len(rest) == 1 else ""
        if len(rest) > 1 or (model and not _MODEL.match(model)):
            invalid.append((number, raw.strip()[:80], "not an IMEI and an optional model"))
        elif not _is_imei(entry):
            invalid.append((number, raw.strip()[:80], "not an IMEI of 15 decimal digits"))
        elif luhn and not luhn_valid(entry):
            invalid.append((number, entry, "wrong Luhn check digit (--luhn)"))
        else:
            imeis.add(entry)
            if model:
                models[entry] = model
    return ParsedAllowList(frozenset(imeis), tuple(invalid), models)


class AllowListFile:
    """An allow-list file and the IMEIs last read from it."""

    def __init__(self, path: str, *, luhn: bool = False) -> None:
        self.path = path
        self.luhn = luhn
        self.imeis: frozenset[str] = frozenset()
        self.models: Mapping[str, str] = {}

    def read(self) -> ParsedAllowList:
        """Read and parse the file; raises ``OSError`` / ``UnicodeDecodeError`` if it can't."""
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        return parse_allow_list(text, luhn=self.luhn)

    def __contains__(self, imei: object) -> bool:
        return imei in self.imeis

    def __len__(self) -> int:
        return len(self.imeis)


# --------------------------------------------------------------------------- metrics


@attrs.frozen
class AuthorityMetrics:
    """Allow-list metrics (handshake rejections are in ``teltonika_handshakes_total``)."""

    size: Gauge
    reloads: Counter
    lookup_failures: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> AuthorityMetrics:
        """Register the allow-list metrics in ``registry`` (the service's own registry)."""
        size = Gauge(
            "teltonika_allow_list_size",
            "IMEIs in the --allow-list file as last loaded (the Redis set is not counted).",
            registry=registry,
        )
        reloads = Counter(
            "teltonika_allow_list_reloads_total",
            "Allow-list file loads (start-up and SIGHUP), by result (ok, error).",
            ["result"],
            registry=registry,
        )
        lookup_failures = Counter(
            "teltonika_allow_list_lookup_failures_total",
            "Handshakes refused because the Redis allow-list set could not be read.",
            registry=registry,
        )
        for result in RELOAD_RESULTS:
            reloads.labels(result=result)
        return cls(size=size, reloads=reloads, lookup_failures=lookup_failures)


# --------------------------------------------------------------------------- the authority


class DeviceAuthority:
    """Decides whether an IMEI may connect; see the module docstring for the rules.

    ``allow_list``: path of the allow-list file, or None. ``redis`` and ``redis_key``: the
    Redis set, or None. The file is read in the constructor: an unreadable file raises
    (``OSError`` / ``UnicodeDecodeError``), which makes start-up fail.
    """

    def __init__(
        self,
        *,
        allow_list: str | None = None,
        redis: RedisClient | None = None,
        redis_key: str | None = None,
        luhn: bool = False,
        metrics: AuthorityMetrics | None = None,
        lookup_timeout: float | None = None,
    ) -> None:
        if (redis is None) != (redis_key is None):
            raise ValueError("redis and redis_key go together")
        self.luhn = luhn
        self.redis = redis
        self.redis_key = redis_key
        self.metrics = metrics
        self.lookup_timeout = lookup_timeout
        self.file: AllowListFile | None = None
        # a device (or a UDP sender) retrying all the time: a few lines a minute per IMEI
        self._log_limit = RepeatLimiter(MonotonicClock())
        if allow_list is not None:
            self.file = AllowListFile(allow_list, luhn=luhn)
            self._load(self.file.read(), initial=True)

    @property
    def restricts(self) -> bool:
        """True if some IMEIs are refused (an allow list or the Luhn check is on)."""
        return self.luhn or self.file is not None or self.redis_key is not None

    # ------------------------------------------------------------------ checking

    def check(self, imei: str) -> bool | defer.Deferred[bool]:
        if self.luhn and not luhn_valid(imei):
            self._refused(imei, "wrong Luhn check digit", "luhn")
            return False
        if self.file is None and self.redis_key is None:
            return True
        if self.file is not None and imei in self.file:
            return True
        if self.redis is None or self.redis_key is None:
            self._refused(imei, "not on the allow list", "not_listed")
            return False
        d = self.redis.execute("SISMEMBER", self.redis_key, imei, timeout=self.lookup_timeout)
        d.addCallbacks(self._member, self._lookup_failed, callbackArgs=(imei,), errbackArgs=(imei,))
        return d

    def _member(self, reply: Any, imei: str) -> bool:
        if reply == 1 or reply == "1":
            return True
        self._refused(imei, "not on the allow list", "not_listed")
        return False

    def _lookup_failed(self, failure: Failure, imei: str) -> bool:
        if self.metrics is not None:
            self.metrics.lookup_failures.inc()
        logged, suppressed = self._log_limit.allow(imei)
        if logged:
            log.warn(
                "refusing {imei}: the Redis allow list {key} could not be read ({error}); "
                "the device will retry{suppressed_note}",
                imei=imei,
                key=self.redis_key,
                error=failure.getErrorMessage() or repr(failure.value),
                reason="allow_list_unavailable",
                suppressed=suppressed,
                suppressed_note=suppressed_note(suppressed),
            )
        return False

    def _refused(self, imei: str, why: str, reason: str) -> None:
        logged, suppressed = self._log_limit.allow(imei)
        if logged:
            log.info(
                "refusing {imei}: {why}{suppressed_note}",
                imei=imei,
                why=why,
                reason=reason,
                suppressed=suppressed,
                suppressed_note=suppressed_note(suppressed),
            )

    # ------------------------------------------------------------------ (re)loading

    def _load(self, parsed: ParsedAllowList, *, initial: bool) -> None:
        assert self.file is not None
        path = self.file.path
        for number, line, why in parsed.invalid:
            log.warn(
                "allow list {path} line {line_number}: {why}, skipped: {line!r}",
                path=path,
                line_number=number,
                why=why,
                line=line,
            )
        old = self.file.imeis
        self.file.imeis = parsed.imeis
        self.file.models = parsed.models
        if self.metrics is not None:
            self.metrics.size.set(len(parsed.imeis))
            self.metrics.reloads.labels(result="ok").inc()
        if initial:
            log.info(
                "allow list {path}: {count} IMEIs ({invalid} invalid lines skipped)",
                path=path,
                count=len(parsed.imeis),
                invalid=len(parsed.invalid),
            )
        else:
            log.info(
                "allow list {path} reloaded: {count} IMEIs, {added} added, {removed} removed "
                "({invalid} invalid lines skipped)",
                path=path,
                count=len(parsed.imeis),
                added=len(parsed.imeis - old),
                removed=len(old - parsed.imeis),
                invalid=len(parsed.invalid),
            )
        if not parsed.imeis and self.redis_key is None:
            log.warn("allow list {path} is empty: every device will be refused", path=path)

    def reload(self) -> bool:
        """Read the allow-list file again. On failure keep the current list, log an error and
        return False. Without a file there is nothing to reload (returns True)."""
        if self.file is None:
            log.info("reload requested: no --allow-list file configured, nothing to reload")
            return True
        try:
            parsed = self.file.read()
        except (OSError, UnicodeDecodeError) as e:
            if self.metrics is not None:
                self.metrics.reloads.labels(result="error").inc()
            log.error(
                "allow list {path} could not be reloaded ({error}); keeping the current "
                "{count} IMEIs",
                path=self.file.path,
                error=str(e),
                count=len(self.file),
            )
            return False
        self._load(parsed, initial=False)
        return True

    def install_sighup(self, reactor: Any) -> Callable[[], None]:
        """Reload on SIGHUP (see :func:`install_sighup`); returns the uninstaller."""
        return install_sighup(reactor, self.reload)


# --------------------------------------------------------------------------- SIGHUP

_SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class _SighupHandler:
    """The one SIGHUP handler of the process: runs every registered reload in its reactor,
    then the handler that was installed before it (if that is a Python callable)."""

    def __init__(self) -> None:
        self.reloads: list[tuple[Any, Callable[[], None]]] = []
        self.previous: _SignalHandler = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        for reactor, reload in list(self.reloads):
            reactor.callFromThread(reload)
        if callable(self.previous):
            self.previous(signum, frame)


_sighup = _SighupHandler()


def install_sighup(reactor: Any, reload: Callable[[], object]) -> Callable[[], None]:
    """Call ``reload()`` in the reactor thread on every SIGHUP; chain to the previous handler.

    The signal handler only schedules the reload (``reactor.callFromThread``: safe in a signal
    handler, and it wakes the reactor), then calls the handler that was installed before, if
    that one is a Python callable (``SIG_DFL``, which would terminate the process, and
    ``SIG_IGN`` are not called). Several installs (several services in one process, as in
    tests) share one handler. Returns the function that removes this reload; removing the
    last one puts the previous handler back. Python only lets the main thread set signal
    handlers: from another thread this logs a warning and installs nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        log.warn("not in the main thread: SIGHUP will not reload")
        return lambda: None

    def reload_logged() -> None:
        log.info("SIGHUP received: reloading")
        try:
            reload()
        except Exception:
            log.failure("reload on SIGHUP failed")

    entry = (reactor, reload_logged)
    if not _sighup.reloads:
        _sighup.previous = signal.getsignal(signal.SIGHUP)
        signal.signal(signal.SIGHUP, _sighup)
    _sighup.reloads.append(entry)

    def uninstall() -> None:
        if entry not in _sighup.reloads:
            return
        _sighup.reloads.remove(entry)
        previous = _sighup.previous
        current: object = signal.getsignal(signal.SIGHUP)
        if not _sighup.reloads and current is _sighup:
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)

    return uninstall


# --------------------------------------------------------------------------- wiring helper


def build_authority(
    config: Any, redis: RedisClient, registry: CollectorRegistry
) -> DeviceAuthority | None:
    """The authority for a ``Config`` (fields ``allow_list``, ``allow_list_key``, ``luhn``),
    or None when nothing restricts devices. Registers the allow-list metrics in ``registry``.
    Raises ``OSError`` / ``UnicodeDecodeError`` if the allow-list file cannot be read."""
    if not (config.allow_list or config.allow_list_key or config.luhn):
        return None
    return DeviceAuthority(
        allow_list=config.allow_list,
        redis=redis if config.allow_list_key else None,
        redis_key=config.allow_list_key,
        luhn=config.luhn,
        metrics=AuthorityMetrics.create(registry),
    )
