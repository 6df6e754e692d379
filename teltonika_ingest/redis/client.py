"""The one Redis client the service uses (publisher, registry, command router, readiness).

A thin layer over a txredisapi connection pool that fixes what txredisapi gets
wrong for a long-running service:

* every command has a deadline (``command_timeout``): a Redis that does not
  answer yields ``RedisTimeout`` instead of a Deferred that waits for minutes;
* while no connection is up, commands fail at once with ``RedisUnavailable``
  instead of queueing until Redis comes back;
* when txredisapi gives up reconnecting for good (AUTH/SELECT failing during a
  reconnect, upstream issues 126/146), the pool is rebuilt with a bounded
  backoff so the client heals by itself;
* scripts are run with EVALSHA and reloaded on ``NOSCRIPT`` (Redis restarted or
  ``SCRIPT FLUSH``);
* Redis being unreachable or refusing us (connection refused, DNS failure, connect timeout,
  AUTH failing, ``NOAUTH``, a ``READONLY`` replica, ``LOADING``) is one WARNING with the
  reason at the first failure, then at most one per ``trouble_log_interval`` with the count
  in between (txredisapi/ClientService's own per-retry lines are debug, see logsetup).

Replies: integers as ``int``, status and bulk strings as ``str`` (UTF-8; a bulk
string that is not valid UTF-8 comes back as ``bytes``), nil as ``None``, arrays as
lists. Numbers stored as strings stay strings (txredisapi's ``convertNumbers``
is off: an IMEI must not turn into an ``int``). hiredis decodes them, in C
(``_DecodingHiredisProtocol``; txredisapi's own protocol converts every item in Python).

Blocking commands (``XREADGROUP ... BLOCK``) hold a pooled connection and delay
every command queued behind them on it: give each blocking consumer its own
``RedisClient(poolsize=1)`` and pass ``timeout=`` longer than the block time.

Commands are written straight to a pooled txredisapi protocol (txredisapi's
``ConnectionHandler`` costs an ``inlineCallbacks`` per call). Needs txredisapi
1.6 (``RedisFactory.startConnecting``, ClientService-based slots). txredisapi
itself schedules a few things on the global reactor, so the ``reactor`` given
here must be the running one; it is used for deadlines, endpoints and backoff.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import txredisapi
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from teltonika_ingest.redis.resp import encode_command
from teltonika_ingest.writenow import write_now

__all__ = [
    "RedisClient",
    "RedisError",
    "RedisReplyError",
    "RedisTargetLike",
    "RedisTimeout",
    "RedisUnavailable",
    "Script",
    "describe_target",
]

log = Logger()


class RedisTargetLike(Protocol):
    """Where Redis is (the config layer's ``RedisTarget`` has exactly these)."""

    @property
    def host(self) -> str | None: ...
    @property
    def port(self) -> int | None: ...
    @property
    def unix_path(self) -> str | None: ...
    @property
    def db(self) -> int: ...
    @property
    def password(self) -> str | None: ...


class RedisError(Exception):
    """Base of the errors ``RedisClient`` commands fail with."""


class RedisUnavailable(RedisError):
    """No usable connection (not connected yet, connection lost, client stopped).
    A command that was in flight when its connection was lost may or may not
    have been applied."""


class RedisTimeout(RedisError):
    """No reply within the command timeout. The command may still be applied
    later; its late reply is discarded."""


class RedisReplyError(RedisError):
    """Redis answered with an error reply; ``code`` is its first word
    (``ERR``, ``WRONGTYPE``, ``NOSCRIPT``, ``LOADING``, ...)."""

    @property
    def code(self) -> str:
        msg = str(self)
        return msg.split(" ", 1)[0] if msg else ""


@attrs.frozen
class Script:
    """A Lua script; ``sha1`` is what EVALSHA needs."""

    source: str
    sha1: str = attrs.field(init=False, repr=False)

    @sha1.default
    def _compute_sha1(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


def describe_target(target: RedisTargetLike) -> str:
    """Where a target points, for logs (never includes the password)."""
    where = f"unix:{target.unix_path}" if target.unix_path else f"{target.host}:{target.port}"
    return f"{where}/{target.db}" if target.db else where


def _unwrap(reply: Any) -> Any:
    """txredisapi queues error replies and "connection lost" as values."""
    if isinstance(reply, Exception):
        if isinstance(reply, txredisapi.ResponseError):
            raise RedisReplyError(*reply.args)
        if isinstance(reply, txredisapi.ConnectionError):
            raise RedisUnavailable(str(reply) or "connection lost")
        raise reply
    return reply


def _unwrap_exec(reply: Any) -> Any:
    reply = _unwrap(reply)  # EXECABORT, or the connection was lost
    if reply is None:
        raise RedisReplyError("EXECABORT transaction aborted (WATCH)")
    for i, item in enumerate(reply):
        if isinstance(item, Exception):
            raise RedisReplyError(f"EXEC: command {i} failed (the others were applied): {item}")
    return reply


# Reply errors that mean "this Redis will not take our commands", not "this command was bad".
_REFUSING_CODES = frozenset(
    {"READONLY", "NOAUTH", "WRONGPASS", "LOADING", "MISCONF", "MASTERDOWN", "NOPERM"}
)


def refusal(exc: BaseException) -> str | None:
    """The reply error's text if it says Redis refuses our commands (read-only replica, no
    auth, loading, persistence broken), else None. Scripts wrap the inner error's text."""
    if not isinstance(exc, RedisReplyError):
        return None
    text = str(exc)
    if exc.code in _REFUSING_CODES:
        return text
    for code in _REFUSING_CODES:
        if f"-{code} " in text or f": {code} " in text:
            return text
    return None


def connect_failure_reason(failure: Failure) -> str:
    """A failed connection attempt in words (no object reprs)."""
    exc = failure.value
    if isinstance(exc, net_error.DNSLookupError):
        return " ".join(str(exc).split()) or "DNS lookup failed"
    if isinstance(exc, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, net_error.TimeoutError | defer.TimeoutError):
        return "connect timed out"
    if isinstance(exc, net_error.NoRouteError):
        return "no route to host"
    if isinstance(exc, net_error.ConnectError) and isinstance(exc.osError, int):
        return os.strerror(exc.osError)  # e.g. a unix socket path that does not exist
    message = failure.getErrorMessage()
    return " ".join(message.split()) or type(exc).__name__


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """The endpoint txredisapi's slots connect through: tells the client why an attempt
    failed (ClientService only logs its own repr of the endpoint, at every retry)."""

    def __init__(self, inner: Any, where: str, failed: Callable[[str], object]) -> None:
        self._inner = inner
        self._where = where
        self._failed = failed

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._inner.connect(factory)
        d.addErrback(self._attempt_failed)
        return d

    def _attempt_failed(self, failure: Failure) -> Failure:
        if not failure.check(defer.CancelledError):  # stopService cancels an attempt
            self._failed(connect_failure_reason(failure))
        return failure

    def __repr__(self) -> str:
        return f"Redis {self._where}"


def _timeout_to_redis(failure: Failure) -> Any:
    if failure.check(defer.TimeoutError):
        args = failure.value.args if failure.value is not None else ()
        raise RedisTimeout(f"no reply from Redis within {args[0] if args else '?'}s")
    return failure


try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is a dependency
    hiredis = None  # type: ignore[assignment]


def _restore_bytes(reply: Any) -> Any:
    """A string hiredis decoded with ``surrogateescape`` back to the ``bytes`` it was when
    it is not valid UTF-8 (txredisapi's rule); lists item by item; the rest as it is."""
    if isinstance(reply, str):
        try:
            reply.encode("utf-8")
        except UnicodeEncodeError:
            return reply.encode("utf-8", "surrogateescape")
        return reply
    if isinstance(reply, list):
        return [_restore_bytes(x) for x in reply]
    return reply


class _DecodingHiredisProtocol(txredisapi.BaseRedisProtocol):
    """txredisapi's hiredis protocol with the UTF-8 decoding done by hiredis, in C.

    txredisapi's ``HiredisProtocol`` gets bytes from hiredis and converts every item of a
    reply in Python (``tryConvertData``, recursively): a quarter of the processor's CPU on
    ``XREADGROUP`` replies of thousands of fields. Here hiredis' reader decodes (UTF-8,
    ``surrogateescape``) and the replies are the same as txredisapi's for this client
    (``convertNumbers`` off, charset UTF-8): integers ``int``, nil ``None``, errors
    ``ResponseError``, strings ``str``, and a string that is not valid UTF-8 ``bytes``. Only
    replies that came (partly) in a chunk with non-ASCII bytes are walked in Python to turn
    such strings back into bytes (``_restore_bytes``); the telemetry stream is ASCII.
    Tested reply for reply against txredisapi's protocol (tests/test_redis_replies.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reader = hiredis.Reader(
            protocolError=txredisapi.InvalidData,
            replyError=txredisapi.ResponseError,
            encoding=self.charset,
            errors="surrogateescape",
        )
        # non-ASCII bytes fed since the last reply returned (in the reply being read)
        self._partial_non_ascii = False

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        # The first reply returned here may hold bytes of earlier chunks (since the last
        # reply returned); the next ones lie wholly in this chunk, and so does the start of
        # a reply left incomplete. (The reader's has_data() says nothing of a partial reply.)
        reader = self._reader
        non_ascii = bool(data) and not data.isascii()
        if data:
            reader.feed(data)
        gets = reader.gets
        put = self.replyQueue.put
        walk = non_ascii or self._partial_non_ascii
        res = gets()
        returned = False
        while res is not False:
            returned = True
            if walk:
                res = _restore_bytes(res)
            if res == "QUEUED":
                self.transactions += 1
            elif self.inTransaction:
                res = self.handleTransactionData(res)
            put(res)
            walk = non_ascii
            res = gets()
        self._partial_non_ascii = non_ascii if returned else (self._partial_non_ascii or non_ascii)


class _PoolFactory(txredisapi.RedisFactory):
    """txredisapi's pool factory, reporting pool changes and give-ups to its client."""

    if hiredis is not None:
        protocol = _DecodingHiredisProtocol

    # reconnect sooner than txredisapi's 1 s .. 10 s (e-fold): Redis restarts are quick
    initialDelay = 0.2
    factor = 2.0
    maxDelay = 5.0

    def __init__(self, client: RedisClient, target: RedisTargetLike, poolsize: int) -> None:
        super().__init__(
            describe_target(target),
            target.db or None,  # db 0: no SELECT at all, one less handshake step to fail
            poolsize,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            charset="utf-8",
            password=target.password,
            replyTimeout=None,  # deadlines are RedisClient's, per command (see _send)
            convertNumbers=False,
        )
        self._client = client

    def addConnection(self, conn: Any) -> None:
        before = self.size
        super().addConnection(conn)
        if self.size > before:
            self._client._connection_added(self)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self._client._connection_removed(self)

    def connectionError(self, why: str) -> None:
        # Called right after txredisapi's protocol called stopTrying() because
        # AUTH or SELECT failed: this factory will never reconnect again.
        # (txredisapi would errback self.deferred, which nobody waits on.)
        self._client._gave_up(self, why)


class RedisClient(Service):
    """A reconnecting Redis connection pool with deadlines; an ``IService``.

    ``startService`` starts connecting (lazily: commands fail with
    ``RedisUnavailable`` until connected); ``stopService`` closes every
    connection and returns a Deferred that fires once they are closed.

    ``connection_made_hooks`` (called with no argument) and
    ``connection_lost_hooks`` (called with a reason string) are plain lists of
    callables, run when the client goes from no usable connection to one, and
    back.
    """

    #: bounds of the delay before rebuilding a pool txredisapi gave up on
    rebuild_delay_min = 0.5
    rebuild_delay_max = 30.0
    #: Redis unreachable or refusing: a WARNING at once, then at most one per this interval
    trouble_log_interval = 30.0

    def __init__(
        self,
        target: RedisTargetLike,
        *,
        reactor: Any = None,
        command_timeout: float = 5.0,
        poolsize: int = 2,
        name: str = "redis",
        connect_timeout: float | None = None,
    ) -> None:
        if not target.unix_path and not (target.host and target.port):
            raise ValueError("Redis target needs unix_path, or host and port")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.name = name
        self.target = target
        self.command_timeout = command_timeout
        self.poolsize = poolsize
        self.connect_timeout = command_timeout if connect_timeout is None else connect_timeout
        self._reactor = reactor
        self._where = describe_target(target)
        # _factory: the pool being maintained; _serving: the one whose connections
        # commands use (an old pool keeps serving while its replacement connects)
        self._factory: _PoolFactory | None = None
        self._serving: _PoolFactory | None = None
        self._pool: list[Any] = []  # alias of _serving.pool: the hot path reads only this
        self._rr = 0
        self._up = False
        self._ever_connected = False
        self._stopped = False
        self._gave_up_reason: str | None = None
        self._ping_error: str | None = None
        self._rebuild_call: DelayedCall | None = None
        self._rebuild_delay = self.rebuild_delay_min
        self._retiring: set[Deferred[Any]] = set()
        self.rebuilds = 0
        # (deadline, Deferred) of commands with the default timeout, oldest first
        self._inflight: deque[tuple[float, Deferred[Any]]] = deque()
        self._expiring = False
        self._expired_errback = self._on_expired  # bound once, not per command
        self._sweeper: LoopingCall | None = None
        self.connection_made_hooks: list[Callable[[], object]] = []
        self.connection_lost_hooks: list[Callable[[str], object]] = []
        self._trouble_next: float | None = None  # when the next trouble WARNING may be logged
        self._trouble_quiet = 0  # troubles not logged since the last WARNING
        self._unwrap = self._unwrap_reply  # bound once, not per command

    # -- commands (hot path) -------------------------------------------------

    def execute(self, *args: Any, timeout: float | None = None) -> Deferred[Any]:
        """Send one command; fires with its reply or fails with ``RedisUnavailable``,
        ``RedisTimeout`` (no reply within ``timeout``, default ``command_timeout``)
        or ``RedisReplyError``."""
        try:
            data = encode_command(args)
        except Exception as e:  # an argument that can't be encoded: nothing was sent
            return defer.fail(e)
        return self._send(data, 0, self._unwrap, timeout)

    def transaction(
        self, commands: Sequence[Sequence[Any]], *, timeout: float | None = None
    ) -> Deferred[list[Any]]:
        """``MULTI``, the commands, ``EXEC`` written at once on one connection
        (``execute("MULTI")`` would not work: consecutive ``execute`` calls may go
        to different pooled connections). Fires with the list of replies; fails
        with ``RedisReplyError`` if the transaction was refused (EXECABORT) or a
        command in it failed (the others were applied: Redis has no rollback)."""
        try:
            # built before anything is written: a failure leaves no MULTI behind
            data = b"".join([_MULTI, *[encode_command(c) for c in commands], _EXEC])
        except Exception as e:
            return defer.fail(e)
        # the replies to MULTI and the QUEUED ones are skipped: EXEC's says it all
        return self._send(data, len(commands) + 1, _unwrap_exec, timeout)

    def _send(
        self, data: bytes, skip: int, unwrap: Callable[[Any], Any], timeout: float | None
    ) -> Deferred[Any]:
        pool = self._pool
        if not pool:
            return defer.fail(RedisUnavailable(self.redis_state()))
        self._rr += 1
        conn = pool[self._rr % len(pool)]
        if not conn.connected:
            return defer.fail(RedisUnavailable("connection closing"))
        write_now(conn.transport, data)
        # txredisapi's protocol hands replies, in order, to ReplyQueue waiters:
        # one get() per command written. Errors and "connection lost" arrive as
        # values, so skipped replies leave nothing unhandled. Cancelling a get()
        # keeps its place in the queue, so a reply arriving after its command
        # timed out is swallowed there and can't shift the replies of later ones.
        get = conn.replyQueue.get
        for _ in range(skip):
            get()
        d: Deferred[Any] = get()
        if timeout is None:
            # Default deadline: no DelayedCall per command (measurably costly at
            # thousands of commands per second); a FIFO swept a few times per
            # timeout instead (deadlines are in send order).
            d.addCallbacks(unwrap, self._expired_errback)
            self._inflight.append((self._reactor.seconds() + self.command_timeout, d))
        else:
            d.addTimeout(timeout, self._reactor)
            d.addCallbacks(unwrap, _timeout_to_redis)
        return d

    def _unwrap_reply(self, reply: Any) -> Any:
        if isinstance(reply, txredisapi.ResponseError):
            exc = RedisReplyError(*reply.args)
            why = refusal(exc)
            if why is not None:
                self.trouble(why)
            raise exc
        return _unwrap(reply)

    # -- trouble reports -----------------------------------------------------

    def trouble(self, reason: str) -> None:
        """Redis is unreachable or refuses us: WARNING now if none was logged within
        ``trouble_log_interval``, else counted and mentioned in the next one."""
        starting = getattr(self.target, "starting", None)
        if starting is not None and starting():
            # the embedded Redis is still coming up: expected, not trouble
            log.debug("Redis {where} not up yet: {reason}", where=self._where, reason=reason)
            return
        now = self._reactor.seconds()
        if self._trouble_next is not None and now < self._trouble_next:
            self._trouble_quiet += 1
            return
        quiet, self._trouble_quiet = self._trouble_quiet, 0
        self._trouble_next = now + self.trouble_log_interval
        log.warn(
            "Redis {where} ({name}) unreachable or refusing: {reason}"
            + (" ({quiet} more failures since the last report)" if quiet else ""),
            where=self._where,
            name=self.name,
            reason=reason,
            quiet=quiet,
        )

    def _connect_failed(self, reason: str) -> None:
        if self.running:
            self.trouble(reason)

    def _sweep(self) -> None:
        q = self._inflight
        if not q:
            return
        now = self._reactor.seconds()
        while q:
            deadline, d = q[0]
            if not d.called and deadline > now:
                break
            q.popleft()  # before cancel(): its callbacks may run anything, even stopService
            if not d.called:
                self._expiring = True
                d.cancel()  # its first errback is _on_expired, which takes the flag
                self._expiring = False

    def _on_expired(self, failure: Failure) -> Any:
        if self._expiring:
            self._expiring = False
            if failure.check(defer.CancelledError):
                raise RedisTimeout(f"no reply from Redis within {self.command_timeout}s")
        return failure  # cancelled by the caller

    def run_script(
        self,
        script: Script,
        keys: Sequence[Any],
        args: Sequence[Any],
        *,
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """EVALSHA; on ``NOSCRIPT`` (script cache empty after a Redis restart or
        SCRIPT FLUSH) run it once more with EVAL, which also caches it."""
        d = self.execute("EVALSHA", script.sha1, len(keys), *keys, *args, timeout=timeout)
        d.addErrback(self._retry_noscript, script, keys, args, timeout)
        return d

    def _retry_noscript(
        self,
        failure: Failure,
        script: Script,
        keys: Sequence[Any],
        args: Sequence[Any],
        timeout: float | None,
    ) -> Any:
        exc = failure.value
        if isinstance(exc, RedisReplyError) and exc.code == "NOSCRIPT":
            return self.execute("EVAL", script.source, len(keys), *keys, *args, timeout=timeout)
        return failure

    def ping(self) -> Deferred[bool]:
        """True if Redis answered PONG within the command timeout; never fails.
        While connected, a failed ping's reason shows in ``redis_state()``."""
        d = self.execute("PING")
        d.addCallbacks(self._pinged, self._ping_failed)
        return d

    def _pinged(self, reply: object) -> bool:
        self._ping_error = None if reply == "PONG" else f"PING answered {reply!r}"
        return self._ping_error is None

    def _ping_failed(self, failure: Failure) -> bool:
        self._ping_error = failure.getErrorMessage()
        return False

    # -- state ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return bool(self._pool)

    @property
    def ever_connected(self) -> bool:
        """Has a connection been up since ``startService``? (Before that, failures are
        expected: callers that redo their work on connect need not count them.)"""
        return self._ever_connected

    def redis_state(self) -> str:
        """Short reason for /readyz and logs."""
        if not self.running:
            return "stopped" if self._stopped else "not started"
        if self._gave_up_reason is not None:
            call = self._rebuild_call
            when = (
                f" in {max(0.0, call.getTime() - self._reactor.seconds()):.1f}s"
                if call is not None and call.active()
                else ""
            )
            return f"gave up ({self._gave_up_reason}), rebuilding{when}"
        if self._pool:
            if self._ping_error is not None:  # e.g. LOADING, or a stalled server
                return f"connected, not answering ({self._ping_error})"
            return "connected"
        return "reconnecting" if self._ever_connected else "connecting"

    def __repr__(self) -> str:
        return f"<RedisClient {self.name} {self._where}: {self.redis_state()}>"

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self._ever_connected = False
        self._ping_error = None
        self._trouble_next = None
        self._trouble_quiet = 0
        self._factory = self._serving = self._start_factory()
        self._pool = self._serving.pool
        sweeper = self._sweeper = LoopingCall(self._sweep)
        sweeper.clock = self._reactor
        # deadlines are met within a tenth of the timeout (at most 0.25 s late)
        sweeper.start(max(0.01, min(0.25, self.command_timeout / 10)), now=False)
        log.info("Redis client {name} connecting to {where}", name=self.name, where=self._where)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopped = True
        if self._rebuild_call is not None and self._rebuild_call.active():
            self._rebuild_call.cancel()
        self._rebuild_call = None
        self._gave_up_reason = None
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        self._inflight.clear()  # closing the connections fails what is in flight
        for f in {self._factory, self._serving}:
            if f is not None:
                self._retire(f)
        self._factory = self._serving = None
        self._pool = []
        self._set_up(False, "client stopped")
        return defer.gatherResults(list(self._retiring), consumeErrors=True).addBoth(lambda _: None)

    # -- pool management -----------------------------------------------------

    def _start_factory(self) -> _PoolFactory:
        factory = _PoolFactory(self, self.target, self.poolsize)
        if self.target.unix_path:
            endpoint: Any = UNIXClientEndpoint(
                self._reactor, self.target.unix_path, timeout=self.connect_timeout
            )
        else:
            host, port = self.target.host, self.target.port
            assert host is not None and port is not None  # checked in __init__
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self.connect_timeout)
        factory.startConnecting(_WatchedEndpoint(endpoint, self._where, self._connect_failed))
        return factory

    def _retire(self, factory: _PoolFactory) -> None:
        d = factory.disconnect()
        self._retiring.add(d)
        d.addBoth(lambda _: self._retiring.discard(d))

    def _set_up(self, up: bool, reason: str = "") -> None:
        if up == self._up:
            return
        self._up = up
        if up:
            self._ever_connected = True
            self._ping_error = None
            self._trouble_next = None  # the next trouble is reported at once
            self._trouble_quiet = 0
            log.info("Redis {where} connected", where=self._where)
            for made in list(self.connection_made_hooks):
                try:
                    made()
                except Exception:
                    log.failure("connection_made hook failed")
        else:
            # closing our own connections at shutdown is expected: not a warning
            emit = log.info if self._stopped else log.warn
            emit("Redis {where} connection lost: {reason}", where=self._where, reason=reason)
            for lost in list(self.connection_lost_hooks):
                try:
                    lost(reason)
                except Exception:
                    log.failure("connection_lost hook failed")

    def _connection_added(self, factory: _PoolFactory) -> None:
        if factory is not self._factory:
            return  # a retired pool
        if self._serving is not factory:
            # the rebuilt pool is up: move traffic to it, close the old one
            old, self._serving = self._serving, factory
            self._pool = factory.pool
            if old is not None:
                self._retire(old)
        self._rebuild_delay = self.rebuild_delay_min
        self._set_up(True)

    def _connection_removed(self, factory: _PoolFactory) -> None:
        if factory is self._serving and not factory.pool:
            self._set_up(False, "connection lost")

    def _gave_up(self, factory: _PoolFactory, why: str) -> None:
        if factory is not self._factory or self._gave_up_reason is not None:
            return
        reason = why.removeprefix("Redis error: ")
        delay = self._rebuild_delay
        self._rebuild_delay = min(delay * 2, self.rebuild_delay_max)
        self._gave_up_reason = reason
        log.debug(
            "Redis client for {where} stopped reconnecting ({reason}); "
            "rebuilding the connection pool in {delay:.1f}s",
            where=self._where,
            reason=reason,
            delay=delay,
        )
        self.trouble(reason)
        self._rebuild_call = self._reactor.callLater(delay, self._rebuild)

    def _rebuild(self) -> None:
        self._rebuild_call = None
        if not self.running:
            return
        self._gave_up_reason = None
        self.rebuilds += 1
        old = self._factory
        self._factory = self._start_factory()
        if old is not self._serving and old is not None:
            self._retire(old)
        if self._serving is not None and not self._serving.pool:
            # nothing left to serve from: retire it now; otherwise it keeps
            # serving until the new pool has a connection
            self._retire(self._serving)
            self._serving = self._factory
            self._pool = self._factory.pool


_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"
