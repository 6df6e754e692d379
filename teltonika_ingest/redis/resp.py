"""The one RESP encoder of the package (the services' client, the tools, the tests, bench).

Pure: bytes out, no sockets. ``str`` as UTF-8, ``bytes`` as is, ``int`` and ``float`` as
decimal text (``float`` with full precision: ``repr``, unlike txredisapi's 6 decimals),
anything else via ``str()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["encode_command"]


def encode_command(args: Iterable[Any]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b""]
    for a in args:
        if isinstance(a, str):
            b = a.encode()
        elif isinstance(a, bytes):
            b = a
        elif isinstance(a, int) and not isinstance(a, bool):
            b = b"%d" % a
        elif isinstance(a, float):
            b = repr(a).encode()
        else:
            b = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    out[0] = b"*%d\r\n" % (len(out) - 1)
    return b"".join(out)
