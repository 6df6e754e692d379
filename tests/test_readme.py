"""README.md is true as written: the by-hand device example runs and returns by itself with
the documented answers, the ``nc`` variant closes its side (``-N``), and ``make run`` never
installs system packages (only the test path does)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from redisproc import RedisProcess
from test_service_integration import start

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```sh\n(.*?)```", README, re.S)


def block_with(text: str) -> str:
    [block] = [b for b in BLOCKS if text in b]
    return block


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_by_hand_python_example_answers_and_returns(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    command = block_with(".venv/bin/python -c").strip()
    assert command.startswith(".venv/bin/python -c '") and command.endswith("'")
    running = await start(redis_proc, tmp_path)
    try:
        script = command.removeprefix(".venv/bin/python -c '").removesuffix("'")
        script = script.replace('("127.0.0.1", 5027)', f'("127.0.0.1", {running.device_port})')
        result = await threads.deferToThread(
            subprocess.run,
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        await running.svc.stopService()
    assert (result.returncode, result.stdout, result.stderr) == (0, "01\n00000001\n", "")
    assert redis_proc.cmd("XLEN", "telemetry:teltonika") == 1


def test_nc_example_closes_its_side() -> None:
    block = block_with("| nc ")
    assert "| nc -N 127.0.0.1 5027 | xxd" in block
    assert "netcat-openbsd" in README and "xxd" in README and "curl" in README


def dry_run(target: str) -> str:
    """Every command ``make TARGET`` would run from scratch (-B: as if nothing were built)."""
    out = subprocess.run(
        ["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_run_installs_no_system_packages() -> None:
    commands = dry_run("run")
    assert "twistd -n" in commands and "pip install" in commands
    for word in ("apt-get", "dpkg", "sudo"):
        assert word not in commands, word
    # the tools only the tests need are fetched on the test path
    assert "apt-get" in dry_run("test")
    # the real image build is its own target, never part of make test (CI)
    assert "image_test.py" not in dry_run("test")
    assert "deploy/image_test.py" in dry_run("image-test")
