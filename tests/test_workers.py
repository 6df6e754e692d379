"""``--workers N`` end to end: a real ``twistd`` supervisor with 2 worker processes and a real
redis-server. The registry names the worker that holds each device, commands reach the device
through that worker's stream, a killed worker is restarted (and its stale registry fields go),
the one --metrics endpoint shows both workers, SIGTERM drains every worker."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from teltonika_ingest.codec import TYPE_COMMAND, decode_command_frame, encode_imei
from teltonika_ingest.server.workers import _gone
from teltonika_ingest.sim.traffic import imei_for

from device import DeviceProtocol, connect_device, expect_frame, http_get, wait_for
from redisproc import RedisProcess
from support import avl_frame
from test_commands_integration import answer
from test_shutdown import TwistdProcess

pytestmark = pytest.mark.integration

BASE = 35_100_000_000_000
INSTANCES = {"shutdown-test-0", "shutdown-test-1"}


def registry(redis: RedisProcess) -> dict[str, str]:
    flat = redis.cmd("HGETALL", "connections:registry")
    return dict(zip(flat[0::2], flat[1::2], strict=True))


def child_pids(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def worker_pids(supervisor: int) -> set[int]:
    """The workers: children of the fork server, the supervisor's one child."""
    (fork_server,) = child_pids(supervisor)
    return child_pids(fork_server)


def worker_pid(svc: TwistdProcess, index: int) -> int:
    """The pid of worker ``index`` (the supervisor logs each start)."""
    found = re.findall(rf"worker {index} started: pid (\d+)", svc.log.read_text())
    assert found, svc.log.read_text()
    return int(found[-1])


async def metrics_text(svc: TwistdProcess) -> str:
    code, body = await http_get(f"http://127.0.0.1:{svc.http_port}/metrics")
    assert code == 200
    return body.decode()


async def connect_on_every_worker(
    svc: TwistdProcess, redis: RedisProcess, start: int = 0
) -> dict[str, tuple[DeviceProtocol, str]]:
    """Connect devices until each worker holds at least one (the kernel picks the worker:
    with 2 workers, 40 devices all on one would happen once in 2^39 runs)."""
    held: dict[str, tuple[DeviceProtocol, str]] = {}
    for index in range(start, start + 40):
        imei = imei_for(BASE, index)
        dev = await connect_device(svc.device_port)
        dev.send(encode_imei(imei))
        assert await dev.expect(1) == b"\x01"
        await wait_for(lambda imei=imei: imei in registry(redis), timeout=10)
        held[imei] = (dev, registry(redis)[imei])
        if {holder for _, holder in held.values()} == INSTANCES:
            return held
    raise AssertionError(f"one worker got every device: {registry(redis)}")


async def command_round_trip(redis: RedisProcess, imei: str, dev: DeviceProtocol, to: str) -> dict:
    command_id = f"cmd-{imei}-{to}"
    redis.cmd(
        "XADD", f"commands:instance:{to}", "*", "id", command_id, "imei", imei, "text", "getver"
    )
    if to == registry(redis)[imei]:
        message = decode_command_frame(await expect_frame(dev, timeout=10))
        assert (message.type, message.payload) == (TYPE_COMMAND, b"getver")
        dev.send(answer(b"Ver:03.27.07_00"))

    async def recorded() -> bool:
        return any(
            dict(zip(f[0::2], f[1::2], strict=True)).get("id") == command_id
            for _id, f in redis.cmd("XRANGE", "commands:results", "-", "+")
        )

    await wait_for(recorded, timeout=10)
    for _id, flat in redis.cmd("XRANGE", "commands:results", "-", "+"):
        fields = dict(zip(flat[0::2], flat[1::2], strict=True))
        if fields.get("id") == command_id:
            return fields
    raise AssertionError("unreachable")


