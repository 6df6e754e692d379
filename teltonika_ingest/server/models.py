"""Which device model each IMEI is, for the payload's ``io`` object (``--io-names``).

Sources, first that has an answer wins:

1. the Redis hash ``--model-key`` (default ``devices:model``): field IMEI -> model
   (``HSET devices:model 356307042441013 FMB920``); looked up on a device's first packet,
   then cached for :data:`CACHE_SECONDS` (a change applies within that time);
2. the allow-list file's optional second column (``356307042441013 FMB920``), reloaded
   with the file (SIGHUP);
3. ``--default-model``.

A model the IO catalogue does not know (or none at all) names the ids common to all
families only (teltonika_ingest.catalog). If the hash cannot be read (Redis down, slow),
the file and the default decide for that packet: the record is never held back or dropped
for its names, and ``teltonika_model_lookup_failures_total`` counts it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika_ingest.catalog import ModelView, catalogue
from teltonika_ingest.redis.client import RedisClient
from teltonika_ingest.server.budget import RepeatLimiter, suppressed_note

__all__ = ["CACHE_SECONDS", "DeviceModels"]

log = Logger()

#: how long a device's model from the Redis hash is used before it is asked again
CACHE_SECONDS = 60.0
#: devices whose model is cached at once (beyond that the cache starts over)
CACHE_MAX = 200_000


class DeviceModels:
    """IMEI -> the catalogue's view for its model. ``redis`` None: no hash lookup."""

    def __init__(
        self,
        *,
        redis: RedisClient | None,
        key: str | None,
        file_models: Callable[[], Mapping[str, str]] = dict,
        default: str | None = None,
        clock: IReactorTime,
        timeout: float | None = None,
        on_failure: Callable[[], object] = lambda: None,
    ) -> None:
        self.redis = redis if key else None
        self.key = key
        self.file_models = file_models
        self.default = default
        self.clock = clock
        self.timeout = timeout
        self.on_failure = on_failure
        self._catalogue = catalogue()
        self._cache: dict[str, tuple[float, ModelView]] = {}
        self._unknown_logged: set[str] = set()
        # Redis down: one packet after another fails its lookup; a few lines a minute
        self._log_limit = RepeatLimiter(clock, burst=3)

    def local(self, imei: str) -> ModelView:
        """The view from the file and the default only (no Redis)."""
        return self._view(self.file_models().get(imei) or self.default)

    def view(self, imei: str) -> ModelView | defer.Deferred[ModelView]:
        """The view for ``imei``: at once when cached or without a Redis hash, else a
        Deferred that always succeeds (a failed lookup falls back to :meth:`local`)."""
        if self.redis is None or self.key is None:
            return self.local(imei)
        cached = self._cache.get(imei)
        now = self.clock.seconds()
        if cached is not None and cached[0] > now:
            return cached[1]
        d = self.redis.execute("HGET", self.key, imei, timeout=self.timeout)
        d.addCallbacks(self._got, self._failed, callbackArgs=(imei,), errbackArgs=(imei,))
        return d

    def _got(self, reply: Any, imei: str) -> ModelView:
        if isinstance(reply, bytes):
            reply = reply.decode("utf-8", "replace")
        view = self._view(str(reply).strip()) if reply else self.local(imei)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[imei] = (self.clock.seconds() + CACHE_SECONDS, view)
        return view

    def _failed(self, failure: Failure, imei: str) -> ModelView:
        self.on_failure()
        logged, suppressed = self._log_limit.allow(self.key)
        if logged:
            log.warn(
                "model of {imei} unknown: the Redis hash {key} could not be read ({error}); "
                "using the allow-list file and --default-model{suppressed_note}",
                imei=imei,
                key=self.key,
                error=failure.getErrorMessage() or repr(failure.value),
                suppressed=suppressed,
                suppressed_note=suppressed_note(suppressed),
            )
        return self.local(imei)

    def _view(self, model: str | None) -> ModelView:
        view = self._catalogue.for_model(model)
        unknown = model and view.model is None and model not in self._unknown_logged
        if unknown and len(self._unknown_logged) < 1000:
            self._unknown_logged.add(model)  # type: ignore[arg-type]
            log.warn(
                "device model {model!r} is not in the IO catalogue: its devices are named "
                "with the ids common to all families only (teltonika-ingest io lists the "
                "models)",
                model=model,
            )
        return view
