"""``teltonika-ingest command IMEI TEXT``: send a GPRS command through Redis, print its outcome.

What the business plane does, by hand (contract.md §4): look up the instance holding the
device in ``connections:registry``, check that instance is alive (its heartbeat key), add the
command to ``commands:instance:{instance_id}``, then wait on ``commands:results`` for the entry
with this command's id and print it.
"""

from __future__ import annotations

import argparse
import base64
import sys
import uuid
from typing import Any

from teltonika_ingest.redis.blocking import (
    CliError,
    add_redis_arguments,
    as_dict,
    redis_target,
    run_on_reactor,
)

DESCRIPTION = """\
Send a GPRS command (Codec 12, or 14 with --codec 14) to a connected device and wait for
its outcome. The device must be connected to a running teltonika-ingest instance that
shares this Redis.

Output: for ok, the device's answer on stdout (for --hex, the answer in hex); otherwise
"STATUS: reason" on stderr. With --json, the whole commands:results entry as one JSON
object on stdout, whatever the status.

With --queue, the command is queued by IMEI (commands:queue) instead: it waits in Redis
until the device connects to any instance (at most --ttl), is delivered there, and is tried
again (up to --max-attempts) when a delivery gets no answer. --no-wait prints the command id
and returns at once; follow it with "teltonika-ingest commands list" / "commands cancel ID".

Exit status: 0 ok, 1 error (Redis unreachable, bad arguments), 2 usage, 3 not_connected,
4 timeout, 5 nack, 6 invalid, 7 no outcome seen within --wait, 8 expired, 9 failed,
10 cancelled, 130 interrupted.
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_CONNECTED = 3
EXIT_TIMEOUT = 4
EXIT_NACK = 5
EXIT_INVALID = 6
EXIT_NO_OUTCOME = 7
EXIT_EXPIRED = 8
EXIT_FAILED = 9
EXIT_CANCELLED = 10
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    "ok": EXIT_OK,
    "not_connected": EXIT_NOT_CONNECTED,
    "timeout": EXIT_TIMEOUT,
    "nack": EXIT_NACK,
    "invalid": EXIT_INVALID,
    "expired": EXIT_EXPIRED,
    "failed": EXIT_FAILED,
    "cancelled": EXIT_CANCELLED,
}

#: longest single XREAD BLOCK while waiting for the outcome
POLL_SECONDS = 5.0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "command",
        help="send a GPRS command to a connected device and wait for its outcome",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("imei", metavar="IMEI", help="the device's 15-digit IMEI")
    parser.add_argument(
        "text", metavar="TEXT", help='the command, e.g. "getinfo" (hex digits with --hex)'
    )
    parser.add_argument(
        "--codec", choices=("12", "14"), default="12", help="12 (default) or 14 (IMEI checked)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds the device has to answer, sent as timeout_s (default 30, at most 3600)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="S",
        help="seconds to wait for the outcome (default 2 x --timeout + 10: a command read "
        "late, e.g. after the instance restarted, gets its whole timeout from then)",
    )
    add_redis_arguments(parser)
    parser.add_argument(
        "--hex", action="store_true", help="TEXT is hex digits: send those bytes (binary command)"
    )
    parser.add_argument("--id", default=None, help="command id (default: cli- + a random UUID)")
    parser.add_argument(
        "--json", action="store_true", help="print the whole result entry as JSON on stdout"
    )
    queue = parser.add_argument_group("queued (by IMEI, delivered whenever the device connects)")
    queue.add_argument(
        "--queue",
        action="store_true",
        help="add to commands:queue instead of the holding instance's stream: the device "
        "need not be connected",
    )
    queue.add_argument(
        "--ttl",
        default=None,
        metavar="DURATION",
        help="how long the command may wait for delivery: 90, 90s, 15m, 1h, 2d (at most 30 "
        "days; default: the service's --command-queue-ttl, a day)",
    )
    queue.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        metavar="N",
        help="deliveries without an answer before it fails (1..100; default: the service's "
        "--command-queue-attempts, 3)",
    )
    queue.add_argument(
        "--no-wait",
        action="store_true",
        help="print the command id on stdout and return at once (exit 0 once queued)",
    )
    parser.set_defaults(handler=run)
    return parser


#: the name ``cli.py`` looks for in subcommand modules
register = add_parser


def run(args: argparse.Namespace) -> int:
    """Handler of ``teltonika-ingest command``; returns the exit status."""
    try:
        fields, request_id, ttl, attempts = _command_fields(args)
        target = redis_target(args)
    except CliError as e:
        print(f"teltonika-ingest command: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.queue:
        # the whole TTL, and every delivery's timeout after it
        default_wait = ttl + attempts * (args.timeout + 30) + 10
    else:
        default_wait = 2 * args.timeout + 10
    wait = args.wait if args.wait is not None else default_wait
    if not wait > 0:
        print("teltonika-ingest command: --wait must be positive", file=sys.stderr)
        return EXIT_ERROR

    def interrupted(state: dict[str, Any]) -> str:
        if "entry_id" not in state:
            return ""
        return (
            f" (entry {state['entry_id']} in {state['stream']}; its outcome will still be "
            "recorded in commands:results)"
        )

    async def body(client: Any, reactor: Any, state: dict[str, Any]) -> int:
        if args.queue:
            return await _enqueue(client, reactor, args, fields, request_id, wait, state)
        return await _send(client, reactor, args, fields, request_id, wait, state)

    return run_on_reactor("teltonika-ingest command", target, body, interrupted)


# --------------------------------------------------------------------------- arguments


#: what the service uses when an entry has no ttl_s / max_attempts (its defaults), for --wait
DEFAULT_TTL_S = 86400.0
DEFAULT_ATTEMPTS = 3


def _command_fields(args: argparse.Namespace) -> tuple[list[str], str, float, int]:
    """The stream entry's fields, checked as the service will check them; with the TTL and
    attempts a queued command has (defaults when not given)."""
    from teltonika_ingest.server.commands.entries import InvalidCommand, parse_entry
    from teltonika_ingest.server.commands.queue import (
        CancelRequest,
        parse_duration,
        parse_queue_entry,
    )

    request_id = args.id if args.id is not None else f"cli-{uuid.uuid4().hex}"
    payload_field = "hex" if args.hex else "text"
    text = args.text
    if args.hex:
        text = "".join(text.split()).removeprefix("0x").removeprefix("0X")
    fields = [
        "id", request_id,
        "imei", args.imei,
        payload_field, text,
        "codec", args.codec,
        "timeout_s", f"{args.timeout:g}",
    ]  # fmt: skip
    if not args.queue:
        if args.ttl is not None or args.max_attempts is not None or args.no_wait:
            raise CliError("--ttl, --max-attempts and --no-wait need --queue")
        try:
            # the length limit is the service's --max-command-length: it checks that one
            parse_entry(fields, max_length=1 << 30, default_timeout=args.timeout)
        except InvalidCommand as e:
            raise CliError(str(e)) from None
        return fields, request_id, 0.0, 0
    if args.ttl is not None:
        try:
            fields += ["ttl_s", f"{parse_duration(args.ttl):g}"]
        except ValueError as e:
            raise CliError(f"--ttl: {e}") from None
    if args.max_attempts is not None:
        fields += ["max_attempts", str(args.max_attempts)]
    try:
        queued = parse_queue_entry(
            fields,
            max_length=1 << 30,
            default_timeout=args.timeout,
            default_ttl=DEFAULT_TTL_S,
            default_attempts=DEFAULT_ATTEMPTS,
        )
    except InvalidCommand as e:
        raise CliError(str(e)) from None
    assert not isinstance(queued, CancelRequest)
    return fields, request_id, queued.ttl, queued.max_attempts


async def _send(
    client: Any,
    reactor: Any,
    args: argparse.Namespace,
    fields: list[str],
    request_id: str,
    wait: float,
    state: dict[str, Any],
) -> int:
    from teltonika_ingest.server.commands.entries import RESULTS_KEY, command_stream
    from teltonika_ingest.server.registry import REGISTRY_KEY, heartbeat_key

    imei = args.imei
    instance = await client.execute("HGET", REGISTRY_KEY, imei)
    if instance is None:
        return _report(
            args,
            _local_outcome(
                request_id, imei, "not_connected", "no instance holds a connection for this "
                f"IMEI ({REGISTRY_KEY} has no field {imei})",
            ),
        )  # fmt: skip
    instance = str(instance)
    if not await client.execute("EXISTS", heartbeat_key(instance)):
        return _report(
            args,
            _local_outcome(
                request_id, imei, "not_connected", f"{REGISTRY_KEY} names instance "
                f"{instance}, which has no heartbeat (stopped or dead); command not added",
                instance,
            ),
        )  # fmt: skip
    # Everything added to the results stream from now on is after this entry.
    last = await client.execute("XREVRANGE", RESULTS_KEY, "+", "-", "COUNT", 1)
    after = str(last[0][0]) if last else "0-0"
    stream = command_stream(instance)
    entry_id = str(await client.execute("XADD", stream, "*", *fields))
    state.update(entry_id=entry_id, stream=stream)
    return await _await_outcome(
        client, reactor, args, request_id, entry_id, after, wait,
        f"(entry {entry_id} in {stream}); it may still be pending, e.g. if that instance "
        "stopped",
    )  # fmt: skip


async def _enqueue(
    client: Any,
    reactor: Any,
    args: argparse.Namespace,
    fields: list[str],
    request_id: str,
    wait: float,
    state: dict[str, Any],
) -> int:
    """``--queue``: add to commands:queue; wait for the outcome unless --no-wait."""
    from teltonika_ingest.server.commands.entries import RESULTS_KEY
    from teltonika_ingest.server.commands.queue import QUEUE_KEY

    last = await client.execute("XREVRANGE", RESULTS_KEY, "+", "-", "COUNT", 1)
    after = str(last[0][0]) if last else "0-0"
    entry_id = str(await client.execute("XADD", QUEUE_KEY, "*", *fields))
    state.update(entry_id=entry_id, stream=QUEUE_KEY)
    if args.no_wait:
        sys.stdout.write(request_id + "\n")
        sys.stdout.flush()
        return EXIT_OK
    return await _await_outcome(
        client, reactor, args, request_id, entry_id, after, wait,
        f"(entry {entry_id} in {QUEUE_KEY}); it is still queued or being delivered: see "
        f"teltonika-ingest commands list {args.imei}",
    )  # fmt: skip


async def _await_outcome(
    client: Any,
    reactor: Any,
    args: argparse.Namespace,
    request_id: str,
    entry_id: str,
    after: str,
    wait: float,
    where: str,
) -> int:
    """Wait (at most ``wait`` s) for the outcome of ``request_id`` on commands:results."""
    from teltonika_ingest.server.commands.entries import RESULTS_KEY

    deadline = reactor.seconds() + wait
    while True:
        remaining = deadline - reactor.seconds()
        if remaining <= 0:
            print(
                f"teltonika-ingest command: no outcome within {wait:g} s for command "
                f"{request_id} {where}",
                file=sys.stderr,
            )
            return EXIT_NO_OUTCOME
        block = min(remaining, POLL_SECONDS)
        reply = await client.execute(
            "XREAD", "COUNT", 100, "BLOCK", max(1, int(block * 1000)),
            "STREAMS", RESULTS_KEY, after,
            timeout=block + 10,
        )  # fmt: skip
        for _key, entries in reply or ():
            for result_id, flat in entries:
                after = str(result_id)
                result = as_dict(flat)
                if result.get("id") == request_id and result.get("entry_id", entry_id) == (
                    entry_id
                ):
                    return _report(args, result)


def _local_outcome(
    request_id: str, imei: str, status: str, response: str, instance: str = ""
) -> dict[str, str]:
    return {
        "id": request_id,
        "imei": imei,
        "status": status,
        "response": response,
        "instance_id": instance,
    }


def _report(args: argparse.Namespace, result: dict[str, str]) -> int:
    status = result.get("status", "")
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    elif status == "ok":
        answer = result.get("response", "")
        if args.hex and "response_b64" in result:
            answer = base64.b64decode(result["response_b64"]).hex()
        sys.stdout.write(answer + "\n")
    else:
        print(f"{status}: {result.get('response', '')}", file=sys.stderr)
    sys.stdout.flush()
    return EXIT_CODES.get(status, EXIT_ERROR)


def main(argv: list[str] | None = None) -> int:
    """``python -m teltonika_ingest.cli.command IMEI TEXT ...`` (same as the subcommand)."""
    parser = argparse.ArgumentParser(prog="teltonika-ingest")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["command", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
