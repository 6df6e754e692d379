"""``teltonika-ingest SUBCOMMAND --help`` is for a person: plain text (no reST markup, no
pointers to files of the repository), every default shown, two or three examples at the end
that parse; ``verify`` and ``dlq replay`` show progress on a terminal (and only there)."""

from __future__ import annotations

import argparse
import base64
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from teltonika_ingest.cli.helptext import EXAMPLES
from teltonika_ingest.cli.main import build_parser
from teltonika_ingest.sim.invariant import AckLogWriter, ms_to_iso

from redisproc import RedisProcess
from support import avl_frame

CLI = str(Path(sys.executable).parent / "teltonika-ingest")


def subcommands(
    parser: argparse.ArgumentParser, name: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                full = f"{name} {sub_name}".strip()
                yield full, sub
                yield from subcommands(sub, full)


PARSERS = dict(subcommands(build_parser()))


def test_every_subcommand_has_examples() -> None:
    assert set(PARSERS) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_is_plain_shows_defaults_and_ends_with_examples(name: str) -> None:
    parser = PARSERS[name]
    text = parser.format_help()
    assert "``" not in text and not re.search(r":(func|class|meth|mod):`", text)
    assert not re.search(r"\b[\w/]+\.py\b|contract\.md|pitfalls\.md|tests/", text), text
    head, _, examples = text.rpartition("\nexamples:\n")
    assert head, text
    lines = examples.rstrip("\n").split("\n")
    assert 2 <= len(lines) <= 3, lines
    for line in lines:
        assert (line + " ").startswith(f"  teltonika-ingest {name} "), line
        argv = shlex.split(line)[1:]
        build_parser().parse_args(argv)  # every example is a valid command line
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.default is argparse.SUPPRESS:
            continue  # positionals, flags, --help
        rendered = parser._get_formatter()._expand_help(action)  # type: ignore[attr-defined]
        assert "default" in rendered.lower(), (action.option_strings, rendered)


# --------------------------------------------------------------------------- progress


def run_on_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run ``argv`` with stderr on a pseudo-terminal: (status, stdout, what the terminal got)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, text=True
        )
        os.close(slave)
        slave = -1
        out, _ = proc.communicate(timeout=60)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child side is closed and everything was read
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    return proc.returncode, out, b"".join(chunks).decode()


@pytest.mark.integration
def test_verify_shows_progress_on_a_terminal_only(
    redis_session: RedisProcess, tmp_path: Path
) -> None:
    log = tmp_path / "acks.log"
    with AckLogWriter(log) as writer:
        for i in range(50):
            redis_session.cmd(
                "XADD", "telemetry:teltonika", "*", "imei", "356307042441013", "codec", "8E",
                "ts", ms_to_iso(1_700_000_000_000 + i), "payload", "{}",
            )  # fmt: skip
            writer.write("356307042441013", 1_700_000_000_000 + i)
    argv = [CLI, "verify", str(log), "--redis-url", f"redis://127.0.0.1:{redis_session.port}/0",
            "--batch", "10"]  # fmt: skip
    code, out, terminal = run_on_terminal(argv)
    assert code == 0, terminal
    assert "\rverify: stream entries read: 10 of 50 (20 %)" in terminal
    assert "missing:         0" in out  # the summary, after the progress line is erased
    piped = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and "\r" not in piped.stderr and "read:" not in piped.stderr


@pytest.mark.integration
def test_dlq_replay_shows_progress_and_a_summary(redis_session: RedisProcess) -> None:
    for i in range(3):
        raw = base64.b64encode(avl_frame(1, start=i)).decode()
        redis_session.cmd(
            "XADD", "telemetry:teltonika:dlq", "*", "imei", "356307042441013", "codec", "8E",
            "reason", "malformed: test", "raw_b64", raw,
            "received_at", "2026-11-01T10:00:00.123Z", "instance_id", "old",
        )  # fmt: skip
    argv = [CLI, "dlq", "replay", "--redis-url", f"redis://127.0.0.1:{redis_session.port}/0"]
    code, out, terminal = run_on_terminal(argv)
    assert code == 0, terminal
    assert "\rdlq replay: entries: 0 of 3 (0 %)" in terminal
    assert "\rdlq replay: entries: 3 of 3 (100 %)" in terminal
    assert terminal.rstrip().endswith("replayed 3, still failing 0, skipped 0"), terminal
    assert out.count('"result":"replayed"') == 3
