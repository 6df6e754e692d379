"""Command outcomes into ``commands:results`` (contract.md §4), kept and retried until written.

The :class:`OutcomeWriter` is handed each decided outcome by the router: it counts it
(``teltonika_commands_total``), logs it, and writes it with one Lua script
(:data:`RECORD_OUTCOME`) that adds the outcome and acknowledges the command entry together.
The script first checks that the entry is still pending in the group, so a retry after a lost
reply never writes a second outcome, and an entry whose outcome was written is never read again.

A write that fails is kept and retried with a doubling delay (``retry_min`` .. ``retry_max``)
until Redis takes it; until then the entry stays pending in the group. The router learns of
each written outcome through ``on_written`` (to release the entry it holds).

Device messages (Codec 13, or an answer with no command in flight) go the same way, with no
entry to acknowledge; at most ``max_messages_unwritten`` wait at once, further ones are
dropped with a warning (they have no entry that would bring them back).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika_ingest.codec import CommandMessage, format_timestamp
from teltonika_ingest.redis.client import Script
from teltonika_ingest.redis.trim import TRIM_TO_BYTES
from teltonika_ingest.server.commands.entries import GROUP, RESULTS_KEY, RESULTS_MAXLEN
from teltonika_ingest.server.metrics import Metrics

__all__ = ["RECORD_OUTCOME", "Outcome", "OutcomeWriter"]

log = Logger()

# KEYS[1] results stream, KEYS[2] command stream.
# ARGV[1] results MAXLEN (~), ARGV[2] group, ARGV[3] command entry id ('' for device
# messages), ARGV[4] most bytes of the results stream ('0': no byte bound), ARGV[5..] the
# outcome's field/value pairs.
# Returns the new results entry id, or 0 when the entry is no longer pending in the group
# (its outcome was already recorded: this is a retry of a write whose reply was lost).
# If the group or the stream is gone (XPENDING fails), the outcome is written anyway.
RECORD_OUTCOME = Script(
    TRIM_TO_BYTES
    + """
local entry = ARGV[3]
if entry ~= '' then
  local pending = redis.pcall('XPENDING', KEYS[2], ARGV[2], entry, entry, 1)
  if type(pending) == 'table' and pending['err'] == nil and #pending == 0 then
    return 0
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 5))
if entry ~= '' then
  redis.pcall('XACK', KEYS[2], ARGV[2], entry)
