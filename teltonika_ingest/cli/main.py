"""``teltonika-ingest`` console script: a small dispatcher over subcommands.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds
its parser and sets ``handler`` (``args -> exit status``) as a default. To add one,
append its module to :data:`SUBCOMMAND_MODULES`; keep heavy imports (Twisted, Redis)
inside the handler so ``teltonika-ingest decode`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "teltonika_ingest.cli.decode",
    "teltonika_ingest.cli.iolookup",
    "teltonika_ingest.cli.command",
    "teltonika_ingest.cli.queue",
    "teltonika_ingest.cli.dlq",
    "teltonika_ingest.cli.simulate",
    "teltonika_ingest.cli.verify",
    "teltonika_ingest.cli.positions",
)


class _VersionAction(argparse.Action):
    """``--version``: computed only when asked (it imports Twisted, which ``decode`` avoids)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from teltonika_ingest.buildinfo import version_line

        print(version_line())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teltonika-ingest",
        description="Teltonika GPS tracker ingestion: tools around the service "
        "(the service itself runs as: twistd -n teltonika-ingest).",
    )
    parser.add_argument("--version", action=_VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    from teltonika_ingest.cli.helptext import finish

    finish(parser)  # plain text, every default shown, examples at the end of each --help
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except BrokenPipeError:
        # The reader went away (e.g. "| head"): stop quietly, as the Python docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
