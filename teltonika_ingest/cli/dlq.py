"""``teltonika-ingest dlq list|replay``: inspect the dead-letter stream and replay it.

Frames that passed their CRC but could not be decoded are kept whole in
``<stream>:dlq`` (contract.md §2) and were ACKed, so the device moved on. Once the decoder
is fixed (a new codec, a firmware quirk), ``replay`` decodes each entry again with the
current code and, for those that now decode, adds their records to the telemetry stream
exactly as the service would (same fields, same payload, the original ``received_at``) and
deletes them from the dead-letter stream. Entries that still fail stay where they are.
"""

from __future__ import annotations

import argparse
import base64
import sys
from datetime import datetime
from typing import Any

from teltonika_ingest.redis.blocking import (
    CliError,
    add_redis_arguments,
    as_dict,
    redis_target,
    run_on_reactor,
)

PROG = "teltonika-ingest dlq"
DEFAULT_STREAM = "telemetry:teltonika"


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dlq",
        help="inspect and replay the dead-letter stream (<stream>:dlq)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="dlq_action", metavar="ACTION", required=True)
    for name, help_text in (
        ("list", "print dead-lettered frames, one JSON object per line"),
        ("replay", "decode dead-lettered frames again and publish those that now decode"),
    ):
        sub = actions.add_parser(name, help=help_text, description=help_text)
        add_redis_arguments(sub)
        sub.add_argument(
            "--stream",
            default=None,
            help="telemetry stream (default: $REDIS_TELEMETRY_STREAM or telemetry:teltonika)",
        )
        sub.add_argument(
            "--count", type=int, default=1000, help="at most this many entries (default 1000)"
        )
        if name == "replay":
            sub.add_argument(
                "--dry-run",
                action="store_true",
                help="only report what would be replayed; change nothing",
            )
            sub.add_argument(
                "--keep",
                action="store_true",
                help="leave replayed entries in the dead-letter stream",
            )
            sub.add_argument(
                "--maxlen",
                type=int,
                default=1000000,
                help="MAXLEN ~ for the telemetry stream, as the service's --stream-maxlen",
            )
        sub.set_defaults(handler=run)


def _stream(args: argparse.Namespace) -> str:
    import os

    return str(args.stream or os.environ.get("REDIS_TELEMETRY_STREAM") or DEFAULT_STREAM)


def run(args: argparse.Namespace) -> int:
    try:
        target = redis_target(args)
    except CliError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if args.count <= 0:
        print(f"{PROG}: --count must be positive", file=sys.stderr)
        return 1
    stream = _stream(args)
    if args.dlq_action == "list":

        async def body(client: Any, reactor: Any, state: dict[str, Any]) -> int:
            return await _list(client, stream + ":dlq", args.count)

    else:

        async def body(client: Any, reactor: Any, state: dict[str, Any]) -> int:
            return await _replay(client, stream, args)

    return run_on_reactor(PROG, target, body)


def _emit(obj: dict[str, Any]) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(obj).decode() + "\n")


async def _entries(client: Any, key: str, count: int) -> list[tuple[str, dict[str, str]]]:
    reply = await client.execute("XRANGE", key, "-", "+", "COUNT", count)
    return [(str(entry_id), as_dict(flat)) for entry_id, flat in reply or ()]


async def _list(client: Any, key: str, count: int) -> int:
    for entry_id, fields in await _entries(client, key, count):
        raw_b64 = fields.get("raw_b64", "")
        fields["bytes"] = str(len(base64.b64decode(raw_b64))) if raw_b64 else "0"
        _emit({"entry_id": entry_id, **fields})
    sys.stdout.flush()
    return 0


def _received_ms(received_at: str) -> int:
    when = datetime.fromisoformat(received_at.replace("Z", "+00:00"))
    return round(when.timestamp() * 1000)


async def _replay(client: Any, stream: str, args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from teltonika_ingest.server.metrics import Metrics
    from teltonika_ingest.server.publisher import Publisher

    dlq = stream + ":dlq"
    publisher = Publisher(
        client,
        stream=stream,
        maxlen=args.maxlen,
        max_inflight=1,
        metrics=Metrics(),
        clock=reactor,
        instance_id="dlq-replay",
    )
    from teltonika_ingest.cli.progress import Progress

    entries = await _entries(client, dlq, args.count)
    counts = [0, 0, 0]
    progress = Progress("dlq replay: entries")
    try:
        await _replay_entries(client, publisher, dlq, entries, args, progress, counts)
    finally:
        progress.close()
    replayed, still_failing, skipped = counts
    verb = "would replay" if args.dry_run else "replayed"
    print(
        f"{PROG}: {verb} {replayed}, still failing {still_failing}, skipped {skipped}",
        file=sys.stderr,
    )
    sys.stdout.flush()
    return 0 if still_failing == 0 else 2


async def _replay_entries(
    client: Any,
    publisher: Any,
    dlq: str,
    entries: list[tuple[str, dict[str, str]]],
    args: argparse.Namespace,
    progress: Any,
    counts: list[int],
) -> None:
    """Replay ``entries``; ``counts``: replayed, still failing, skipped (updated as it goes)."""
    from teltonika_ingest.codec import AVL_CODECS, CodecError, decode_avl_frame

    for done, (entry_id, fields) in enumerate(entries):
        progress.update(done, len(entries))
        imei = fields.get("imei", "")
        try:
            raw = base64.b64decode(fields.get("raw_b64", ""), validate=True)
            packet = decode_avl_frame(raw)
        except (CodecError, ValueError) as e:
            counts[1] += 1
            _emit({"entry_id": entry_id, "imei": imei, "result": "still_failing", "reason": str(e)})
            continue
        if packet.codec not in AVL_CODECS:  # pragma: no cover - decode_avl_frame ensures it
            counts[2] += 1
            continue
        if args.dry_run:
            counts[0] += 1
            _emit(
                {"entry_id": entry_id, "imei": imei, "result": "would_replay",
                 "codec": packet.codec, "records": len(packet.records)}
            )  # fmt: skip
            continue
        try:
            received = _received_ms(fields.get("received_at", ""))
        except ValueError:
            received = int(datetime.now().timestamp() * 1000)
        await publisher.publish(imei, packet, received)
        if not args.keep:
            await client.execute("XDEL", dlq, entry_id)
        counts[0] += 1
        _emit(
            {"entry_id": entry_id, "imei": imei, "result": "replayed", "codec": packet.codec,
             "records": len(packet.records)}
        )  # fmt: skip
    progress.update(len(entries), len(entries), final=True)
