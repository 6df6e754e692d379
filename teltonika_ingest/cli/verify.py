"""``teltonika-ingest verify ACKLOG...``: check that no ACKed record is missing from the stream.

Reads one or more ACK logs (what devices were ACKed: JSON lines ``{"imei": ..., "ts": ...}``,
``ts`` a number or a list, with the ACK time ``at`` in ms that ``--since`` reads; or CSV
``imei,ts``; ``teltonika-ingest simulate --ack-log FILE`` writes one) and the telemetry
stream (``XRANGE`` in batches), and reports:

  missing      ACKed records not in the stream: must be 0 (exit status 2 otherwise)
  duplicates   extra copies of a record in the stream: allowed (resend after a lost ACK)
  never ACKed  records in the stream the log has no ACK for: allowed (the ACK was lost)

A stream trimmed by ``--stream-maxlen`` (or XDEL) loses old entries by design: the report
says so when Redis shows entries were removed, so that trimming is not mistaken for loss.

On a terminal, stderr shows how far the stream has been read.

Exit status: 0 nothing missing, 2 records missing, 1 error (unreadable log, no Redis).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from teltonika_ingest.cli.progress import Progress
from teltonika_ingest.redis.blocking import CliError, add_redis_arguments, redis_target

PROG = "teltonika-ingest verify"
EXIT_MISSING = 2


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "verify",
        help="check an ACK log against the telemetry stream (missing must be 0)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "ack_logs", nargs="+", metavar="ACKLOG", help="ACK log file(s); - reads stdin"
    )
    add_redis_arguments(parser)
    parser.add_argument(
        "--stream",
        default=None,
        help="telemetry stream (default: $REDIS_TELEMETRY_STREAM or telemetry:teltonika)",
    )
    parser.add_argument(
        "--since",
        default=None,
        metavar="TIME",
        help="only ACKs received at or after TIME (ms since the epoch or ISO 8601; uses the "
        "log's 'at' field), e.g. the moment a Redis that lost its data came back",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=10_000,
        metavar="N",
        help="entries per XRANGE call (default %(default)s)",
    )
    parser.add_argument(
        "--show", type=int, default=20, metavar="N", help="list up to N missing records"
    )
    parser.add_argument("--json", action="store_true", help="the report as one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from teltonika_ingest.sim.invariant import (
        DEFAULT_STREAM,
        SyncRedisError,
        parse_ts,
        verify,
    )

    try:
        if args.batch <= 0:
            raise CliError("--batch must be positive")
        since = None
        if args.since is not None:
            try:
                since = parse_ts(args.since)
            except ValueError:
                raise CliError(f"--since: not a time: {args.since!r}") from None
        target = redis_target(args)
        stream = args.stream or os.environ.get("REDIS_TELEMETRY_STREAM") or DEFAULT_STREAM
        progress = Progress("verify: stream entries read")
        try:
            report = verify(
                target,
                args.ack_logs,
                stream=stream,
                batch=args.batch,
                since_ms=since,
                sample=max(0, args.show),
                progress=progress.update,
            )
        finally:
            progress.close()
    except CliError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, SyncRedisError) as e:
        print(f"{PROG}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(report.as_dict()).decode() + "\n")
    else:
        sys.stdout.write(f"stream {stream}\n{report.summary()}\n")
    sys.stdout.flush()
    return 0 if report.ok else EXIT_MISSING