end
trim_to_bytes(KEYS[1], ARGV[4])
return id
"""
)


@attrs.define(eq=False)
class Outcome:
    """A decided outcome waiting to be written (kept and retried until Redis takes it)."""

    key: str
    entry_id: str  # "" for device messages
    status: str
    fields: list[str]
    writing: bool = False
    failures: int = 0


def _is_printable_response(payload: bytes) -> bool:
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        return False
    return all(" " <= c <= "~" or c in "\r\n\t" for c in text)


class OutcomeWriter:
    """Writes decided outcomes to the results stream, retrying each until Redis takes it.

    * ``writer``: the service's shared ``RedisClient`` (anything with ``run_script``).
    * ``clock``: IReactorTime, for the ``at`` field and the retry delays.
    * ``stream_key``: the command stream whose entries the outcomes acknowledge.
    * ``on_written``: called with each outcome once Redis has taken it.
    """

    #: bounds of the delay between retries of a failed write
    retry_min = 0.2
    retry_max = 30.0

    def __init__(
        self,
        writer: Any,
        *,
        clock: Any,
        instance_id: str,
        stream_key: str,
        metrics: Metrics,
        results_key: str = RESULTS_KEY,
        results_maxlen: int = RESULTS_MAXLEN,
        results_max_bytes: int = 0,
        max_messages_unwritten: int = 10_000,
        on_written: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.writer = writer
        self.clock = clock
        self.instance_id = instance_id
        self.stream_key = stream_key
        self.metrics = metrics
        self.results_key = results_key
        self.results_maxlen = results_maxlen
        #: the results stream's byte bound (0: entries only)
        self.results_max_bytes = results_max_bytes
        self.max_messages_unwritten = max_messages_unwritten
        self.on_written = on_written
        #: key -> outcome not yet written (commands by entry id, messages by "msg:N")
        self._outbox: dict[str, Outcome] = {}
        self._messages_unwritten = 0
        self._message_seq = 0
        self._retry_call: Any = None
        self._retry_delay = self.retry_min
        self._flush_waiters: list[defer.Deferred[None]] = []
        self._closed = False

    @property
    def unwritten(self) -> int:
        """Outcomes decided and not yet written."""
        return len(self._outbox)

    @property
    def unwritten_entries(self) -> int:
        """Outcomes of command entries (not device messages) not yet written."""
        return len(self._outbox) - self._messages_unwritten

    def holds(self, entry_id: str) -> bool:
        """Whether the outcome of this command entry is decided and not yet written."""
        return entry_id in self._outbox

    # ------------------------------------------------------------------ deciding

    def record(
        self,
        entry_id: str,
        cid: str,
        imei: str,
        status: str,
        response: str,
        *,
        payload: bytes | None = None,
        binary: bool = False,
        extra: Sequence[str] = (),
        key: str | None = None,
    ) -> Outcome | None:
        """Decide an outcome: count it, log it, and write it (retrying until Redis takes it).

        Returns the outcome being written, or None once closed (counted and logged only)."""
        self.metrics.commands.labels(status=status).inc()
        fields = [
            "id", cid,
            "imei", imei,
            "status", status,
            "response", response,
            "instance_id", self.instance_id,
            "at", format_timestamp(int(self.clock.seconds() * 1000)),
        ]  # fmt: skip
        if payload is not None and (binary or not _is_printable_response(payload)):
            fields += ["response_b64", base64.b64encode(payload).decode("ascii")]
        if entry_id:
            fields += ["entry_id", entry_id]
        fields += extra
        level = log.info if status in ("ok", "message") else log.warn
        level(
            "command outcome {status} for {id} ({imei}, entry {entry}): {response}",
            status=status,
            id=cid or "-",
            imei=imei or "-",
            entry=entry_id or "-",
            response=response[:200],
        )
        if self._closed:
            return None
        outcome = Outcome(key or entry_id, entry_id, status, fields)
        if not entry_id:
            self._messages_unwritten += 1
        self._outbox[outcome.key] = outcome
        self._write(outcome)
        return outcome

    def message(self, imei: str, message: CommandMessage) -> None:
        """Record a message a device sent on its own (no command entry to acknowledge)."""
        if self._closed:
            return
        if self._messages_unwritten >= self.max_messages_unwritten:
            log.warn(
                "dropping a Codec {codec} message from {imei}: {n} device messages await Redis",
                codec=message.codec,
                imei=imei,
                n=self._messages_unwritten,
            )
            return
        extra = ["codec", message.codec]
        if message.timestamp_ms is not None:
            extra += ["device_ts", format_timestamp(message.timestamp_ms)]
        self._message_seq += 1
        self.record(
            "",
            "",
            imei,
            "message",
            message.text,
            payload=message.payload,
            extra=extra,
            key=f"msg:{self._message_seq}",
        )

    # ------------------------------------------------------------------ shutdown

    def flush(self) -> defer.Deferred[None]:
        """Fires once every decided outcome is written (a pending retry runs now)."""
        done: defer.Deferred[None] = defer.Deferred()
        if not self._outbox:
            done.callback(None)
            return done
        self._flush_waiters.append(done)
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.reset(0)  # retry now rather than after the backoff
        return done

    def close(self) -> int:
        """Stop writing: drop the retry timer and the outcomes still unwritten (their entries
        stay pending in the group). Returns how many were dropped."""
        self._closed = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        unwritten = len(self._outbox)
        self._outbox.clear()
        self._messages_unwritten = 0
        return unwritten

    # ------------------------------------------------------------------ writing

    def _write(self, outcome: Outcome) -> None:
        outcome.writing = True
        try:
            d = self.writer.run_script(
                RECORD_OUTCOME,
                [self.results_key, self.stream_key],
                [
                    self.results_maxlen,
                    GROUP,
                    outcome.entry_id,
                    self.results_max_bytes,
                    *outcome.fields,
                ],
            )
        except Exception:
            d = defer.fail(Failure())
        d.addCallbacks(self._written, self._write_failed, (outcome,), None, (outcome,))
        d.addErrback(lambda f: log.failure("recording a command outcome", failure=f))

    def _written(self, reply: Any, outcome: Outcome) -> None:
        outcome.writing = False
        if self._outbox.get(outcome.key) is not outcome:
            return  # closed meanwhile
        del self._outbox[outcome.key]
        if not outcome.entry_id:
            self._messages_unwritten -= 1
        self._retry_delay = self.retry_min
        if reply == 0 or reply == "0":
            log.info(
                "outcome of entry {entry} was already recorded (a retried write); not repeated",
                entry=outcome.entry_id,
            )
        if outcome.failures:
            log.info(
                "recorded the {status} outcome of {entry} after {n} failed attempts",
                status=outcome.status,
                entry=outcome.entry_id or outcome.key,
                n=outcome.failures,
            )
        if self.on_written is not None:
            self.on_written(outcome)
        if not self._outbox:
            waiters, self._flush_waiters = self._flush_waiters, []
            for w in waiters:
                if not w.called:
                    w.callback(None)

    def _write_failed(self, failure: Failure, outcome: Outcome) -> None:
        outcome.writing = False
        if self._outbox.get(outcome.key) is not outcome:
            return
        outcome.failures += 1
        if outcome.failures == 1:
            log.warn(
                "could not record the {status} outcome of {entry} yet ({error}); kept and "
                "retried, the entry stays pending until then",
                status=outcome.status,
                entry=outcome.entry_id or outcome.key,
                error=failure.getErrorMessage() or repr(failure.value),
            )
        if self._retry_call is None or not self._retry_call.active():
            delay = self._retry_delay
            self._retry_delay = min(delay * 2, self.retry_max)
            self._retry_call = self.clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        if self._closed:
            return
        for outcome in list(self._outbox.values()):
            if not outcome.writing:
                self._write(outcome)
