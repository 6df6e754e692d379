"""How the processor's tap builds its live feed: ``make_live_service(processor)``.

* decoding: the processor's own ``decode_entry`` (one decoder for the durable path and the
  feed);
* snapshot: the ``last_positions`` table, read on a connection and thread of the feed's own
  (``PgWorker`` "pg-live"), so a burst of subscriptions never queues in front of the writer;
* Redis: the processor's Redis (a connection of the feed's own: ``XREAD BLOCK`` holds it);
* metrics: the processor's registry.
"""

from __future__ import annotations

from typing import Any

from psycopg.rows import dict_row
from twisted.application.service import Service
from twisted.internet.defer import Deferred

from teltonika_ingest.ops.startup import StartupError
from teltonika_ingest.processor.decode import decode_entry
from teltonika_ingest.processor.pg import PgWorker

from .access import TokenFileError, load_hook
from .messages import MAX_DEVICES_PER_REQUEST
from .service import LiveService, LiveSettings

__all__ = ["LastPositions", "make_live_service"]

_COLUMNS = (
    "device_id, ts, received_at, codec, longitude, latitude, altitude, angle, satellites, "
    "speed, gps_valid, time_valid"
)


def _select(conn: Any, devices: list[str] | None, limit: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        if devices is None:
            cur.execute(
                f"SELECT {_COLUMNS} FROM last_positions ORDER BY ts DESC LIMIT %s", (limit,)
            )
        else:
            cur.execute(
                f"SELECT {_COLUMNS} FROM last_positions WHERE device_id = ANY(%s)", (devices,)
            )
        rows: list[dict[str, Any]] = cur.fetchall()
    conn.commit()
    return rows


class LastPositions(Service):
    """``snapshot(devices)`` from ``last_positions`` (None: the newest ``limit`` devices)."""

    name = "live-snapshot"

    def __init__(self, conninfo: str, *, reactor: Any, limit: int = MAX_DEVICES_PER_REQUEST):
        self._worker = PgWorker(conninfo, reactor=reactor, name="pg-live", statement_timeout=5.0)
        self.limit = limit

    def __call__(self, devices: frozenset[str] | None) -> Deferred[list[dict[str, Any]]]:
        wanted = None if devices is None else sorted(devices)
        return self._worker.run(_select, wanted, self.limit)

    def startService(self) -> None:
        super().startService()
        self._worker.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._worker.stop()


_TOKENS_FIX = (
    "fix the file (UTF-8, one 'TOKEN IMEI[,IMEI...]' or 'TOKEN *' a line, readable by the "
    "service user) or point --live-tokens at another"
)


def _why(e: BaseException) -> str:
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(e, OSError):
        return f"cannot read it: {e.strerror or e}"
    return str(e)


def make_live_service(processor: Any) -> LiveService:
    """The live feed of a ``ProcessorService`` (its ``config.live`` is set). A token file
    that cannot be read or has a bad line, or a hook that cannot be imported, is a
    ``StartupError`` (one line at start-up: ``ops/startup.py``)."""
    config = processor.config
    hook = None
    if config.live_auth_hook:
        try:
            hook = load_hook(config.live_auth_hook)
        except Exception as e:
            raise StartupError(
                f"--live-auth-hook {config.live_auth_hook}",
                f"cannot load the hook: {type(e).__name__}: {e}",
                "name an importable package.module:attribute whose object has "
                "authorize(token, info) (on the processor's sys.path), or remove "
                "--live-auth-hook",
            ) from None
    snapshot = LastPositions(processor.conninfo, reactor=processor.reactor)
    svc = LiveService(
        LiveSettings(
            endpoint=config.live,
            tokens_file=config.live_tokens,
            stream=config.stream,
        ),
        redis_target=processor.redis.target,
        decode=decode_entry,
        snapshot=snapshot,
        registry=processor.metrics.registry,
        reactor=processor.reactor,
        hook=hook,
    )
    if svc.tokens is not None:
        try:
            svc.tokens.load()  # again at start (and on SIGHUP); here for a clear start-up error
        except (OSError, UnicodeDecodeError, TokenFileError) as e:
            raise StartupError(
                f"--live-tokens {config.live_tokens}", _why(e), _TOKENS_FIX
            ) from None
    snapshot.setServiceParent(svc)
    return svc