@pytest_twisted.ensureDeferred
async def test_two_workers_registry_commands_metrics_and_drain(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    svc = TwistdProcess(redis_proc, tmp_path, "--workers", "2")
    try:
        await svc.ready()
        assert len(worker_pids(svc.proc.pid)) == 2
        for instance in INSTANCES:
            assert redis_proc.cmd("EXISTS", f"instance:heartbeat:{instance}") == 1
        held = await connect_on_every_worker(svc, redis_proc)

        # telemetry through both workers: ACKed, in the stream
        for dev, _holder in held.values():
            dev.send(avl_frame(2))
            assert await dev.expect(4, timeout=10) == b"\x00\x00\x00\x02"
        assert redis_proc.cmd("XLEN", "telemetry:teltonika") == 2 * len(held)

        # commands: through the holder's stream they reach the device; through the other
        # worker's stream they are not_connected (that worker does not hold the socket)
        for imei, (dev, holder) in list(held.items())[-2:]:
            ok = await command_round_trip(redis_proc, imei, dev, holder)
            assert (ok["status"], ok["instance_id"], ok["response"]) == (
                "ok",
                holder,
                "Ver:03.27.07_00",
            )
            (other,) = INSTANCES - {holder}
            wrong = await command_round_trip(redis_proc, imei, dev, other)
            assert (wrong["status"], wrong["instance_id"]) == ("not_connected", other)

        # one --metrics endpoint: every worker's series, labelled
        text = await metrics_text(svc)
        per_worker = {
            w: sum(1 for _, h in held.values() if h == f"shutdown-test-{w}") for w in "01"
        }
        for w, n in per_worker.items():
            assert f'teltonika_connections_active{{worker="{w}"}} {float(n)}' in text
        assert "teltonika_workers_running 2.0" in text
        assert 'teltonika_reactor_lag_seconds_count{worker="1"}' in text

        # SIGTERM: every worker drains (closes its devices, unregisters, drops its heartbeat)
        svc.proc.send_signal(signal.SIGTERM)
        # twistd re-raises SIGTERM after a clean shutdown (OPERATIONS.md, exit statuses)
        assert await svc.exited(timeout=40) == -signal.SIGTERM
        for dev, _ in held.values():
            await wait_for(lambda dev=dev: dev.closed.called, timeout=5)
        assert registry(redis_proc) == {}
        for instance in INSTANCES:
            assert redis_proc.cmd("EXISTS", f"instance:heartbeat:{instance}") == 0
        log = svc.log.read_text()
        assert log.count("shutdown complete") == 3  # two workers and the supervisor
    finally:
        svc.kill()


@pytest_twisted.ensureDeferred
async def test_killed_worker_is_restarted_and_its_stale_fields_removed(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    svc = TwistdProcess(redis_proc, tmp_path, "--workers", "2")
    try:
        await svc.ready()
        held = await connect_on_every_worker(svc, redis_proc)
        victim_imei, (victim_dev, victim) = next(
            (imei, v) for imei, v in held.items() if v[1] == "shutdown-test-1"
        )
        victim_pid = worker_pid(svc, 1)
        assert victim_pid in worker_pids(svc.proc.pid)
        os.kill(victim_pid, signal.SIGKILL)  # a crash: no drain, no unregister
        await wait_for(lambda: victim_dev.closed.called, timeout=10)
        # restarted on the same socket, with the same instance id
        await wait_for(lambda: len(worker_pids(svc.proc.pid) - {victim_pid}) == 2, timeout=20)

        async def restart_counted() -> bool:
            return "teltonika_worker_restarts_total 1.0" in await metrics_text(svc)

        await wait_for(restart_counted, timeout=10)
        await svc.ready()
        # the crashed run's fields are gone: no IMEI names worker 1 unless it holds it now
        stale = [imei for imei, (_, h) in held.items() if h == victim]
        await wait_for(
            lambda: not any(registry(redis_proc).get(imei) == victim for imei in stale),
            timeout=10,
        )
        # devices are served by both workers again
        again = await connect_on_every_worker(svc, redis_proc, start=100)
        for dev, _ in again.values():
            dev.send(avl_frame(1))
            assert await dev.expect(4, timeout=10) == b"\x00\x00\x00\x01"
        assert registry(redis_proc).get(victim_imei) != victim
        svc.proc.send_signal(signal.SIGTERM)
        # twistd re-raises SIGTERM after a clean shutdown (OPERATIONS.md, exit statuses)
        assert await svc.exited(timeout=40) == -signal.SIGTERM
    finally:
        svc.kill()


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def shared_dirty_kib(pid: int) -> int:
    """Anonymous memory ``pid`` still shares with its fork server (written before the fork)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Shared_Dirty:"):
                return int(line.split()[1])
    raise AssertionError(f"no Shared_Dirty for {pid}")


@pytest_twisted.ensureDeferred
async def test_workers_are_forked_from_the_preloaded_fork_server(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """The workers share the modules the fork server imported (copy-on-write). A worker that
    imported them itself (exec) shares none: its Shared_Dirty is a few hundred KiB."""
    svc = TwistdProcess(redis_proc, tmp_path, "--workers", "2")
    try:
        await svc.ready()
        (fork_server,) = child_pids(svc.proc.pid)
        with open(f"/proc/{fork_server}/cmdline", "rb") as f:
            assert b"teltonika_ingest.server.forkserver" in f.read()
        workers = worker_pids(svc.proc.pid)
        assert workers == {worker_pid(svc, 0), worker_pid(svc, 1)}
        # named for top / ps -o comm / pgrep: the command line is the fork server's
        assert _comm(fork_server) == "teltonika-fork"
        assert {_comm(worker_pid(svc, i)) for i in (0, 1)} == {"teltonika-w0", "teltonika-w1"}
        for pid in workers:
            assert shared_dirty_kib(pid) > 16 * 1024, pid  # ~30 MiB here
    finally:
        svc.kill()


@pytest_twisted.ensureDeferred
async def test_fork_server_killed_workers_drain_and_supervisor_exits_1(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    svc = TwistdProcess(redis_proc, tmp_path, "--workers", "2")
    try:
        await svc.ready()
        held = await connect_on_every_worker(svc, redis_proc)
        (fork_server,) = child_pids(svc.proc.pid)
        workers = worker_pids(svc.proc.pid)
        os.kill(fork_server, signal.SIGKILL)
        # the kernel SIGTERMs the workers (PR_SET_PDEATHSIG): they drain and unregister
        for dev, _ in held.values():
            await wait_for(lambda dev=dev: dev.closed.called, timeout=20)
        await wait_for(lambda: registry(redis_proc) == {}, timeout=10)
        assert await svc.exited(timeout=40) == 1
        log = svc.log.read_text()
        assert "the fork server of the workers exited unexpectedly" in log
        assert log.count("shutdown complete") == 3, log  # both workers, the supervisor
        assert all(_gone(pid) for pid in workers)  # exited (orphans: reaped by init, or zombies)
    finally:
        svc.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest_twisted.ensureDeferred
async def test_signal_to_every_process_drains_once(
    redis_proc: RedisProcess, tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C in a terminal signals the whole process group, systemd's KillMode=control-group
    every process of the unit: the workers drain, the fork server waits for them, the
    supervisor reports, nothing fails twice."""
    svc = TwistdProcess(redis_proc, tmp_path, "--workers", "2", own_process_group=True)
    try:
        await svc.ready()
        held = await connect_on_every_worker(svc, redis_proc)
        (fork_server,) = child_pids(svc.proc.pid)
        os.killpg(svc.proc.pid, sig)
        code = await svc.exited(timeout=40)
        assert code in (0, -sig), code
        for dev, _ in held.values():
            await wait_for(lambda dev=dev: dev.closed.called, timeout=5)
        assert registry(redis_proc) == {}
        log = svc.log.read_text()
        assert log.count("shutdown complete") == 3, log
        assert "Traceback" not in log and "Unhandled" not in log, log
        assert "worker 0 exited (0)" in log and "worker 1 exited (0)" in log, log
        await wait_for(lambda: _gone(fork_server), timeout=5)
    finally:
        svc.kill()


@pytest_twisted.ensureDeferred
async def test_udp_with_workers_each_source_sticks_to_one_worker(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """UDP: one SO_REUSEPORT socket per worker; the kernel sends a source address to the same
    worker every time, so a resent datagram meets the dedup window that saw the first copy."""
    import socket as socketlib

    from test_udp import datagram

    with socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        udp_port = probe.getsockname()[1]
    svc = TwistdProcess(
        redis_proc, tmp_path, "--workers", "2", "--udp-port", str(udp_port),
        "--udp-interface", "127.0.0.1",
    )  # fmt: skip
    sockets = []
    try:
        await svc.ready()
        for index in range(16):  # 16 source ports: both workers get some (2^-15 otherwise)
            sock = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM)
            sock.settimeout(10)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            data = datagram(index, index, n=2, imei=imei_for(BASE, 500 + index))
            for _copy in range(2):  # the datagram and its resend, from the same address
                sock.sendto(data, ("127.0.0.1", udp_port))
                ack = sock.recv(64)
                assert ack[-1] == 2  # 2 records ACKed, both times
        text = await metrics_text(svc)
        ok = {w: f'teltonika_udp_datagrams_total{{result="ok",worker="{w}"}}' for w in "01"}
        dup = {w: f'teltonika_udp_datagrams_total{{result="duplicate",worker="{w}"}}' for w in "01"}
        values = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("teltonika_udp_datagrams_total{")
        }
        assert all(values.get(ok[w], 0) > 0 for w in "01"), values  # both workers served
        assert sum(values.get(ok[w], 0) for w in "01") == 16
        assert sum(values.get(dup[w], 0) for w in "01") == 16  # every resend recognised
        assert redis_proc.cmd("XLEN", "telemetry:teltonika") == 16 * 2  # none published twice
    finally:
        for sock in sockets:
            sock.close()
        svc.kill()


# --------------------------------------------------------------------------- units


def test_open_files_limit_below_max_connections_warns() -> None:
    import resource

    from twisted.logger import capturedLogs

    from teltonika_ingest.server.tap import raise_open_files_limit

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with capturedLogs() as events:
        raise_open_files_limit(max_connections=hard + 1)  # the soft limit is <= hard
        low = [e for e in events if "below --max-connections" in e.get("log_format", "")]
        raise_open_files_limit(max_connections=100)
        after = [e for e in events if "below --max-connections" in e.get("log_format", "")]
    assert len(low) == 1 and low[0]["max"] == hard + 1
    assert after == low  # a limit far above --max-connections: no warning


def test_listen_address_of_a_tcp_endpoint() -> None:
    from teltonika_ingest.server.workers import parse_tcp_listen

    address = parse_tcp_listen("tcp:5027:interface=127.0.0.1:backlog=50")
    assert (address.host, address.port, address.backlog) == ("127.0.0.1", 5027, 50)
    assert parse_tcp_listen("tcp:port=6000").port == 6000
    with pytest.raises(ValueError, match="tcp:"):
        parse_tcp_listen("ssl:5027:privateKey=k.pem")


def test_workers_need_a_tcp_listener_and_a_redis_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from twisted.python import usage

    from teltonika_ingest.config import Config
    from teltonika_ingest.server.tap import makeService

    with pytest.raises(usage.UsageError, match="--workers: more than one worker needs a plain"):
        Config.from_args(
            ["--workers", "2", "--listen", "unix:/tmp/x.sock"], environ={}, cwd=tmp_path
        )
    config = Config.from_args(["--workers", "2"], environ={}, cwd=tmp_path)
    # a start-up problem: one line (what, why, fix) and exit status 1 (ops/startup.py)
    with pytest.raises(SystemExit) as exited:
        makeService({"config": config})
    assert exited.value.code == 1
    out = capsys.readouterr().out
    assert "start-up failed: --workers 2: more than one worker needs --redis-url" in out
    assert len(out.strip().splitlines()) == 1


def test_fork_server_preloads_the_heavy_modules_without_a_reactor() -> None:
    """What the workers share is what ``preload`` imported; a reactor imported there would be
    shared too (one epoll, one waker pipe for every worker)."""
    import subprocess
    import sys

    code = (
        "import sys; from teltonika_ingest.server import forkserver; forkserver.preload(); "
        "print(' '.join(sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert "twisted.internet.reactor" not in out
    for heavy in (
        "twisted.internet.endpoints",
        "twisted.web.server",
        "twisted.application.internet",
        "prometheus_client",
        "OpenSSL.SSL",
        "teltonika_ingest.config",
        "teltonika_ingest.server.session",
        "twisted.plugins.autobahn_endpoints",
    ):
        assert heavy in out, heavy


def test_merged_exposition_equals_a_parsed_merge() -> None:
    """The supervisor's line-based merge says what a full parse of every worker's text and a
    re-labelled union would: each family once, every sample with its worker label."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from teltonika_ingest.server.workers import merge_exposition

    texts = []
    for index in range(3):
        registry = CollectorRegistry()
        c = Counter("t_frames", "Frames.", ["codec", "result"], registry=registry)
        c.labels(codec="8E", result='o"k}').inc(index + 1)  # quotes and a brace in a value
        if index != 1:  # a family one worker does not have
            Gauge("t_only_some", "Not everywhere.", registry=registry).set(index)
        Gauge("t_active", "Active.", registry=registry).set(10 * index)
        h = Histogram("t_ack_seconds", "ACK.", buckets=(0.01, 0.1), registry=registry)
        h.observe(0.05 * index)
        texts.append((index, generate_latest(registry)))

    def samples(text: str) -> dict[str, set[tuple[str, tuple[tuple[str, str], ...], float]]]:
        out: dict[str, set[Any]] = {}
        for family in text_string_to_metric_families(text):
            assert family.name not in out, f"{family.name} twice"
            out[family.name] = {
                (s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples
            }
        return out

    expected: dict[str, set[Any]] = {}
    for index, text in texts:
        for name, series in samples(text.decode()).items():
            expected.setdefault(name, set()).update(
                (n, tuple(sorted({**dict(lbl), "worker": str(index)}.items())), v)
                for n, lbl, v in series
            )
    merged = merge_exposition(texts).decode()
    assert samples(merged) == expected
    assert merged.count("# HELP t_frames_total Frames.") == 1
    assert 't_active{worker="2"} 20.0' in merged
    assert merge_exposition([]) == b""
