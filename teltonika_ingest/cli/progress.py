"""One self-overwriting progress line on a terminal, for long tool runs (verify, dlq replay).

Shown only when the stream (stderr) is a terminal: piped or redirected output stays clean.
The first update and the last are always drawn, the ones between at most every
``interval`` seconds; :meth:`Progress.close` clears the line so the summary that follows
starts on a clean one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

__all__ = ["Progress"]


class Progress:
    def __init__(
        self,
        what: str,
        *,
        stream: IO[str] | None = None,
        interval: float = 0.2,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self._is_terminal() if enabled is None else enabled
        self.interval = interval
        self.clock = clock
        self._drawn_at: float | None = None
        self._width = 0

    def _is_terminal(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def update(self, done: int, total: int | None = None, *, final: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not final and self._drawn_at is not None and now - self._drawn_at < self.interval:
            return
        self._drawn_at = now
        if total:
            text = f"{self.what}: {done:,} of {total:,} ({100 * done // max(total, 1)} %)"
        else:
            text = f"{self.what}: {done:,}"
        pad = " " * max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write(f"\r{text}{pad}")
        self.stream.flush()

    def close(self) -> None:
        """Erase the line (the summary comes next)."""
        if self.enabled and self._drawn_at is not None:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
