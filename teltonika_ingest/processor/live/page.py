"""The live page (``GET /`` on the ``--live`` listener) and the site that serves it with the
feed at ``/ws``: one listener, so the page's WebSocket is same-origin.

The page is one self-contained file (``page.html``: no CDN, no map tiles, no external
fonts). Its inline script and style are allowed by their SHA-256 hashes in the
Content-Security-Policy, and it may connect only to this host.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web import server
from twisted.web.resource import Resource

from teltonika_ingest.ops.http import quiet_site

__all__ = ["PageResource", "live_site", "page_html"]


def page_html() -> bytes:
    return resources.files(__package__).joinpath("page.html").read_bytes()


def _hashes(html: bytes, tag: bytes) -> str:
    blocks = re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), html, re.S)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks
    )


class PageResource(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._html = page_html()
        self._scripts = _hashes(self._html, b"script")
        self._styles = _hashes(self._html, b"style")

    def render_GET(self, request: server.Request) -> bytes:
        host = (request.getHeader("host") or "").strip()
        if not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", host):
            host = ""
        connect = f"ws://{host} wss://{host}" if host else ""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(
            b"content-security-policy",
            (
                f"default-src 'none'; script-src {self._scripts}; style-src {self._styles}; "
                f"connect-src 'self' {connect}; img-src 'self'; base-uri 'none'; "
                "frame-ancestors 'none'"
            ).encode(),
        )
        return self._html


def live_site(feed_factory: Any) -> server.Site:
    root = Resource()
    root.putChild(b"", PageResource())
    root.putChild(b"ws", WebSocketResource(feed_factory))
    return quiet_site(root)  # no access log: upgrades and page loads would flood it
