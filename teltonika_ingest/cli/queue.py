"""``teltonika-ingest commands list [IMEI]`` and ``commands cancel ID``: the command queue.

Reads the queued commands' keys (OPERATIONS.md, "Queued commands") and cancels one with the
service's own ``CANCEL`` script, so a cancel works even while no instance runs and its
``cancelled`` outcome is written exactly once (``instance_id`` ``cli``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from teltonika_ingest.redis.blocking import (
    CliError,
    add_redis_arguments,
    as_dict,
    redis_target,
    run_on_reactor,
)

DESCRIPTION = """\
The queued commands (teltonika-ingest command --queue, or XADD commands:queue): list them,
or cancel one that is still waiting.

Exit status of cancel: 0 cancelled, 1 error, 3 no such queued command (unknown, or it already
has its outcome), 4 not cancelled: it is being delivered (it gets its own outcome).
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNKNOWN = 3
EXIT_DELIVERING = 4


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "commands",
        help="list or cancel queued commands",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="queued commands of one IMEI, or the first of all")
    listing.add_argument("imei", metavar="IMEI", nargs="?", help="only this device's, in order")
    listing.add_argument(
        "--limit",
        type=int,
        default=100,
        metavar="N",
        help="without IMEI: at most N commands, those expiring first (default 100)",
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per command")
    add_redis_arguments(listing)
    listing.set_defaults(handler=run_list)
    cancel = actions.add_parser("cancel", help="cancel a queued command that is still waiting")
    cancel.add_argument("id", metavar="ID", help="the command's id")
    add_redis_arguments(cancel)
    cancel.set_defaults(handler=run_cancel)
    return parser


register = add_parser


def _target(args: argparse.Namespace, prog: str) -> Any:
    try:
        return redis_target(args)
    except CliError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None


def _iso(ms: str | None) -> str:
    from teltonika_ingest.codec import format_timestamp

    return format_timestamp(int(ms)) if ms and ms.isdigit() else "-"


# --------------------------------------------------------------------------- list


def run_list(args: argparse.Namespace) -> int:
    prog = "teltonika-ingest commands list"
    target = _target(args, prog)
    if target is None:
        return EXIT_ERROR

    async def body(client: Any, reactor: Any, state: dict[str, Any]) -> int:
        from teltonika_ingest.server.commands.queue import EXPIRY_KEY, device_key, queued_key

        if args.imei:
            slots = await client.execute("ZRANGE", device_key(args.imei), 0, -1)
            ids = [str(s).split(":", 1)[1] for s in slots or ()]
        else:
            ids = [str(i) for i in await client.execute("ZRANGE", EXPIRY_KEY, 0, args.limit - 1)]
        total = int(await client.execute("ZCARD", EXPIRY_KEY))
        commands = []
        for cid in ids:
            fields = as_dict(await client.execute("HGETALL", queued_key(cid)))
            if fields:
                commands.append(fields)
        _print_list(args, commands, total)
        return EXIT_OK

    return run_on_reactor(prog, target, body)


def _print_list(args: argparse.Namespace, commands: list[dict[str, str]], total: int) -> None:
    if args.json:
        import orjson

        for c in commands:
            shown = {
                "id": c.get("id", ""),
                "imei": c.get("imei", ""),
                "state": c.get("state", ""),
                "instance_id": c.get("instance", ""),
                "attempts": int(c.get("attempts", "0")),
                "max_attempts": int(c.get("max_attempts", "0")),
                c.get("kind", "text"): c.get("payload", ""),
                "codec": c.get("codec", ""),
                "timeout_s": int(c.get("timeout_ms", "0")) / 1000,
                "queued_at": _iso(c.get("enqueued")),
                "expires_at": _iso(c.get("expires")),
                "entry_id": c.get("entry", ""),
            }
            sys.stdout.write(orjson.dumps(shown).decode() + "\n")
        return
    rows = [("ID", "IMEI", "STATE", "TRIES", "EXPIRES", "COMMAND")]
    for c in commands:
        state = c.get("state", "")
        if state == "delivering":
            state = f"delivering@{c.get('instance', '')}"
        payload = c.get("payload", "")
        rows.append(
            (
                c.get("id", ""),
                c.get("imei", ""),
                state,
                f"{c.get('attempts', '0')}/{c.get('max_attempts', '0')}",
                _iso(c.get("expires")),
                payload if c.get("kind") != "hex" else f"hex:{payload}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        cells = [r[i].ljust(widths[i]) for i in range(len(widths))]
        sys.stdout.write("  ".join([*cells, r[-1]]).rstrip() + "\n")
    where = f" for {args.imei}" if args.imei else ""
    sys.stdout.write(f"{len(commands)} shown{where}; {total} queued in all\n")


# --------------------------------------------------------------------------- cancel


def run_cancel(args: argparse.Namespace) -> int:
    prog = "teltonika-ingest commands cancel"
    target = _target(args, prog)
    if target is None:
        return EXIT_ERROR

    async def body(client: Any, reactor: Any, state: dict[str, Any]) -> int:
        from teltonika_ingest.codec import format_timestamp
        from teltonika_ingest.server.commands.entries import RESULTS_MAXLEN
        from teltonika_ingest.server.commands.queue import CANCEL, cancel_args

        at = format_timestamp(int(reactor.seconds() * 1000))
        keys, script_args = cancel_args(args.id, "cli", at, results_maxlen=RESULTS_MAXLEN)
        reply = [str(v) for v in await client.run_script(CANCEL, keys, script_args)]
        if reply[0] == "cancelled":
            sys.stdout.write(f"cancelled {args.id} ({reply[2]})\n")
            return EXIT_OK
        if reply[0] == "delivering":
            print(
                f"{prog}: {args.id} is being delivered by instance {reply[1]} (delivery "
                f"{reply[2]}): not cancelled; it gets its own outcome",
                file=sys.stderr,
            )
            return EXIT_DELIVERING
        print(
            f"{prog}: no queued command {args.id} (unknown, or it already has its outcome)",
            file=sys.stderr,
        )
        return EXIT_UNKNOWN

    return run_on_reactor(prog, target, body)
