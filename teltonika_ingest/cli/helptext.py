"""What every subcommand's ``--help`` looks like: plain text (no reST markup), every default
shown, and two or three examples at the end.

:func:`finish` walks the parser tree once it is built (``cli/main.py``), so each subcommand
module keeps its own descriptions and :data:`EXAMPLES` holds the examples in one place.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Final

__all__ = ["EXAMPLES", "HelpFormatter", "finish", "plain"]

PROG: Final = "teltonika-ingest"

#: examples per subcommand ("dlq replay": a nested one), shown at the end of its --help
EXAMPLES: Final[dict[str, tuple[str, ...]]] = {
    "decode": (
        "teltonika-ingest decode 000F333536333037303432343431303133",
        "teltonika-ingest decode --names --model FMB920 --format table 00000000000000360801...",
        "teltonika-ingest decode --scan device.log",
    ),
    "io": (
        "teltonika-ingest io 66",
        "teltonika-ingest io 389 --model TAT100",
        "teltonika-ingest io voltage --format json",
    ),
    "command": (
        "teltonika-ingest command 356307042441013 getinfo",
        "teltonika-ingest command 356307042441013 getver --codec 14 --timeout 60",
        "teltonika-ingest command 356307042441013 'setdigout 1' --queue --ttl 6h --no-wait",
    ),
    "commands": (
        "teltonika-ingest commands list 356307042441013",
        "teltonika-ingest commands list --json --limit 20",
        "teltonika-ingest commands cancel cli-5d1c0f",
    ),
    "commands list": (
        "teltonika-ingest commands list 356307042441013",
        "teltonika-ingest commands list --limit 1000 --json --redis-url redis://10.0.0.5:6379/0",
    ),
    "commands cancel": (
        "teltonika-ingest commands cancel cli-5d1c0f",
        "teltonika-ingest commands cancel 9b1e --redis-url redis://10.0.0.5:6379/0",
    ),
    "dlq": (
        "teltonika-ingest dlq list --count 10",
        "teltonika-ingest dlq replay --dry-run",
        "teltonika-ingest dlq replay --redis-url redis://10.0.0.5:6379/0",
    ),
    "dlq list": (
        "teltonika-ingest dlq list",
        "teltonika-ingest dlq list --count 5 --redis-url unix:///var/lib/teltonika-ingest/redis.sock",
    ),
    "dlq replay": (
        "teltonika-ingest dlq replay --dry-run",
        "teltonika-ingest dlq replay --count 100 --keep",
    ),
    "simulate": (
        "teltonika-ingest simulate --devices 50 --duration 10 --ack-log acks.log",
        "teltonika-ingest simulate --devices 2000 --rate 0.1 --ramp-up 20 --duration 60",
        "teltonika-ingest simulate --replay device.log --imei 356307042441013",
    ),
    "verify": (
        "teltonika-ingest verify acks.log --redis-url unix://$PWD/var/redis.sock",
        "teltonika-ingest verify acks-a.log acks-b.log --since 2026-11-22T10:00:00Z --json",
    ),
    "positions": (
        "teltonika-ingest positions 350000000000006 --since 5m",
        "teltonika-ingest positions 356307042441013 --since 2026-11-22T10:00Z --format geojson",
    ),
}

_LITERAL = re.compile(r"``(.+?)``", re.S)
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr):`~?([^`]+)`")
_CONTRACT = re.compile(r"\s*\(contract\.md[^)]*\)")


def plain(text: str | None) -> str | None:
    """``text`` without reST markup (literals, roles) and pointers to the repository's docs."""
    if not text:
        return text
    text = _LITERAL.sub(r"\1", text)
    text = _ROLE.sub(r"\1", text)
    return _CONTRACT.sub("", text)


# flags (off unless given) and --help/--version: nothing to show
_NO_DEFAULT_SHOWN = (
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
    argparse._HelpAction,
    argparse._VersionAction,
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout; adds ``(default: X)`` to every option whose help does
    not already say its default (flags are off by default: not repeated)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default is argparse.SUPPRESS
            or isinstance(action, _NO_DEFAULT_SHOWN)
            or action.nargs == 0
            or "default" in text.lower()
        ):
            return text
        shown = "none" if action.default is None else "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def _examples(name: str) -> str:
    lines = EXAMPLES.get(name, ())
    return "examples:\n" + "\n".join(f"  {line}" for line in lines) if lines else ""


def finish(parser: argparse.ArgumentParser, name: str = "") -> None:
    """Apply the rules above to ``parser`` and every subcommand under it."""
    parser.formatter_class = HelpFormatter
    parser.description = plain(parser.description)
    if name:
        parser.epilog = _examples(name)
    for action in parser._actions:
        action.help = plain(action.help)
        if isinstance(action, argparse._SubParsersAction):
            choices: dict[str, Any] = action.choices
            for sub_name, sub in choices.items():
                finish(sub, f"{name} {sub_name}".strip())
            for choice in action._choices_actions:
                choice.help = plain(choice.help)
