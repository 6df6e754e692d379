"""``LiveService``: the live feed as one child service of the processor.

Children, in start order: the reader's own Redis client, the broadcast reader; the listener
(page at ``/``, feed at ``/ws``) is opened after them and closed first. Stop: stop accepting,
close every client with 1001 (going away), drop those that have not closed within
``close_timeout``, then stop the reader and its Redis connection.

The processor wires in two functions, so this package never imports its internals:
``decode(entry_id, fields)`` (the processor's stream-entry decoder) and ``snapshot(devices)``
(last known positions, e.g. from the ``last_positions`` table).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika_ingest.redis.client import RedisClient, RedisTargetLike

from .access import Authorizer, LiveAuthorizer, TokenFile, TokenFileError, load_hook
from .feed import FeedFactory, FeedSettings, SnapshotFn
from .metrics import LiveMetrics
from .page import live_site
from .reader import BroadcastReader, DecodeFn

__all__ = ["LiveService", "LiveSettings"]

log = Logger()


@attrs.frozen
class LiveSettings:
    endpoint: str  # --live, e.g. tcp:9091
    tokens_file: str | None = None  # --live-tokens
    auth_hook: str | None = None  # package.module:attribute
    stream: str = "telemetry:teltonika"
    feed: FeedSettings = attrs.field(factory=FeedSettings)
    close_timeout: float = 3.0


class LiveService(MultiService):
    name = "live"

    def __init__(
        self,
        settings: LiveSettings,
        *,
        redis_target: RedisTargetLike,
        decode: DecodeFn,
        snapshot: SnapshotFn,
        registry: CollectorRegistry,
        reactor: Any = None,
        hook: Authorizer | None = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.settings = settings
        self._reactor = reactor
        self.metrics = LiveMetrics.create(registry)
        self.tokens = TokenFile(settings.tokens_file) if settings.tokens_file else None
        if hook is None and settings.auth_hook:
            hook = load_hook(settings.auth_hook)
        self.authorizer = LiveAuthorizer(self.tokens, hook)
        self.factory = FeedFactory(
            metrics=self.metrics,
            authorizer=self.authorizer,
            snapshot=snapshot,
            settings=settings.feed,
            reactor=reactor,
        )
        self.redis = RedisClient(redis_target, reactor=reactor, poolsize=1, name="live-redis")
        self.redis.setServiceParent(self)
        self.reader = BroadcastReader(
            self.redis,
            settings.stream,
            decode,
            self.factory.hub.publish,
            self.metrics,
            reactor=reactor,
        )
        self.reader.setServiceParent(self)
        self.site = live_site(self.factory)
        self.port: Any = None
        self.listening: Deferred[Any] = Deferred()
        self._uninstall_sighup: Callable[[], None] = lambda: None
        self._listen_started = False

    # -- start / stop -------------------------------------------------------------

    def startService(self) -> None:
        if self.tokens is not None:
            self.tokens.load()  # a missing or bad file stops the start (a config error)
            self.metrics.token_reloads.labels("ok").inc()
            log.info("live feed: {n} tokens from {path}", n=len(self.tokens), path=self.tokens.path)
        elif self.authorizer.hook is None:
            log.warn("live feed: no --live-tokens and no hook: every client will be refused")
        super().startService()
        self._uninstall_sighup = _install_sighup(self._reactor, self.reload_tokens)
        self._listen()

    def privilegedStartService(self) -> None:
        """twistd binds the ports here, before the reactor runs: a port that cannot be
        bound at once (in use) raises ``CannotListenError`` (the processor makes it one
        start-up line and exit 1) instead of a critical line later."""
        super().privilegedStartService()
        self._listen(raise_now=True)

    def _listen(self, *, raise_now: bool = False) -> None:
        if self._listen_started:
            return
        self._listen_started = True
        d = serverFromString(self._reactor, self.settings.endpoint).listen(self.site)
        if raise_now:
            done: list[Any] = []

            def seen(result: Any) -> Any:
                done.append(result)  # now, if the listen already finished
                return result

            d.addBoth(seen)
            if done and isinstance(done[0], Failure) and done[0].check(CannotListenError):
                d.addErrback(lambda _: None)  # raised below, to the processor's start-up
                done[0].raiseException()
        d.addCallbacks(self._listened, self._listen_failed)

    def _listened(self, port: Any) -> None:
        self.port = port
        log.info("live feed listening on {address} (page /, feed /ws)", address=port.getHost())
        self.listening.callback(port)

    def _listen_failed(self, failure: Any) -> None:
        log.critical(
            "live feed cannot listen on {endpoint}: {error}",
            endpoint=self.settings.endpoint,
            error=failure.getErrorMessage(),
        )
        self.listening.errback(failure)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        self._uninstall_sighup()
        self._uninstall_sighup = lambda: None
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
        self._listen_started = False
        n = len(self.factory.clients)
        if n:
            log.info("live feed: closing {n} clients (going away)", n=n)
        yield self.factory.close_all(self.settings.close_timeout)
        yield super().stopService()

    # -- tokens -----------------------------------------------------------------

    def reload_tokens(self) -> bool:
        """Read the token file again (SIGHUP) and re-check every open connection; a bad
        file keeps the previous tokens. Returns whether the file was taken."""
        if self.tokens is None:
            return False
        try:
            self.tokens.load()
        except (OSError, UnicodeDecodeError, TokenFileError) as e:
            self.metrics.token_reloads.labels("error").inc()
            log.error("live feed: token file not reloaded, keeping the old one: {e}", e=str(e))
            return False
        self.metrics.token_reloads.labels("ok").inc()
        log.info("live feed: reloaded {n} tokens from {path}", n=len(self.tokens),
                 path=self.tokens.path)  # fmt: skip
        for client in list(self.factory.clients):
            if client.access is not None:
                client.reauthorize(self.authorizer.recheck(client.token, client.access))
        return True


# --------------------------------------------------------------------------- SIGHUP


def _install_sighup(reactor: Any, reload: Callable[[], object]) -> Callable[[], None]:
    """Run ``reload`` in the reactor on SIGHUP, then the previous Python handler (if any);
    returns the uninstaller (which puts the previous handler back)."""
    if threading.current_thread() is not threading.main_thread():
        log.warn("live feed: not in the main thread, SIGHUP will not reload the tokens")
        return lambda: None
    previous = signal.getsignal(signal.SIGHUP)

    def handler(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(reload)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, handler)

    def uninstall() -> None:
        if signal.getsignal(signal.SIGHUP) is handler:
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)

    return uninstall
