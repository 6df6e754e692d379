"""Bounding a Redis stream by bytes as well as entries (a Lua fragment for scripts).

``XADD ... MAXLEN ~ N`` bounds a stream's *entries*; a stream of large entries (dead letters
of 64 KiB frames, ~98 KiB of Redis memory each) can still take gigabytes. :data:`TRIM_TO_BYTES`
defines ``trim_to_bytes(key, max_bytes)`` for a script that has just added an entry: when
``MEMORY USAGE`` of the stream (Redis's own estimate, from a sample of 5 nodes: cheap, and
exact enough for a bound) exceeds ``max_bytes``, the oldest entries are trimmed
(``XTRIM MAXLEN ~``) so that about 90 % of the budget stays, in proportion to the entries.
The newest entry is always kept. ``max_bytes`` 0: no byte bound.
"""

from __future__ import annotations

__all__ = ["TRIM_TO_BYTES"]

TRIM_TO_BYTES = """
local function trim_to_bytes(key, max_bytes)
  max_bytes = tonumber(max_bytes)
  if not max_bytes or max_bytes <= 0 then return 0 end
  local used = redis.call('MEMORY', 'USAGE', key)
  if not used or used <= max_bytes then return 0 end
  local len = redis.call('XLEN', key)
  local keep = math.floor(len * (max_bytes / used) * 0.9)
  if keep < 1 then keep = 1 end
  return redis.call('XTRIM', key, 'MAXLEN', '~', keep)
end
"""
