"""The processor's HTTP operations listener: /metrics, /healthz, /readyz, /rehydrate.

``/readyz`` answers 200 when Redis answers a PING and the last PostgreSQL check (a
``SELECT 1`` every few seconds, cached: probes do not reach the database) succeeded
recently; 503 with a short JSON reason otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.internet import defer
from twisted.web import server
from twisted.web.resource import Resource

__all__ = ["operations_site"]


class _Healthz(Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class _Readyz(Resource):
    isLeaf = True

    def __init__(self, check: Callable[[], defer.Deferred[str | None]]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: server.Request) -> Any:
        gone: list[bool] = []

        def answer(reason: str | None) -> None:
            if gone:
                return
            request.setHeader(b"content-type", b"application/json")
            if reason is None:
                request.setResponseCode(200)
                request.write(b'{"status":"ready"}\n')
            else:
                request.setResponseCode(503)
                request.write(orjson.dumps({"status": "not ready", "reason": reason}) + b"\n")
            request.finish()

        request.notifyFinish().addErrback(lambda _: gone.append(True))
        self._check().addCallbacks(
            answer, lambda f: answer(f"readiness check failed: {f.getErrorMessage()}")
        )
        return server.NOT_DONE_YET


class _Rehydrate(Resource):
    """``POST /rehydrate?device=IMEI``: forget a device's in-memory last position."""

    isLeaf = True

    def __init__(self, forget: Callable[[str], bool]) -> None:
        super().__init__()
        self._forget = forget

    def render_POST(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        devices = (request.args or {}).get(b"device") or []
        if len(devices) != 1 or not devices[0]:
            request.setResponseCode(400)
            return b'{"error":"expected one device=IMEI"}\n'
        device = devices[0].decode("utf-8", "replace")
        return orjson.dumps({"device": device, "forgotten": self._forget(device)}) + b"\n"


class _QuietSite(server.Site):
    def log(self, request: Any) -> None:
        pass  # no access log: scrapes and probes would flood it


def operations_site(
    registry: CollectorRegistry,
    ready_check: Callable[[], defer.Deferred[str | None]],
    forget_device: Callable[[str], bool],
) -> server.Site:
    root = Resource()
    root.putChild(b"rehydrate", _Rehydrate(forget_device))
    root.putChild(b"metrics", MetricsResource(registry=registry))
    root.putChild(b"healthz", _Healthz())
    root.putChild(b"readyz", _Readyz(ready_check))
    site = _QuietSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
