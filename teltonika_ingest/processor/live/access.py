"""Who may see which device on the live feed: the token file and the external hook.

Token file (``--live-tokens FILE``), one grant a line::

    # comments and blank lines are ignored
    s3cr3t-dispatch   356307042441013,356307042441021
    s3cr3t-admin      *

A client presents its token as ``Authorization: Bearer TOKEN`` or, for browsers (which
cannot set headers on a WebSocket), as ``?token=TOKEN`` on the WebSocket URL. No token, an
unknown token, or no token file and no hook: no data (the connection is closed with 1008).

Tokens are kept as SHA-256 digests (a dictionary lookup on a digest leaks nothing useful
through timing, and the process never keeps the tokens themselves).

The file is read at start (a bad file stops the start) and on SIGHUP; a reload that finds a
bad line keeps the previous grants and says which line. After a good reload, every open
connection is checked again: a revoked token is closed with 1008, a narrowed one loses the
subscriptions it may no longer see.

External hook: an object with ``authorize(token, info) -> Access | None`` (or a Deferred of
one), named ``package.module:attribute`` (an object with ``authorize``, or a callable
returning one). It is asked only for tokens the file does not know (so a local break-glass
token keeps working when the authorisation service is down); an exception or a failed
Deferred counts as a refusal and is logged. Its answer holds for the life of the connection.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .messages import _IMEI

__all__ = [
    "Access",
    "Authorizer",
    "ConnectionInfo",
    "LiveAuthorizer",
    "TokenFile",
    "TokenFileError",
    "load_hook",
    "parse_tokens",
    "token_from_request",
]

log = Logger()


@attrs.frozen
class Access:
    """What one token may see: ``devices`` None means every device."""

    devices: frozenset[str] | None
    source: str = "token file"

    def allows(self, imei: str) -> bool:
        return self.devices is None or imei in self.devices


@attrs.frozen
class ConnectionInfo:
    """What the hook may look at (besides the token)."""

    peer: str
    path: str
    headers: Mapping[str, str]
    params: Mapping[str, Sequence[str]]


class Authorizer(Protocol):
    def authorize(
        self, token: str | None, info: ConnectionInfo
    ) -> Access | Deferred[Access | None] | None: ...


class TokenFileError(ValueError):
    """A line of the token file is malformed; the message names the line."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, name: str = "token file") -> dict[bytes, Access]:
    """The grants in a token file's text, keyed by the token's SHA-256 digest."""
    grants: dict[bytes, Access] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenFileError(f"{name} line {number}: expected 'TOKEN IMEI[,IMEI...]|*'")
        token, scope = parts
        key = _digest(token)
        if key in grants:
            raise TokenFileError(f"{name} line {number}: the token appears twice")
        if scope == "*":
            grants[key] = Access(None)
            continue
        imeis = [i for i in scope.split(",") if i]
        bad = [i for i in imeis if not _IMEI.fullmatch(i)]
        if bad or not imeis:
            raise TokenFileError(
                f"{name} line {number}: not an IMEI (15 digits): {(bad or [scope])[0]!r}"
            )
        grants[key] = Access(frozenset(imeis))
    return grants


class TokenFile:
    """The token file and its current grants."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._grants: dict[bytes, Access] = {}

    def load(self) -> None:
        """Read the file; raise ``OSError`` / ``TokenFileError`` (the grants are unchanged)."""
        text = self.path.read_text(encoding="utf-8")
        self._grants = parse_tokens(text, str(self.path))

    def lookup(self, token: str) -> Access | None:
        return self._grants.get(_digest(token))

    def __len__(self) -> int:
        return len(self._grants)


def token_from_request(
    headers: Mapping[str, str], params: Mapping[str, Sequence[str]]
) -> str | None:
    """``Authorization: Bearer TOKEN`` first, else ``?token=TOKEN``; None if neither."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    values = params.get("token") or []
    return values[0] if values and values[0] else None


class LiveAuthorizer:
    """The token file first, then the hook (if any); neither → no access."""

    def __init__(self, tokens: TokenFile | None, hook: Authorizer | None = None) -> None:
        self.tokens = tokens
        self.hook = hook

    def authorize(self, token: str | None, info: ConnectionInfo) -> Deferred[Access | None]:
        if token is not None and self.tokens is not None:
            access = self.tokens.lookup(token)
            if access is not None:
                return defer.succeed(access)
        if self.hook is None:
            return defer.succeed(None)
        d: Deferred[Any] = defer.maybeDeferred(self.hook.authorize, token, info)
        d.addCallback(self._from_hook)
        d.addErrback(self._hook_failed, info)
        return d

    def recheck(self, token: str | None, current: Access) -> Access | None:
        """After a reload: the access a connection keeps (hook grants are not rechecked)."""
        if current.source != "token file":
            return current
        if token is None or self.tokens is None:
            return None
        return self.tokens.lookup(token)

    @staticmethod
    def _from_hook(access: Access | None) -> Access | None:
        if access is None:
            return None
        if not isinstance(access, Access):
            raise TypeError(f"the hook returned {type(access).__name__}, not Access or None")
        return attrs.evolve(access, source="hook")

    @staticmethod
    def _hook_failed(failure: Any, info: ConnectionInfo) -> None:
        log.error(
            "live authorisation hook failed for {peer}: {error}",
            peer=info.peer,
            error=failure.getErrorMessage(),
        )
        return None


def load_hook(spec: str) -> Authorizer:
    """``package.module:attribute`` → the hook (the attribute, or what calling it returns)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected package.module:attribute, got {spec!r}")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if isinstance(target, type) or (not hasattr(target, "authorize") and callable(target)):
        target = target()
    if not callable(getattr(target, "authorize", None)):
        raise ValueError(f"{spec}: has no authorize(token, info) method")
    return target
