"""``teltonika-processor dlq list|replay``: the processor's dead-letter stream.

Entries that did not decode, or that PostgreSQL refused, ``--dlq-attempts`` times were moved
to ``<stream>:processor:dlq`` with the error and their delivery count, and acknowledged.
``list`` prints them, one JSON object per line. ``replay`` (once the cause is fixed: a
decoder change, a constraint dropped) adds each entry's original fields to the telemetry
stream again, where the processor picks them up as new entries, and deletes it from the
dead-letter stream. Entries that still do not decode stay, unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from teltonika_ingest.redis.blocking import CliError, as_dict, run_on_reactor

PROG = "teltonika-processor"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    dlq = commands.add_parser("dlq", help="inspect and replay the processor's dead letters")
    actions = dlq.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (
        ("list", "print dead-lettered entries, one JSON object per line"),
        ("replay", "add dead-lettered entries to the telemetry stream again"),
    ):
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--redis-url",
            metavar="URL",
            help="default: $REDIS_URL, else redis-url of the processor's config",
        )
        sub.add_argument(
            "--config",
            metavar="FILE",
            help="the processor's config file (default ./processor.conf if present)",
        )
        sub.add_argument("--stream", help="telemetry stream (default: the processor's --stream)")
        sub.add_argument("--count", type=int, default=1000, help="at most this many (1000)")
        if name == "replay":
            sub.add_argument("--dry-run", action="store_true", help="change nothing")
            sub.add_argument(
                "--force", action="store_true", help="replay entries that still do not decode, too"
            )
    return parser  # fmt: skip


def _settings(args: argparse.Namespace) -> tuple[Any, str]:
    from twisted.python import usage

    from teltonika_ingest.config import ProcessorConfig, RedisTarget

    argv = ["--config", args.config] if args.config is not None else []
    try:
        config = ProcessorConfig.from_args(argv)
    except usage.UsageError as e:
        raise CliError(str(e)) from None
    stream = args.stream or config.stream
    url = args.redis_url or os.environ.get("REDIS_URL")
    if url:
        try:
            return RedisTarget.parse(url), stream
        except ValueError as e:
            raise CliError(f"--redis-url: {e}") from None
    if config.redis is None:
        socket = os.path.join(os.path.abspath(config.data_dir), "redis.sock")
        if os.path.exists(socket):  # the local pipeline's embedded Redis
            return RedisTarget(unix_path=socket), stream
        raise CliError("no Redis URL: pass --redis-url or set REDIS_URL")
    return config.redis, stream


def original_fields(letter: dict[str, str]) -> dict[str, str]:
    """The stream entry's own fields of a dead letter."""
    from teltonika_ingest.processor.consumer import DLQ_META_FIELDS

    out = {}
    for name, value in letter.items():
        if name in DLQ_META_FIELDS:
            continue
        out[name.removeprefix("original:")] = value
    return out


def _emit(obj: dict[str, Any]) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(obj).decode() + "\n")


async def _letters(client: Any, key: str, count: int) -> list[tuple[str, dict[str, str]]]:
    reply = await client.execute("XRANGE", key, "-", "+", "COUNT", count)
    return [(str(i), as_dict(flat)) for i, flat in reply or ()]


async def _list(client: Any, dlq: str, count: int) -> int:
    for letter_id, letter in await _letters(client, dlq, count):
        _emit({"dlq_id": letter_id, **letter})
    sys.stdout.flush()
    return 0


async def _replay(client: Any, stream: str, dlq: str, args: argparse.Namespace) -> int:
    from teltonika_ingest.processor.decode import DecodeError, decode_entry

    replayed = failing = 0
    for letter_id, letter in await _letters(client, dlq, args.count):
        original = original_fields(letter)
        try:
            decode_entry(letter.get("entry_id", letter_id), original)
        except DecodeError as e:
            if not args.force:
                failing += 1
                _emit({"dlq_id": letter_id, "result": "still_failing", "reason": str(e)})
                continue
        if args.dry_run:
            replayed += 1
            _emit({"dlq_id": letter_id, "result": "would_replay"})
            continue
        flat = [x for item in original.items() for x in item]
        new_id = await client.execute("XADD", stream, "*", *flat)
        await client.execute("XDEL", dlq, letter_id)
        replayed += 1
        _emit({"dlq_id": letter_id, "result": "replayed", "entry_id": str(new_id)})
    verb = "would replay" if args.dry_run else "replayed"
    print(f"{PROG}: {verb} {replayed}, still failing {failing}", file=sys.stderr)
    sys.stdout.flush()
    return 0 if failing == 0 else 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.count <= 0:
        print(f"{PROG}: --count must be positive", file=sys.stderr)
        return 1
    try:
        target, stream = _settings(args)
    except CliError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    dlq = stream + ":processor:dlq"

    async def body(client: Any, reactor: Any, state: dict[str, Any]) -> int:
        if args.action == "list":
            return await _list(client, dlq, args.count)
        return await _replay(client, stream, dlq, args)

    return run_on_reactor(PROG, target, body)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
