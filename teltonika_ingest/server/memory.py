"""Giving freed memory back to the operating system (glibc's ``malloc_trim``).

CPython frees a closed connection's buffers at once, but glibc keeps freed heap memory for
reuse: after 1,000 connections parked on 64 KiB partial frames closed, the RSS stayed ~45-80 MB
above its level before (bench/parked.py, RELIABILITY.md). Those buffers come from the heap
(below glibc's mmap threshold) interleaved with small long-lived objects, so the heap's top can
rarely shrink; ``malloc_trim(0)`` also returns the free pages inside the heap
(``MADV_DONTNEED``). It walks the free lists (about a millisecond per 100 MB here), so the
factory calls it only after many megabytes of buffers were released, and at most every few
seconds. Where there is no glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["malloc_trim"]


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _find_malloc_trim()


def malloc_trim() -> bool:
    """Return free heap memory to the OS; True if some was (False without glibc)."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
