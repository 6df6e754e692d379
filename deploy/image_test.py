"""``make image-test``: build the container image for real and run it (not part of ``make test``:
minutes, root, a Docker daemon).

No image registry is reachable here and a build's own network cannot verify the package
mirrors' certificates, so (OPERATIONS.md, "Containers"):

1. Debian's ``docker.io`` and ``debootstrap`` (installed when missing); ``dockerd
   --storage-driver=vfs`` started when no daemon answers (and stopped again at the end);
2. a base image made from Debian packages: ``debootstrap --variant=minbase
   --include=python3,python3-venv,passwd bookworm DIR``, ``tar -C DIR -c . | docker import``
   (kept as ``teltonika-base:bookworm`` for the next run);
3. a wheelhouse built on the host (``pip wheel .``: the project, with its compiled hot path,
   and every dependency), the image built from it with ``--build-arg BASE=... --build-arg
   INSTALL=wheelhouse`` and no network;
4. the container run with ``--network host --read-only --init`` against a ``redis-server`` on
   loopback (never a bridge address), then checked: ``/readyz`` 200, a device's handshake and
   Codec 8 packet ACKed (``01``, ``00000001``) and in the stream, the image's HEALTHCHECK turning
   ``healthy``, the non-root user, and SIGTERM (``docker stop``) ending in a clean shutdown.

Prints the figures (sizes, times) and exits 1 if any check failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from teltonika_ingest.redis.resp import encode_command

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "image"
WHEELHOUSE = ROOT / "wheelhouse"
BASE = os.environ.get("IMAGE_BASE", "teltonika-base:bookworm")
IMAGE = os.environ.get("IMAGE_NAME", "teltonika-ingest:image-test")
CONTAINER = "teltonika-image-test"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
IMEI_HANDSHAKE = bytes.fromhex("000f333536333037303432343431303133")
PACKET = bytes.fromhex(
    "000000000000003608010000016b40d8ea30010000000000000000000000000000000105021503010101"
    "425e0f01f10000601a014e0000000000000000010000c7cf"
)

figures: dict[str, Any] = {}
failures: list[str] = []


def say(text: str) -> None:
    print(f"image-test: {text}", flush=True)


def run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("check", True)
    kwargs.setdefault("text", True)
    return subprocess.run(list(argv), **kwargs)


def docker_bin() -> str:
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise SystemExit("image-test: no docker client")


def check(name: str, ok: bool, detail: str = "") -> None:
    say(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        failures.append(name)


def wait(what: str, predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- set-up


def ensure_packages() -> None:
    missing = [
        pkg
        for pkg, binary in (
            ("docker.io", "/usr/sbin/dockerd"),
            ("debootstrap", "/usr/sbin/debootstrap"),
        )
        if not os.path.exists(binary)
    ]
    if missing:
        say(f"installing {' '.join(missing)}")
        run(["apt-get", "update", "-qq"])
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def daemon_up(docker: str) -> bool:
    return run([docker, "info"], check=False, capture_output=True).returncode == 0


def ensure_daemon(docker: str) -> subprocess.Popen[bytes] | None:
    if daemon_up(docker):
        return None
    WORK.mkdir(parents=True, exist_ok=True)
    say("starting dockerd --storage-driver=vfs")
    log = open(WORK / "dockerd.log", "wb")  # noqa: SIM115 - kept open for the daemon's life
    proc = subprocess.Popen(
        ["/usr/sbin/dockerd", "--storage-driver=vfs", "--iptables=false", "--bridge=none"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait("dockerd", lambda: proc.poll() is not None or daemon_up(docker), 60)
    if proc.poll() is not None:
        raise SystemExit(f"image-test: dockerd exited; see {WORK / 'dockerd.log'}")
    return proc


def ensure_base(docker: str) -> None:
    if run([docker, "image", "inspect", BASE], check=False, capture_output=True).returncode == 0:
        say(f"base image {BASE} exists")
        return
    rootfs = WORK / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    say(f"debootstrap bookworm into {rootfs}")
    started = time.monotonic()
    run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,passwd",
         "bookworm", str(rootfs), MIRROR],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run([docker, "import", "-", BASE], stdin=tar.stdout, stdout=subprocess.DEVNULL)
    tar.wait()
    shutil.rmtree(rootfs)
    figures["base_image_seconds"] = round(time.monotonic() - started, 1)


def build_wheelhouse() -> None:
    if WHEELHOUSE.exists():
        shutil.rmtree(WHEELHOUSE)
    say("pip wheel . (the wheelhouse)")
    started = time.monotonic()
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(WHEELHOUSE), str(ROOT)],
        cwd=ROOT,
    )
    figures["wheelhouse_seconds"] = round(time.monotonic() - started, 1)
    figures["wheelhouse_wheels"] = len(list(WHEELHOUSE.glob("*.whl")))


def build_image(docker: str) -> None:
    say(f"docker build {IMAGE} from {BASE} and the wheelhouse (no network)")
    started = time.monotonic()
    run(
        [docker, "build", "--network", "none", "--build-arg", f"BASE={BASE}",
         "--build-arg", "INSTALL=wheelhouse", "-t", IMAGE, str(ROOT)],
        env=dict(os.environ, DOCKER_BUILDKIT="1"),
    )  # fmt: skip
    figures["build_seconds"] = round(time.monotonic() - started, 1)
    for name, key in ((BASE, "base_image_mb"), (IMAGE, "image_mb")):
        size = run([docker, "image", "inspect", "-f", "{{.Size}}", name], capture_output=True)
        figures[key] = round(int(size.stdout.strip()) / 1e6)


# --------------------------------------------------------------------------- the checks


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def device_ack(port: int) -> tuple[bytes, bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(IMEI_HANDSHAKE)
        accepted = s.recv(1)
        started = time.perf_counter()
        s.sendall(PACKET)
        ack = b""
        while len(ack) < 4:
            chunk = s.recv(4 - len(ack))
            if not chunk:
                break
            ack += chunk
        return accepted, ack, time.perf_counter() - started


def redis_cmd(port: int, *args: str) -> bytes:
    payload = encode_command(args)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        return s.recv(4096)


def inspect(docker: str, template: str) -> str:
    return run([docker, "inspect", "-f", template, CONTAINER], capture_output=True).stdout.strip()


def run_container(docker: str) -> None:
    redis_port, device_port, http_port = free_port(), free_port(), free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    run([docker, "rm", "-f", CONTAINER], check=False, capture_output=True)
    try:
        wait("redis-server", lambda: redis_cmd(redis_port, "PING") == b"+PONG\r\n", 10)
        started = time.monotonic()
        run(
            [docker, "run", "-d", "--name", CONTAINER, "--network", "host", "--read-only",
             "--init", "--health-interval", "2s", "--health-start-period", "2s",
             "-e", f"REDIS_URL=redis://127.0.0.1:{redis_port}/0",
             "-e", f"TELTONIKA_LISTEN=tcp:{device_port}:interface=127.0.0.1",
             "-e", f"TELTONIKA_METRICS=tcp:{http_port}:interface=127.0.0.1",
             "-e", "TELTONIKA_INSTANCE_ID=image-test", "-e", "TELTONIKA_LOG_FORMAT=json",
             IMAGE],
            capture_output=True,
        )  # fmt: skip
        try:
            wait("/readyz 200", lambda: readyz(http_port) == 200, 60)
            figures["start_to_ready_seconds"] = round(time.monotonic() - started, 2)
            check("/readyz answers 200", True)
        except TimeoutError as e:
            check("/readyz answers 200", False, str(e))
        accepted, ack, seconds = device_ack(device_port)
        figures["device_ack_ms"] = round(seconds * 1000, 2)
        check("device handshake accepted (01)", accepted == b"\x01", accepted.hex())
        check("Codec 8 packet ACKed (00000001)", ack == b"\x00\x00\x00\x01", ack.hex())
        xlen = redis_cmd(redis_port, "XLEN", "telemetry:teltonika")
        check("the record is in the stream", xlen == b":1\r\n", xlen.decode().strip())
        try:
            wait("healthy", lambda: inspect(docker, "{{.State.Health.Status}}") == "healthy", 60)
            figures["start_to_healthy_seconds"] = round(time.monotonic() - started, 2)
            check("HEALTHCHECK healthy", True)
        except TimeoutError:
            check("HEALTHCHECK healthy", False, inspect(docker, "{{json .State.Health}}"))
        user = inspect(docker, "{{.Config.User}}")
        uid = run([docker, "exec", CONTAINER, "id", "-u"], capture_output=True).stdout.strip()
        check("runs as a non-root user", user == "10001:10001" and uid == "10001", f"{user} {uid}")
        # a device still connected at SIGTERM: closed by the shutdown, its registry field gone
        held = socket.create_connection(("127.0.0.1", device_port), timeout=10)
        held.sendall(IMEI_HANDSHAKE)
        held.recv(1)

        def owner() -> bytes:
            return redis_cmd(redis_port, "HGET", "connections:registry", "356307042441013")

        try:
            wait("registered", lambda: b"image-test" in owner(), 10)
            check("device registered", True)
        except TimeoutError:
            check("device registered", False, owner().decode().strip())
        stopping = time.monotonic()
        run([docker, "stop", "-t", "40", CONTAINER], capture_output=True)
        figures["sigterm_to_exit_seconds"] = round(time.monotonic() - stopping, 2)
        check("the held device was disconnected", held.recv(1) == b"")
        held.close()
        left = redis_cmd(redis_port, "HLEN", "connections:registry")
        check("registry emptied at shutdown", left == b":0\r\n", left.decode().strip())
        code = inspect(docker, "{{.State.ExitCode}}")
        figures["exit_code"] = int(code)
        logs = run([docker, "logs", CONTAINER], capture_output=True, check=False)
        events = [json.loads(line) for line in logs.stdout.splitlines() if line.startswith("{")]
        messages = [e.get("message", "") for e in events]
        figures["log_lines"] = len(messages)
        # --init (tini) passes SIGTERM on; twistd re-raises it after a clean shutdown: 143
        check("SIGTERM: clean shutdown", "shutdown complete" in messages and code == "143", code)
        bad = [e for e in events if e.get("level") in ("error", "critical")]
        check("no error or critical log line", not bad, json.dumps(bad)[:500])
    finally:
        run([docker, "rm", "-f", CONTAINER], check=False, capture_output=True)
        redis.send_signal(signal.SIGTERM)
        redis.wait(timeout=10)


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("image-test: needs root (apt-get, dockerd, debootstrap)")
    ensure_packages()
    docker = docker_bin()
    daemon = ensure_daemon(docker)
    try:
        ensure_base(docker)
        build_wheelhouse()
        build_image(docker)
        run_container(docker)
    finally:
        if daemon is not None:
            say("stopping the dockerd started here")
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    say("figures " + json.dumps(figures))
    if failures:
        say(f"FAILED: {', '.join(failures)}")
        return 1
    say("all checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
