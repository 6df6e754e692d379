"""Graceful shutdown of a real `twistd -n teltonika-ingest` process (contract.md §7)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer

from teltonika_ingest.codec import encode_imei

from device import DeviceProtocol, connect_device, http_get, wait_for
from redisproc import RedisProcess
from support import avl_frame, make_record

pytestmark = pytest.mark.integration

TWISTD = str(Path(sys.executable).parent / "twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TwistdProcess:
    def __init__(
        self,
        redis: RedisProcess | None,
        tmp_path: Path,
        *extra: str,
        own_process_group: bool = False,
    ) -> None:
        self.device_port = free_port()
        self.http_port = free_port()
        self.log = tmp_path / "twistd.log"
        redis_args = [] if redis is None else ["--redis-url", f"redis://127.0.0.1:{redis.port}/0"]
        self.argv = [
            TWISTD,
            "-n",
            "--pidfile=",
            "teltonika-ingest",
            "--listen",
            f"tcp:{self.device_port}:interface=127.0.0.1",
            "--metrics",
            f"tcp:{self.http_port}:interface=127.0.0.1",
            *redis_args,
            "--instance-id",
            "shutdown-test",
            "--config",
            "",
            *extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TELTONIKA_", "REDIS_"))}
        self.proc = subprocess.Popen(
            self.argv,
            cwd=tmp_path,
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            # as from a terminal: SIGINT at its default even if our parent ignores it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            # a process group of its own, for signals to all its processes (os.killpg)
            process_group=0 if own_process_group else None,
        )

    async def ready(self) -> None:
        async def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"twistd exited: {self.log.read_text()}")
            try:
                code, _ = await http_get(f"http://127.0.0.1:{self.http_port}/readyz")
            except Exception:
                return False
            return code == 200

        await wait_for(answers, timeout=20)

    async def exited(self, timeout: float) -> int:
        await wait_for(lambda: self.proc.poll() is not None, timeout=timeout)
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SteadyDevice:
    """Sends packets back-to-back, waiting for each ACK, until the service closes it."""

    def __init__(self, imei: str, start: int) -> None:
        self.imei = imei
        self.start = start
        self.acked: list[int] = []  # record timestamps the service ACKed
        self.proto: DeviceProtocol | None = None

    async def run(self, port: int) -> None:
        self.proto = await connect_device(port)
        self.proto.send(encode_imei(self.imei))
        assert await self.proto.expect(1) == b"\x01"
        n = self.start
        while True:
            frame = avl_frame(3, start=n)
            self.proto.send(frame)
            try:
                reply = await self.proto.expect(4, timeout=10)
            except Exception:
                return  # closed by the service: the last packet is not ACKed
            assert reply == b"\x00\x00\x00\x03"
            self.acked += [make_record(n + i).timestamp_ms for i in range(3)]
            n += 3


def stream_keys(redis: RedisProcess) -> set[tuple[str, str]]:
    out = set()
    for _id, flat in redis.cmd("XRANGE", "telemetry:teltonika", "-", "+"):
        fields = dict(zip(flat[0::2], flat[1::2], strict=True))
        payload = orjson.loads(fields["payload"])
        out.add((payload["device_id"], payload["timestamp"]))
    return out


def iso(ms: int) -> str:
    from teltonika_ingest.codec import format_timestamp

    return format_timestamp(ms)


@pytest_twisted.ensureDeferred
async def test_sigterm_during_steady_traffic(redis_proc: RedisProcess, tmp_path: Path) -> None:
    svc = TwistdProcess(redis_proc, tmp_path)
    try:
        await svc.ready()
        devices = [SteadyDevice(f"35630704244{i:04d}", start=i * 1_000_000) for i in range(8)]
        runs = [defer.ensureDeferred(d.run(svc.device_port)) for d in devices]
        await wait_for(lambda: all(len(d.acked) >= 30 for d in devices), timeout=20)
        assert redis_proc.cmd("HLEN", "connections:registry") == 8
        assert redis_proc.cmd("EXISTS", "instance:heartbeat:shutdown-test") == 1

        svc.proc.send_signal(signal.SIGTERM)
        status = await svc.exited(timeout=30)
        await defer.gatherResults(runs)
        # twistd re-raises SIGTERM after a clean shutdown (documented in OPERATIONS.md)
        assert status in (0, -signal.SIGTERM), svc.log.read_text()
        log = svc.log.read_text()
        assert "shutdown complete" in log
        for step in range(1, 7):
            assert f"shutdown: {step}/6" in log

        stored = stream_keys(redis_proc)
        acked = {(d.imei, iso(ts)) for d in devices for ts in d.acked}
        assert len(acked) >= 240
        assert acked - stored == set()  # no ACKed record lost
        assert redis_proc.cmd("HLEN", "connections:registry") == 0
        assert redis_proc.cmd("EXISTS", "instance:heartbeat:shutdown-test") == 0
    finally:
        svc.kill()


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_the_packet_in_flight_before_closing(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """A packet in flight when SIGTERM arrives is ACKed before its connection closes (step
    2 waits for it). Redis holds the publish (CLIENT PAUSE WRITE) until the service logged
    step 2; with the drain skipped, step 3 would close the connection with no ACK."""
    svc = TwistdProcess(redis_proc, tmp_path, "--publish-timeout", "20", "--drain-timeout", "20")
    try:
        await svc.ready()
        dev = await connect_device(svc.device_port)
        dev.send(encode_imei("356307042441013"))
        assert await dev.expect(1) == b"\x01"
        redis_proc.cmd("CLIENT", "PAUSE", "20000", "WRITE")  # scripts wait, PING answers

        async def publish_in_flight() -> bool:
            _, body = await http_get(f"http://127.0.0.1:{svc.http_port}/metrics")
            return b"teltonika_publish_inflight 1.0" in body

        dev.send(avl_frame(2))
        await wait_for(publish_in_flight, timeout=10)
        svc.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: "shutdown: 2/6" in svc.log.read_text(), timeout=10)
        assert "shutdown: 3/6" not in svc.log.read_text()  # waiting for the packet
        redis_proc.cmd("CLIENT", "UNPAUSE")
        assert await dev.expect(4, timeout=10) == b"\x00\x00\x00\x02"  # ACKed, then ...
        await dev.wait_closed(timeout=10)  # ... closed by step 3
        status = await svc.exited(timeout=30)
        assert status in (0, -signal.SIGTERM), svc.log.read_text()
        assert len(stream_keys(redis_proc)) == 2
    finally:
        redis_proc.cmd("CLIENT", "UNPAUSE")
        svc.kill()


@pytest_twisted.ensureDeferred
async def test_sigterm_with_redis_paused_exits_within_shutdown_timeout(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    svc = TwistdProcess(
        redis_proc, tmp_path, "--drain-timeout", "2", "--shutdown-timeout", "6",
        "--publish-timeout", "30",
    )  # fmt: skip
    try:
        await svc.ready()
        dev = SteadyDevice("356307042441013", start=0)
        run = defer.ensureDeferred(dev.run(svc.device_port))
        await wait_for(lambda: len(dev.acked) >= 3)
        redis_proc.pause()

        async def publish_stuck() -> bool:
            _, body = await http_get(f"http://127.0.0.1:{svc.http_port}/metrics")
            return b"teltonika_publish_inflight 1.0" in body

        # a packet is waiting on the paused Redis: the drain step must wait for it
        await wait_for(publish_stuck, timeout=10)
        svc.proc.send_signal(signal.SIGTERM)
        status = await svc.exited(timeout=30)  # a deadline, not a measurement
        await run
        # Redis cannot answer the unregister step: the watchdog ends it -> status 1 (the
        # drain gave up after --drain-timeout: that packet was not ACKed)
        assert status == 1, svc.log.read_text()
        log = svc.log.read_text()
        assert "exiting with status 1" in log
        assert "publishes still in flight after the drain timeout" in log
        assert dev.acked  # what was ACKed before the pause is in the stream
        redis_proc.resume()
        assert {iso(ts) for ts in dev.acked} <= {t for _, t in stream_keys(redis_proc)}
    finally:
        redis_proc.resume()
        svc.kill()


@pytest_twisted.ensureDeferred
async def test_embedded_redis_run_and_ctrl_c(tmp_path: Path) -> None:
    """README's run command: no Redis configured -> embedded Redis in ./var; Ctrl-C stops all."""
    svc = TwistdProcess(None, tmp_path)
    try:
        await svc.ready()
        dev = SteadyDevice("356307042441013", start=0)
        run = defer.ensureDeferred(dev.run(svc.device_port))
        await wait_for(lambda: len(dev.acked) >= 6)
        pidfile = tmp_path / "var" / "redis.pid"
        redis_pid = int(pidfile.read_text().strip())
        svc.proc.send_signal(signal.SIGINT)
        status = await svc.exited(timeout=30)
        await run
        log = svc.log.read_text()
        assert status in (0, -signal.SIGINT), log
        assert "embedded development Redis" in log
        assert "shutdown complete" in log
        with pytest.raises(ProcessLookupError):
            os.kill(redis_pid, 0)  # the embedded Redis stopped with the service
        assert (tmp_path / "var" / "appendonlydir").is_dir()  # its data persists
    finally:
        svc.kill()
