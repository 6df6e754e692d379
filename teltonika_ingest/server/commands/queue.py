"""Queued commands (contract.md §11): the Redis data model, its Lua scripts, entry checks.

Commands addressed by IMEI, kept in Redis per device until delivered, expired or cancelled.
Pure data and functions (no Twisted): the service that runs these scripts is
``delivery.py``; the design and its guarantees are in OPERATIONS.md ("Queued commands").

Keys (one Redis; the scripts touch keys derived from ids and IMEIs, so not Redis Cluster):

* ``commands:queue`` (stream, the entry point): ``id imei text|hex [codec] [timeout_s]
  [ttl_s] [max_attempts]`` adds a command; ``cancel <id>`` cancels one. Every instance reads
  it with the consumer group ``teltonika-ingest``; an accepted entry is acknowledged and
  deleted in the same script that stores its command.
* ``commands:queued:{id}`` (hash): one queued command and its delivery state.
* ``commands:device:{imei}`` (sorted set): the commands queued for a device, in the order
  of their ``commands:queue`` entries (whichever instance stored them); the head is the only
  one ever being delivered, and only once no earlier entry for the device waits unstored.
* ``commands:expiry`` (sorted set): id -> deadline (epoch ms): the TTL while queued, the
  delivery lease while being delivered. Swept in pages by every instance; its size is the
  global queue depth (and what the global bound counts).
* ``commands:wake:{instance_id}`` (stream): "IMEI has a command to deliver", written for the
  instance the registry names when a command is queued or put back; that instance reads it
  with the same blocking read as ``commands:queue``.

Every state change is one script, so every outcome (``ok``, ``nack``, ``invalid``,
``expired``, ``failed``, ``cancelled``) is written to ``commands:results`` exactly once: the
script that writes it deletes the command in the same step, and a delivery is fenced by its
instance and attempt number (a stale instance's answer or release changes nothing).
Deadlines use Redis's clock (``TIME``), so instances' clocks do not matter for expiry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import attrs

from teltonika_ingest.redis.client import Script
from teltonika_ingest.redis.trim import TRIM_TO_BYTES
from teltonika_ingest.server.commands.entries import (
    MAX_ID_LENGTH,
    RESULTS_KEY,
    CommandRequest,
    InvalidCommand,
    parse_entry,
)

__all__ = [
    "ACCEPT",
    "CANCEL",
    "CLAIM",
    "DEVICE_PREFIX",
    "EXPIRY_KEY",
    "MAX_ATTEMPTS",
    "MAX_TTL_S",
    "QUEUED_PREFIX",
    "QUEUE_KEY",
    "SETTLE",
    "SWEEP",
    "WAKE_PREFIX",
    "WRITTEN",
    "CancelRequest",
    "QueuedRequest",
    "cancel_args",
    "device_key",
    "parse_duration",
    "parse_queue_entry",
    "queued_key",
    "wake_stream",
]

QUEUE_KEY = "commands:queue"
QUEUED_PREFIX = "commands:queued:"
DEVICE_PREFIX = "commands:device:"
EXPIRY_KEY = "commands:expiry"
WAKE_PREFIX = "commands:wake:"
REGISTRY_KEY = "connections:registry"  # registry.py's; repeated here to keep this module pure
#: the longest TTL an entry may ask for (30 days, what the longest-keeping peers offer)
MAX_TTL_S = 30 * 86400.0
#: the most deliveries an entry may ask for
MAX_ATTEMPTS = 100
#: approximate length cap of each wake stream (a wake is a hint; losing old ones is harmless)
WAKE_MAXLEN = 1000


def queued_key(command_id: str) -> str:
    return QUEUED_PREFIX + command_id


def device_key(imei: str) -> str:
    return DEVICE_PREFIX + imei


def wake_stream(instance_id: str) -> str:
    return WAKE_PREFIX + instance_id


# --------------------------------------------------------------------------- entries


@attrs.frozen
class QueuedRequest:
    """A checked ``commands:queue`` entry that adds a command."""

    request: CommandRequest
    ttl: float  # seconds
    max_attempts: int

    @property
    def kind(self) -> str:
        return "hex" if self.request.binary else "text"

    @property
    def payload_text(self) -> str:
        payload = self.request.payload
        return payload.hex() if self.request.binary else payload.decode("ascii")


@attrs.frozen
class CancelRequest:
    """A ``commands:queue`` entry that cancels the queued command ``id``."""

    id: str


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``2d`` -> seconds; ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration (e.g. 90, 90s, 15m, 1h, 2d): {text[:20]!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _field(fields: Sequence[Any], name: str) -> str | None:
    """The value of ``name`` in a flat field list (None if absent or not UTF-8)."""
    for i in range(0, len(fields) - 1, 2):
        key = fields[i]
        if (key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)) == name:
            value = fields[i + 1]
            if isinstance(value, bytes):
                try:
                    return value.decode("utf-8")
                except UnicodeDecodeError:
                    return None
            return str(value)
    return None


def parse_queue_entry(
    fields: Sequence[Any] | None,
    *,
    max_length: int,
    default_timeout: float,
    default_ttl: float,
    default_attempts: int,
) -> QueuedRequest | CancelRequest:
    """Check one ``commands:queue`` entry; raise :class:`InvalidCommand` saying why.

    A ``cancel`` field makes it a cancel request (other fields ignored). Otherwise it is a
    command entry as on ``commands:instance:{id}`` (:func:`parse_entry`) plus ``ttl_s``
    (0 < N <= 30 days, default ``default_ttl``) and ``max_attempts`` (1..100, default
    ``default_attempts``).
    """
    if fields is not None and len(fields) % 2 == 0:
        cancel = _field(fields, "cancel")
        if cancel is not None:
            if not cancel or len(cancel) > MAX_ID_LENGTH:
                raise InvalidCommand("'cancel' must name a command id")
            return CancelRequest(cancel)
    request = parse_entry(fields, max_length=max_length, default_timeout=default_timeout)
    assert fields is not None

    def invalid(reason: str) -> InvalidCommand:
        return InvalidCommand(reason, id=request.id, imei=request.imei)

    ttl = default_ttl
    given = _field(fields, "ttl_s")
    if given is not None:
        try:
            ttl = float(given)
        except ValueError:
            raise invalid(f"'ttl_s' must be a number of seconds, got {given[:20]!r}") from None
        if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL_S):
            raise invalid(f"'ttl_s' must be > 0 and <= {MAX_TTL_S:g} (30 days), got {given[:20]!r}")
    attempts = default_attempts
    given = _field(fields, "max_attempts")
    if given is not None:
        if not (given.isascii() and given.isdigit() and 1 <= int(given) <= MAX_ATTEMPTS):
            raise invalid(
                f"'max_attempts' must be a whole number 1..{MAX_ATTEMPTS}, got {given[:20]!r}"
            )
        attempts = int(given)
    return QueuedRequest(request, ttl, attempts)


# --------------------------------------------------------------------------- Lua

# Shared by every script. Outcome entries: id imei status response instance_id at entry_id
# attempts [extra...]. ``forget`` removes a command from all three structures at once.
_PRELUDE = (
    TRIM_TO_BYTES
    + f"""
