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

Exit status: 0 ok, 1 error (Redis unreachable, bad arguments), 2 usage, 3 not_connected,
4 timeout, 5 nack, 6 invalid, 7 no outcome seen within --wait, 130 interrupted.
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_CONNECTED = 3
EXIT_TIMEOUT = 4
EXIT_NACK = 5
EXIT_INVALID = 6
EXIT_NO_OUTCOME = 7
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    "ok": EXIT_OK,
    "not_connected": EXIT_NOT_CONNECTED,
    "timeout": EXIT_TIMEOUT,
    "nack": EXIT_NACK,
    "invalid": EXIT_INVALID,
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
    parser.set_defaults(handler=run)
    return parser


#: the name ``cli.py`` looks for in subcommand modules
register = add_parser


def run(args: argparse.Namespace) -> int:
    """Handler of ``teltonika-ingest command``; returns the exit status."""
    try:
        fields, request_id = _command_fields(args)
        target = redis_target(args)
    except CliError as e:
        print(f"teltonika-ingest command: {e}", file=sys.stderr)
        return EXIT_ERROR
    wait = args.wait if args.wait is not None else 2 * args.timeout + 10
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
        return await _send(client, reactor, args, fields, request_id, wait, state)

    return run_on_reactor("teltonika-ingest command", target, body, interrupted)


# --------------------------------------------------------------------------- arguments


def _command_fields(args: argparse.Namespace) -> tuple[list[str], str]:
    """The stream entry's fields, checked as the service will check them."""
    from teltonika_ingest.server.commands.entries import InvalidCommand, parse_entry

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
    try:
        # the length limit is the service's --max-command-length: it checks that one
        parse_entry(fields, max_length=1 << 30, default_timeout=args.timeout)
    except InvalidCommand as e:
        raise CliError(str(e)) from None
    return fields, request_id


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
    deadline = reactor.seconds() + wait
    while True:
        remaining = deadline - reactor.seconds()
        if remaining <= 0:
            print(
                f"teltonika-ingest command: no outcome within {wait:g} s for command "
                f"{request_id} (entry {entry_id} in {stream}); it may still be pending, "
                "e.g. if that instance stopped",
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
