"""The operations HTTP resources both services serve: /metrics, /healthz, /readyz
(contract.md §5). ``/readyz`` answers what a check says (each service's check reads a
cached answer: probes never reach Redis or PostgreSQL themselves)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.web import server
from twisted.web.resource import Resource


class Healthz(Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class Readyz(Resource):
    """200 when ``check`` says ready; 503 + JSON reason otherwise.

    ``check`` returns a Deferred firing with None (ready) or a short reason string.
    """

    isLeaf = True

    def __init__(self, check: Callable[[], defer.Deferred[str | None]]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: server.Request) -> Any:
        d = self._check()
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

        def failed(failure: Any) -> None:
            answer(f"readiness check failed: {failure.getErrorMessage()}")

        finished = request.notifyFinish()
        finished.addErrback(lambda _: gone.append(True))  # client went away
        d.addCallbacks(answer, failed)
        return server.NOT_DONE_YET


def operations_site(
    registry: CollectorRegistry, ready_check: Callable[[], defer.Deferred[str | None]]
) -> server.Site:
    # imported here: prometheus_client.twisted installs the reactor when imported, and the
    # fork server (server/forkserver.py) imports this module before any reactor may exist
    from prometheus_client.twisted import MetricsResource

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    root.putChild(b"healthz", Healthz())
    root.putChild(b"readyz", Readyz(ready_check))
    return quiet_site(root)


def quiet_site(root: Resource) -> server.Site:
    """A ``Site`` with no access log, no tracebacks in answers, no start/stop lines."""
    site = _QuietSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


class _QuietSite(server.Site):
    """No access log: Prometheus scrapes and probes would flood the service log."""

    def log(self, request: Any) -> None:
        pass