pcall(redis.replicate_commands)  -- Redis < 7: TIME needs effects replication
local RESULTS = '{RESULTS_KEY}'
local EXPIRY = '{EXPIRY_KEY}'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function qkey(id) return '{QUEUED_PREFIX}' .. id end
local function dkey(imei) return '{DEVICE_PREFIX}' .. imei end
local function load(key)
  local flat = redis.call('HGETALL', key)
  local h = {{}}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end
local function forget(id, imei)
  local slot = redis.call('HGET', qkey(id), 'slot')
  redis.call('DEL', qkey(id))
  if slot then redis.call('ZREM', dkey(imei), slot) end
  redis.call('ZREM', EXPIRY, id)
end
-- a device queue orders its commands by their commands:queue entry id (score: its ms part;
-- member: its sequence part zero-padded, ':', the command id), whichever instance stored them
local function slot_of(entry, id)
  local ms, seq = string.match(entry, '^(%d+)-(%d+)$')
  return tonumber(ms), string.rep('0', 20 - #seq) .. seq .. ':' .. id
end
local function id_of(slot) return string.sub(slot, 22) end
-- limits: 'N' or 'N:BYTES' (results MAXLEN ~ N, and at most BYTES of memory, as the
-- direct path's outcome writer bounds it)
local function record(limits, id, imei, status, response, instance, at, entry, attempts, extra)
  local f = {{'id', id, 'imei', imei, 'status', status, 'response', response,
             'instance_id', instance, 'at', at, 'entry_id', entry, 'attempts', tostring(attempts)}}
  for i = 1, #extra do f[#f + 1] = extra[i] end
  local maxlen, bytes = string.match(tostring(limits), '^(%d+):?(%d*)$')
  local rid = redis.call('XADD', RESULTS, 'MAXLEN', '~', maxlen, '*', unpack(f))
  if bytes ~= '' then trim_to_bytes(RESULTS, bytes) end
  return rid
end
local function wake(imei)
  local holder = redis.call('HGET', '{REGISTRY_KEY}', imei)
  if holder then
    redis.call('XADD', '{WAKE_PREFIX}' .. holder, 'MAXLEN', '~', {WAKE_MAXLEN}, '*', 'imei', imei)
    return holder
  end
  return ''
end
-- a delivery that got no answer: failed once max_attempts were made, expired past its TTL,
-- else back in the queue (same place: it is still the head)
local function unanswered(h, attempts, now, maxlen, instance, at, why)
  if attempts >= tonumber(h.max_attempts) then
    record(maxlen, h.id, h.imei, 'failed', 'no answer after ' .. attempts
      .. ' deliveries (max_attempts ' .. h.max_attempts .. '); last: ' .. why,
      instance, at, h.entry, attempts, {{}})
    forget(h.id, h.imei)
    return 'failed'
  end
  if now >= tonumber(h.expires) then
    record(maxlen, h.id, h.imei, 'expired', 'TTL passed without an answer after ' .. attempts
      .. ' deliveries; last: ' .. why, instance, at, h.entry, attempts, {{}})
    forget(h.id, h.imei)
    return 'expired'
  end
  redis.call('HSET', qkey(h.id), 'state', 'queued', 'instance', '', 'attempts', attempts)
  redis.call('ZADD', EXPIRY, h.expires, h.id)
  return 'requeued'
end
"""
)


def _script(body: str) -> Script:
    return Script(_PRELUDE + body)


# KEYS[1] commands:queue. ARGV: 1 group, 2 entry id, 3 results maxlen, 4 at, 5 instance,
# 6 id, 7 imei, 8 refusal ('' = accept), 9 max per device, 10 max total, 11 kind (text|hex),
# 12 payload, 13 codec, 14 timeout ms, 15 ttl ms, 16 max attempts.
# -> {'duplicate'} (entry no longer pending: already handled), {'invalid', reason},
#    {'expired'} (older than its TTL already), {'queued', holder or '', position}
ACCEPT = _script(
    """
local group, entry, maxlen, at, me = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local pending = redis.pcall('XPENDING', KEYS[1], group, entry, entry, 1)
if type(pending) == 'table' and pending['err'] == nil and #pending == 0 then
  return {'duplicate'}
end
local function done()
  redis.pcall('XACK', KEYS[1], group, entry)
  redis.pcall('XDEL', KEYS[1], entry)
end
local id, imei = ARGV[6], ARGV[7]
local function refuse(reason)
  record(maxlen, id, imei, 'invalid', reason, me, at, entry, 0, {})
  done()
  return {'invalid', reason}
end
if ARGV[8] ~= '' then return refuse(ARGV[8]) end
if redis.call('EXISTS', qkey(id)) == 1 then
  return refuse('invalid command entry: a command with id ' .. id .. ' is already queued')
end
-- the TTL runs from when the entry was added (its id: Redis's clock), not from now: an entry
-- that waited unread (no instance running) is not given a new lease of life
local now = now_ms()
local score, slot = slot_of(entry, id)
local expires = score + tonumber(ARGV[15])
if now >= expires then
  record(maxlen, id, imei, 'expired', 'expired before it was stored: the entry is '
    .. math.floor((now - score) / 1000) .. ' s old, past its TTL', me, at, entry, 0, {})
  done()
  return {'expired'}
end
local depth = redis.call('ZCARD', dkey(imei))
if depth >= tonumber(ARGV[9]) then
  return refuse('queue full: ' .. depth .. ' commands already queued for this IMEI '
    .. '(--command-queue-max-per-device ' .. ARGV[9] .. ')')
end
local total = redis.call('ZCARD', EXPIRY)
if total >= tonumber(ARGV[10]) then
  return refuse('queue full: ' .. total .. ' commands queued in all '
    .. '(--command-queue-max-total ' .. ARGV[10] .. ')')
end
redis.call('HSET', qkey(id), 'id', id, 'imei', imei, 'entry', entry, 'slot', slot, 'kind', ARGV[11],
  'payload', ARGV[12], 'codec', ARGV[13], 'timeout_ms', ARGV[14], 'expires', expires,
  'max_attempts', ARGV[16], 'attempts', 0, 'state', 'queued', 'instance', '',
  'enqueued', score)
redis.call('ZADD', dkey(imei), score, slot)
redis.call('ZADD', EXPIRY, expires, id)
done()
return {'queued', wake(imei), depth + 1}
"""
)

# Take the head of a device's queue for delivery on this instance. A head already being
# delivered (by another instance, or by this one on an earlier connection) is taken over:
# the device is here now, so that delivery's answer can never arrive; it counts as an
# unanswered attempt. Heads that are due (failed, expired) are recorded and skipped.
# Only the instance the registry names (or any, when the registry has no field: its write
# was lost) claims: a stale connection left on another instance never takes a command over.
# A head being delivered is taken over only when forced (ARGV[6] = '1'); else 'busy'.
# ARGV: 1 imei, 2 instance, 3 results maxlen, 4 at, 5 lease grace ms, 6 force ('1' | '').
# -> {'empty' | 'waiting', settled statuses joined by ','}, {'elsewhere' | 'busy', instance}, or
#    {'deliver', settled, id, kind, payload, codec, timeout ms, attempt, max attempts,
#     enqueued ms, now ms, previous holder or ''}
CLAIM = _script(
    """
local imei, me, maxlen, at = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local holder = redis.call('HGET', '"""
    + REGISTRY_KEY
    + """', imei)
if holder and holder ~= me then return {'elsewhere', holder} end
local settled = {}
local now = now_ms()
local function earlier_for(imei, entry)
  local older = redis.call('XRANGE', '"""
    + QUEUE_KEY
    + """', '-', '(' .. entry, 'COUNT', 1000)
  for _, e in ipairs(older) do
    local f = e[2]
    for i = 1, #f - 1, 2 do
      if f[i] == 'imei' and f[i + 1] == imei then return true end
    end
  end
  return false
end
while true do
  local head = redis.call('ZRANGE', dkey(imei), 0, 0)[1]
  if not head then return {'empty', table.concat(settled, ',')} end
  local id = id_of(head)
  local h = load(qkey(id))
  if h.id == nil then
    redis.call('ZREM', dkey(imei), head)
    redis.call('ZREM', EXPIRY, id)
  else
    local attempts = tonumber(h.attempts)
    local previous = ''
    local status = nil
    if h.state == 'delivering' and ARGV[6] ~= '1' then
      -- its instance may be recording the answer that arrived just before the device moved:
      -- the caller asks again (forcing) after a grace period
      return {'busy', h.instance}
    elseif h.state == 'delivering' then
      previous = h.instance
      status = unanswered(h, attempts, now, maxlen, me, at,
        'the device reconnected (to ' .. me .. ') before answering the delivery by ' .. previous)
      if status == 'requeued' then status = nil end
    elseif now >= tonumber(h.expires) then
      record(maxlen, id, imei, 'expired', 'not delivered within its TTL', me, at, h.entry,
        attempts, {})
      forget(id, imei)
      status = 'expired'
    end
    if status then
      settled[#settled + 1] = status
    elseif earlier_for(imei, h.entry) then
      -- an earlier entry for this device is not stored yet (another instance is on it):
      -- it goes first; storing it wakes the holder again
      return {'waiting', table.concat(settled, ',')}
    else
      attempts = attempts + 1
      redis.call('HSET', qkey(id), 'state', 'delivering', 'instance', me, 'attempts', attempts,
        'claimed', now)
      redis.call('ZADD', EXPIRY, now + tonumber(h.timeout_ms) + tonumber(ARGV[5]), id)
      return {'deliver', table.concat(settled, ','), id, h.kind, h.payload, h.codec, h.timeout_ms,
        attempts, h.max_attempts, h.enqueued, now, previous}
    end
  end
end
"""
)

# The command was written to the device: its lease runs from now.
# ARGV: 1 id, 2 instance, 3 attempt, 4 lease grace ms.  -> 1, or 0 when fenced
WRITTEN = _script(
    """
local h = load(qkey(ARGV[1]))
if h.state ~= 'delivering' or h.instance ~= ARGV[2] or h.attempts ~= ARGV[3] then return 0 end
local now = now_ms()
redis.call('HSET', qkey(ARGV[1]), 'written', now)
redis.call('ZADD', EXPIRY, now + tonumber(h.timeout_ms) + tonumber(ARGV[4]), ARGV[1])
return 1
"""
)

# End a delivery of this instance. ARGV: 1 id, 2 instance, 3 attempt, 4 results maxlen,
# 5 at, 6 how ('answer' | 'unanswered' | 'unsent'), 7 status (answer: ok | nack),
# 8 response (answer) or why (the others), 9.. extra outcome fields (answer).
# -> {'fenced'} (no longer this delivery: taken over, swept, cancelled ...), {'ok'|'nack',
#    results entry id}, {'failed'}, {'expired'}, {'requeued'}
SETTLE = _script(
    """
local id, me, attempt, maxlen, at = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local h = load(qkey(id))
if h.state ~= 'delivering' or h.instance ~= me or h.attempts ~= attempt then
  return {'fenced'}
end
-- the device may have moved on meanwhile: its new holder may deliver the next one now
local function wake_elsewhere()
  local holder = redis.call('HGET', '"""
    + REGISTRY_KEY
    + """', h.imei)
  if holder and holder ~= me then wake(h.imei) end
end
local how = ARGV[6]
if how == 'answer' then
  local extra = {}
  for i = 9, #ARGV do extra[#extra + 1] = ARGV[i] end
  local rid = record(maxlen, id, h.imei, ARGV[7], ARGV[8], me, at, h.entry, attempt, extra)
  forget(id, h.imei)
  wake_elsewhere()
  return {ARGV[7], rid}
end
local attempts = tonumber(attempt)
if how == 'unsent' then attempts = attempts - 1 end
local status = unanswered(h, attempts, now_ms(), maxlen, me, at, ARGV[8])
wake_elsewhere()
return {status}
"""
)

# Expire what is due in the expiry index, one page: queued commands past their TTL get
# 'expired'; deliveries past their lease (their instance died or lost Redis) count as
# unanswered and are failed, expired or put back (and the holder woken).
# ARGV: 1 results maxlen, 2 at, 3 page size, 4 instance.
# -> {due, expired, failed, requeued, depth}
SWEEP = _script(
    """
local maxlen, at, me = ARGV[1], ARGV[2], ARGV[4]
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local n = {expired = 0, failed = 0, requeued = 0}
for _, id in ipairs(ids) do
  local h = load(qkey(id))
  if h.id == nil then
    redis.call('ZREM', EXPIRY, id)
  elseif h.state == 'delivering' then
    local status = unanswered(h, tonumber(h.attempts), now, maxlen, me, at,
      'no outcome from instance ' .. h.instance .. ' within the delivery lease')
    n[status] = n[status] + 1
    if status == 'requeued' then wake(h.imei) end
  elseif now >= tonumber(h.expires) then
    record(maxlen, id, h.imei, 'expired', 'not delivered within its TTL', me, at, h.entry,
      h.attempts, {})
    forget(id, h.imei)
    n.expired = n.expired + 1
  else
    redis.call('ZADD', EXPIRY, h.expires, id)  -- index out of step with the hash: repair
  end
end
return {#ids, n.expired, n.failed, n.requeued, redis.call('ZCARD', EXPIRY)}
"""
)

# Cancel a queued command (not one being delivered: it may already be on the device).
# KEYS[1] commands:queue. ARGV: 1 id, 2 instance (or 'cli'), 3 results maxlen, 4 at,
# 5 group, 6 the cancel entry's id ('' when not from the stream: nothing to acknowledge).
# -> {'cancelled', results entry id, imei}, {'delivering', instance, attempt}, {'unknown'}
CANCEL = _script(
    """
local id, me, maxlen, at = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if ARGV[6] ~= '' then
  redis.pcall('XACK', KEYS[1], ARGV[5], ARGV[6])
  redis.pcall('XDEL', KEYS[1], ARGV[6])
end
local h = load(qkey(id))
if h.id == nil then return {'unknown'} end
if h.state == 'delivering' then return {'delivering', h.instance, h.attempts} end
local rid = record(maxlen, id, h.imei, 'cancelled', 'cancelled before delivery', me, at, h.entry,
  h.attempts, {})
forget(id, h.imei)
return {'cancelled', rid, h.imei}
"""
)


def cancel_args(
    command_id: str,
    by: str,
    at: str,
    *,
    results_maxlen: int | str,
    group: str = "",
    entry: str = "",
) -> tuple[list[str], list[Any]]:
    """(keys, args) of :data:`CANCEL`."""
    return [QUEUE_KEY], [command_id, by, results_maxlen, at, group, entry]
