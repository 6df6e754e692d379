"""The optional compiled hot path (``_fastavl.c``): a Codec 8/8E/16 data field straight to
each record's JSON payload pieces, about 10x faster than decoding into ``AvlRecord`` objects
and serialising them (BENCHMARKS.md, "Compiled hot path").

``payload_parts`` is None when the extension was not built (no C compiler at install time)
or when ``TELTONIKA_PURE_PYTHON=1`` is set in the environment (to compare, or to rule it out
when chasing a bug); everything then goes through the pure-Python decoder, with the same
results. ``compiled_path_status()`` says which, for the start-up log line.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["compiled_path_status", "payload_parts"]

PayloadParts = Callable[[bytes], tuple[str, int, list[bytes]]]


def _load() -> tuple[PayloadParts | None, str]:
    if os.environ.get("TELTONIKA_PURE_PYTHON", "") not in ("", "0"):
        return None, "off (TELTONIKA_PURE_PYTHON is set)"
    try:
        from ._fastavl import payload_parts as compiled
    except ImportError as exc:  # built without a C compiler
        return None, f"not built ({exc}); using the pure-Python decoder"
    return compiled, "on"


payload_parts, _status = _load()


def compiled_path_status() -> str:
    """``on``, or why the pure-Python decoder is used for every frame."""
    return _status
