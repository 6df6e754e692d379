"""The processor's HTTP operations listener: /metrics, /healthz, /readyz, /rehydrate.

``/readyz`` answers 200 when Redis answers a PING and the last PostgreSQL check (a
``SELECT 1`` every few seconds, cached: probes do not reach the database) succeeded
recently; 503 with a short JSON reason otherwise. The resources are the shared ones
(``teltonika_ingest/ops/http.py``); ``/rehydrate`` is the processor's own.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.internet import defer
from twisted.web import server
from twisted.web.resource import Resource

from teltonika_ingest.ops.http import Healthz, Readyz, quiet_site

__all__ = ["operations_site"]


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


def operations_site(
    registry: CollectorRegistry,
    ready_check: Callable[[], defer.Deferred[str | None]],
    forget_device: Callable[[str], bool],
) -> server.Site:
    root = Resource()
    root.putChild(b"rehydrate", _Rehydrate(forget_device))
    root.putChild(b"metrics", MetricsResource(registry=registry))
    root.putChild(b"healthz", Healthz())
    root.putChild(b"readyz", Readyz(ready_check))
    return quiet_site(root)
