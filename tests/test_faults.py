"""Fault injection against real processes: no ACKed record is ever lost (issue 7).

Every test here starts its own ``redis-server`` (append-only, ``appendfsync always``: what
Redis confirmed survives a SIGKILL of Redis) and one or two ``twistd -n teltonika-ingest``
processes, drives a small fleet of devices that behave like the firmware (one packet in
flight; no ACK within the ACK timeout, or the connection lost: reconnect and resend the same
bytes), logs every ACK they receive (``teltonika_ingest.sim.invariant`` format), injects the
fault, and then checks

* the invariant: zero ACKed records missing from the stream (duplicates counted, allowed);
* recovery: every device ACKed again within a bound after the fault is repaired;
* the registry: every connected device's field names the instance holding it, the
  instance's heartbeat key exists;
* no unhandled or session error counted by the service.

Each test prints one ``FIGURES {...}`` line (``pytest -s``) and, with
``RELIABILITY_FIGURES=path``, appends it to that file as JSON: RELIABILITY.md's figures
come from there. The module also provides the harness ``tests/test_hostile.py`` uses.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.python.failure import Failure

from teltonika_ingest.codec import AvlPacket, encode_avl_frame, encode_imei
from teltonika_ingest.config import RedisTarget
from teltonika_ingest.sim.invariant import AckLog, AckLogWriter, Report, verify

from device import DeviceProtocol, connect_device, deferLater, http_get, wait_for
from redisproc import RedisProcess, free_port
from support import make_record
from test_service_integration import IMEI, start

pytestmark = pytest.mark.integration

TWISTD = str(Path(sys.executable).parent / "twistd")
T0 = 1_700_000_000_000
REGISTRY = "connections:registry"
#: every device must be ACKed again within this many seconds of the repair
RECOVERY_BOUND_S = 15.0


# --------------------------------------------------------------------------- figures


def emit_figures(name: str, figures: dict[str, Any]) -> None:
    """Print one ``FIGURES`` line; append it to ``$RELIABILITY_FIGURES`` if set."""
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print(f"FIGURES {line}")
    path = os.environ.get("RELIABILITY_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


# --------------------------------------------------------------------------- the service


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, KiB)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


class ServiceProcess:
    """One ``twistd -n teltonika-ingest`` process; can be SIGKILLed and started again on the
    same ports (a systemd restart)."""

    def __init__(self, redis: RedisProcess, workdir: Path, instance_id: str, *extra: str) -> None:
        self.redis = redis
        self.workdir = workdir
        self.instance_id = instance_id
        self.extra = extra
        self.device_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path = workdir / f"twistd-{instance_id}.log"

    @property
    def argv(self) -> list[str]:
        return [
            TWISTD, "-n", "--pidfile=", "teltonika-ingest",
            "--listen", f"tcp:{self.device_port}:interface=127.0.0.1",
            "--metrics", f"tcp:{self.http_port}:interface=127.0.0.1",
            "--redis-url", f"redis://127.0.0.1:{self.redis.port}/0",
            "--instance-id", self.instance_id,
            "--config", "",
            *self.extra,
        ]  # fmt: skip

    def start(self) -> ServiceProcess:
        assert self.proc is None or self.proc.poll() is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TELTONIKA_", "REDIS_"))}
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"---- start {self.starts}\n".encode())
            self.proc = subprocess.Popen(
                self.argv, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def ready(self, timeout: float = 30.0) -> None:
        async def answers() -> bool:
            if not self.alive():
                raise AssertionError(f"twistd exited: {self.log_tail()}")
            try:
                code, _ = await http_get(f"http://127.0.0.1:{self.http_port}/readyz")
            except Exception:
                return False
            return code == 200

        await wait_for(answers, timeout=timeout, interval=0.05)

    async def healthy(self) -> bool:
        code, _ = await http_get(f"http://127.0.0.1:{self.http_port}/healthz")
        return code == 200

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    async def terminate(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: not self.alive(), timeout=timeout)
        return int(self.proc.returncode)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        code, body = await http_get(f"http://127.0.0.1:{self.http_port}/metrics")
        assert code == 200
        return parse_metrics(body.decode())

    async def sample(self, name: str, **labels: str) -> float:
        return (await self.metrics()).get((name, frozenset(labels.items())), 0.0)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    async def assert_no_errors(self) -> None:
        """No unhandled error, no session error: nothing a device or Redis did was a bug."""
        metrics = await self.metrics()
        unhandled = metrics.get(("teltonika_unhandled_errors_total", frozenset()), 0.0)
        session = metrics.get(("teltonika_session_errors_total", frozenset()), 0.0)
        assert unhandled == 0 and session == 0, (unhandled, session, self.log_tail())


# --------------------------------------------------------------------------- devices


class AckRecorder:
    """The fleet's ACK log: a file in the invariant's format, and the same in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer = AckLogWriter(path)
        self.log = AckLog()
        self.records = 0
        self.latencies: list[tuple[float, float]] = []  # (ACK time, latency s)

    def acked(self, imei: str, ts: list[int], at: float, latency: float) -> None:
        self.writer.write(imei, ts, at_ms=int(at * 1000))
        self.log.add(imei, ts)
        self.records += len(ts)
        self.latencies.append((at, latency))

    def close(self) -> None:
        self.writer.close()

    def acked_between(self, start: float, end: float) -> int:
        return sum(1 for at, _ in self.latencies if start <= at < end)

    def latencies_between(self, start: float, end: float) -> list[float]:
        return sorted(lat for at, lat in self.latencies if start <= at < end)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class FleetDevice:
    """A device as the firmware behaves: handshake, one packet in flight, and when no ACK
    comes (timeout, connection lost, wrong count) it reconnects and resends the same bytes.

    ``choose_port()`` gives the port of each new connection (devices hop between instances
    when it changes). ``hop_every``: after that many ACKed packets on one connection, hop
    to the next port; every other hop opens the new connection before closing the old one
    (the old socket closes late, as after a NAT rebinding).
    """

    def __init__(
        self,
        index: int,
        choose_port: Callable[[FleetDevice], int],
        recorder: AckRecorder,
        *,
        records: int = 2,
        pace: float = 0.02,
        ack_timeout: float = 3.0,
        reconnect_delay: float = 0.2,
        hop_every: int = 0,
    ) -> None:
        self.index = index
        self.imei = f"35{index:013d}"
        self.choose_port = choose_port
        self.recorder = recorder
        self.records = records
        self.pace = pace
        self.ack_timeout = ack_timeout
        self.reconnect_delay = reconnect_delay
        self.hop_every = hop_every
        self.next_ts = T0 + index * 100_000_000
        self.pending: tuple[bytes, list[int]] | None = None
        self.stopping = False
        self.deadline = float("inf")
        self.port: int | None = None  # the port of the current connection
        self.proto: DeviceProtocol | None = None
        self.ack_times: list[float] = []
        self.connections = 0
        self.connect_failures = 0
        self.resends = 0
        self.hops = 0
        self._on_connection = 0
        self.rnd = random.Random(index)
        self._nap: tuple[defer.Deferred[None], Any] | None = None

    def stop(self, grace: float = 15.0) -> None:
        """Send nothing new; deliver the packet in flight (up to ``grace`` s), then close."""
        self.stopping = True
        self.deadline = reactor.seconds() + grace
        if self._nap is not None:  # wake a device pausing between packets
            d, call = self._nap
            if call.active():
                call.cancel()
                d.callback(None)

    async def _pause(self, seconds: float) -> None:
        d: defer.Deferred[None] = defer.Deferred()
        self._nap = (d, reactor.callLater(seconds, d.callback, None))
        try:
            await d
        finally:
            self._nap = None

    def _done(self) -> bool:
        if reactor.seconds() > self.deadline:
            return True
        return self.stopping and self.pending is None

    async def run(self) -> None:
        try:
            while not self._done():
                if self.proto is None:
                    self.proto = await self._connect(self.choose_port(self))
                    if self.proto is None:
                        continue
                if not await self._exchange(self.proto):
                    self._abort(self.proto)
                    self.proto = None
                    await deferLater(self.reconnect_delay * (0.5 + self.rnd.random()))
                    continue
                if self.hop_every and self._on_connection >= self.hop_every and not self.stopping:
                    await self._hop()
                if self.pace:
                    await self._pause(self.pace)
        finally:
            if self.proto is not None:
                self._abort(self.proto)
                self.proto = None

    @staticmethod
    def _abort(proto: DeviceProtocol) -> None:
        if proto.transport is not None and not proto.closed.called:
            proto.transport.abortConnection()

    async def _connect(self, port: int) -> DeviceProtocol | None:
        try:
            proto = await connect_device(port)
        except Exception:
            self.connect_failures += 1
            await deferLater(self.reconnect_delay * (0.5 + self.rnd.random()))
            return None
        proto.send(encode_imei(self.imei))
        try:
            reply = await proto.expect(1, timeout=self.ack_timeout)
        except Exception:
            reply = b""
        if reply != b"\x01":
            self._abort(proto)
            await deferLater(self.reconnect_delay * (0.5 + self.rnd.random()))
            return None
        self.port = port
        self.connections += 1
        self._on_connection = 0
        return proto

    async def _hop(self) -> None:
        old = self.proto
        assert old is not None
        self.hops += 1
        port = self.choose_port(self)
        if self.hops % 2:
            old.transport.loseConnection()  # clean hop: close, then connect elsewhere
            self.proto = None
            self.proto = await self._connect(port)
        else:
            new = await self._connect(port)  # the old socket lingers, then closes late
            await deferLater(0.05)
            old.transport.loseConnection()
            self.proto = new

    async def _exchange(self, proto: DeviceProtocol) -> bool:
        if proto.closed.called:
            return False
        if self.pending is None:
            if self.stopping:
                return True
            ts = [self.next_ts + i for i in range(self.records)]
            self.next_ts += self.records
            records = tuple(make_record(0, timestamp_ms=t) for t in ts)
            self.pending = (encode_avl_frame(AvlPacket("8E", records)), ts)
        else:
            self.resends += 1
        frame, ts = self.pending
        sent = reactor.seconds()
        proto.send(frame)
        try:
            reply = await proto.expect(4, timeout=self.ack_timeout)
        except Exception:
            return False
        if int.from_bytes(reply, "big") != len(ts):
            return False
        now = reactor.seconds()
        self.recorder.acked(self.imei, ts, now, now - sent)
        self.ack_times.append(now)
        self.pending = None
        self._on_connection += 1
        return True

    def first_ack_after(self, t: float) -> float | None:
        later = [at for at in self.ack_times if at > t]
        return later[0] if later else None


class Fleet:
    def __init__(
        self,
        count: int,
        choose_port: Callable[[FleetDevice], int] | int,
        recorder: AckRecorder,
        first: int = 0,
        **options: Any,
    ) -> None:
        chooser = (lambda _d, p=choose_port: p) if isinstance(choose_port, int) else choose_port
        self.devices = [FleetDevice(first + i, chooser, recorder, **options) for i in range(count)]
        self.recorder = recorder
        self.runs: list[defer.Deferred[None]] = []

    def start(self) -> Fleet:
        self.runs = [defer.ensureDeferred(d.run()) for d in self.devices]
        return self

    async def stop(self, grace: float = 15.0) -> None:
        for d in self.devices:
            d.stop(grace)
        await defer.gatherResults(self.runs, consumeErrors=True)
        self.recorder.writer.flush()

    @property
    def imeis(self) -> list[str]:
        return [d.imei for d in self.devices]

    async def wait_acked(self, per_device: int, timeout: float = 20.0) -> None:
        await wait_for(lambda: all(len(d.ack_times) >= per_device for d in self.devices), timeout)

    async def recovery_after(self, t: float, bound: float = RECOVERY_BOUND_S) -> float:
        """Seconds from ``t`` until every device was ACKed again (fails past ``bound``)."""
        await wait_for(
            lambda: all(d.first_ack_after(t) is not None for d in self.devices),
            timeout=bound,
            interval=0.05,
        )
        firsts = [d.first_ack_after(t) for d in self.devices]
        return max(f for f in firsts if f is not None) - t

    def totals(self) -> dict[str, int]:
        return {
            "devices": len(self.devices),
            "connections": sum(d.connections for d in self.devices),
            "resends": sum(d.resends for d in self.devices),
            "connect_failures": sum(d.connect_failures for d in self.devices),
            "hops": sum(d.hops for d in self.devices),
        }


# --------------------------------------------------------------------------- checks


def redis_target(redis: RedisProcess) -> RedisTarget:
    return RedisTarget.parse(f"redis://127.0.0.1:{redis.port}/0")


def check_invariant(redis: RedisProcess, recorder: AckRecorder, **kw: Any) -> Report:
    """Verify the ACK log *file* against the stream: zero ACKed records missing."""
    recorder.writer.flush()
    report = verify(redis_target(redis), [recorder.path], **kw)
    assert report.missing == 0, report.summary()
    assert report.acked_records > 0
    return report


def registry(redis: RedisProcess) -> dict[str, str]:
    flat = redis.cmd("HGETALL", REGISTRY) or []
    return dict(zip(flat[0::2], flat[1::2], strict=True))


async def wait_registry(redis: RedisProcess, expected: dict[str, str], timeout: float) -> float:
    """Wait until the registry is exactly ``expected``; returns the seconds it took."""
    started = reactor.seconds()

    def matches() -> bool:
        try:
            return registry(redis) == expected
        except (OSError, Exception):
            return False

    try:
        await wait_for(matches, timeout=timeout, interval=0.05)
    except AssertionError:
        current = registry(redis)
        wrong = {k: (current.get(k), v) for k, v in expected.items() if current.get(k) != v}
        stale = set(current) - set(expected)
        raise AssertionError(f"registry differs: wrong {wrong}, stale {stale}") from None
    return reactor.seconds() - started


def figures_of(report: Report, fleet: Fleet) -> dict[str, Any]:
    return {
        "acked_records": report.acked_records,
        "missing": report.missing,
        "duplicates": report.duplicates,
        "never_acked_in_stream": report.extra,
        **fleet.totals(),
    }


async def settle(seconds: float) -> None:
    await deferLater(seconds)


# --------------------------------------------------------------------------- the faults


@pytest_twisted.ensureDeferred
async def test_redis_sigkill_and_restart_mid_traffic(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    svc = ServiceProcess(redis_proc, tmp_path, "fault-a", "--publish-timeout", "1").start()
    recorder = AckRecorder(tmp_path / "acks.log")
    try:
        await svc.ready()
        fleet = Fleet(20, svc.device_port, recorder).start()
        await fleet.wait_acked(10)
        await settle(1.0)

        killed_at = reactor.seconds()
        redis_proc.kill()  # SIGKILL: AOF with appendfsync always keeps what it confirmed
        await settle(0.5)
        down_from = reactor.seconds()  # ACKs confirmed before the kill have arrived by now
        await settle(1.5)
        acked_while_down = recorder.acked_between(down_from, reactor.seconds())
        redis_proc.start(wait="none")
        await wait_for(lambda: _pong(redis_proc), timeout=15)
        back_at = reactor.seconds()

        recovery = await fleet.recovery_after(back_at)
        await wait_registry(redis_proc, dict.fromkeys(fleet.imeis, "fault-a"), timeout=10)
        assert redis_proc.cmd("EXISTS", "instance:heartbeat:fault-a") == 1
        await settle(1.0)
        await fleet.stop()
        assert acked_while_down == 0  # nothing is ACKed while Redis is away
        report = check_invariant(redis_proc, recorder)
        await svc.assert_no_errors()
        assert (
            await svc.sample("teltonika_publish_failures_total", reason="unavailable")
            + (await svc.sample("teltonika_publish_failures_total", reason="timeout"))
            > 0
        )
        emit_figures(
            "redis_sigkill_restart",
            {
                **figures_of(report, fleet),
                "redis_down_s": round(back_at - killed_at, 2),
                "recovery_s": round(recovery, 2),
                "acked_while_down": acked_while_down,
            },
        )
    finally:
        recorder.close()
        svc.kill()


def _pong(redis: RedisProcess) -> bool:
    try:
        return bool(redis.cmd("PING") == "PONG")
    except Exception:
        return False


@pytest_twisted.ensureDeferred
async def test_redis_client_pause_longer_than_publish_timeout(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    svc = ServiceProcess(redis_proc, tmp_path, "fault-a", "--publish-timeout", "1").start()
    recorder = AckRecorder(tmp_path / "acks.log")
    try:
        await svc.ready()
        fleet = Fleet(20, svc.device_port, recorder).start()
        await fleet.wait_acked(10)
        await settle(0.5)

        pause_ms = 3000  # three times --publish-timeout
        paused_at = reactor.seconds()
        assert redis_proc.cmd("CLIENT", "PAUSE", str(pause_ms), "ALL") == "OK"
        # no Redis calls from here until the pause is over: they would block the test
        await settle(0.3)
        quiet_from = reactor.seconds()
        await settle(pause_ms / 1000 - 0.5)
        acked_while_paused = recorder.acked_between(quiet_from, reactor.seconds())
        await wait_for(lambda: reactor.seconds() > paused_at + pause_ms / 1000 + 0.05)
        resumed_at = reactor.seconds()

        recovery = await fleet.recovery_after(resumed_at)
        await settle(1.0)
        expected = dict.fromkeys(fleet.imeis, "fault-a")
        lost_fields = len(set(expected.items()) - set(registry(redis_proc).items()))
        await wait_registry(redis_proc, expected, timeout=10)
        await fleet.stop()
        assert acked_while_paused == 0
        report = check_invariant(redis_proc, recorder)
        await svc.assert_no_errors()
        assert await svc.sample("teltonika_publish_failures_total", reason="timeout") > 0
        emit_figures(
            "redis_client_pause",
            {
                **figures_of(report, fleet),
                "pause_s": pause_ms / 1000,
                "publish_timeout_s": 1,
                "recovery_s": round(recovery, 2),
                "acked_while_paused": acked_while_paused,
                "registry_fields_lost": lost_fields,
            },
        )
    finally:
        recorder.close()
        svc.kill()


@pytest_twisted.ensureDeferred
async def test_redis_restarted_empty(redis_proc: RedisProcess, tmp_path: Path) -> None:
    """Redis comes back with no data at all (its disk was lost).

    What Redis confirmed and then lost is lost by Redis, not by the service: the invariant
    is checked for ACKs received after Redis came back. What this proves is that the service
    recovers from it: registry fields and the heartbeat written again without any device
    reconnecting (the quiet devices send nothing while Redis is away, so their connections
    stay up: only the service's re-registration on reconnect can bring their fields back),
    the publish script reloaded (NOSCRIPT), new packets ACKed and stored.
    """
    svc = ServiceProcess(redis_proc, tmp_path, "fault-a", "--publish-timeout", "1").start()
    recorder = AckRecorder(tmp_path / "acks.log")
    try:
        await svc.ready()
        fleet = Fleet(20, svc.device_port, recorder).start()
        quiet = Fleet(4, svc.device_port, recorder, first=100, pace=60.0).start()
        await fleet.wait_acked(10)
        await quiet.wait_acked(1)
        everyone = dict.fromkeys(fleet.imeis + quiet.imeis, "fault-a")
        await wait_registry(redis_proc, everyone, timeout=10)
        acked_before = recorder.records

        redis_proc.kill()
        shutil.rmtree(Path(redis_proc.dir) / "appendonlydir")
        await settle(1.0)
        redis_proc.start(wait="none")
        await wait_for(lambda: _pong(redis_proc), timeout=15)
        back_at = reactor.seconds()

        # the registry comes back, the quiet devices' fields too
        registry_s = await wait_registry(redis_proc, everyone, timeout=RECOVERY_BOUND_S)
        assert [d.connections for d in quiet.devices] == [1, 1, 1, 1]
        await wait_for(
            lambda: redis_proc.cmd("EXISTS", "instance:heartbeat:fault-a") == 1, timeout=10
        )
        recovery = await fleet.recovery_after(back_at)
        await settle(1.0)
        await fleet.stop()
        await quiet.stop()
        acked_after = recorder.acked_between(back_at, float("inf"))
        report = check_invariant(redis_proc, recorder, since_ms=int(back_at * 1000))
        assert report.acked_records > 0
        await svc.assert_no_errors()
        emit_figures(
            "redis_restarted_empty",
            {
                **figures_of(report, fleet),
                "acked_before_wipe_lost_by_redis": acked_before,
                "packets_acked_after_restart": acked_after,
                "registry_restored_s": round(registry_s, 2),
                "recovery_s": round(recovery, 2),
            },
        )
    finally:
        recorder.close()
        svc.kill()


@pytest_twisted.ensureDeferred
async def test_service_sigkill_and_restart_while_devices_reconnect(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    svc = ServiceProcess(redis_proc, tmp_path, "fault-a").start()
    recorder = AckRecorder(tmp_path / "acks.log")
    try:
        await svc.ready()
        # nearly back-to-back: packets are in flight when the process dies
        fleet = Fleet(30, svc.device_port, recorder, pace=0.002).start()
        await fleet.wait_acked(10)
        await settle(0.5)

        svc.kill()  # SIGKILL: no drain, no unregister; packets in flight lose their ACK
        killed_at = reactor.seconds()
        await settle(1.5)  # devices keep reconnecting: refused
        refused = sum(d.connect_failures for d in fleet.devices)
        svc.start()  # same ports, same instance id (as systemd's Restart=on-failure)
        await svc.ready()
        ready_at = reactor.seconds()

        recovery = await fleet.recovery_after(ready_at)
        await wait_registry(redis_proc, dict.fromkeys(fleet.imeis, "fault-a"), timeout=10)
        assert redis_proc.cmd("EXISTS", "instance:heartbeat:fault-a") == 1
        await settle(1.0)
        await fleet.stop()
        report = check_invariant(redis_proc, recorder)
        assert refused > 0
        await svc.assert_no_errors()
        status = await svc.terminate()
        assert status in (0, -signal.SIGTERM), svc.log_tail()
        await wait_registry(redis_proc, {}, timeout=5)  # clean stop unregisters
        emit_figures(
            "service_sigkill_restart",
            {
                **figures_of(report, fleet),
                "service_down_s": round(ready_at - killed_at, 2),
                "recovery_s": round(recovery, 2),
            },
        )
    finally:
        recorder.close()
        svc.kill()


@pytest_twisted.ensureDeferred
async def test_two_instances_devices_hopping_then_one_killed(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    a = ServiceProcess(redis_proc, tmp_path, "fault-a").start()
    b = ServiceProcess(redis_proc, tmp_path, "fault-b").start()
    recorder = AckRecorder(tmp_path / "acks.log")
    ports = {a.device_port: "fault-a", b.device_port: "fault-b"}
    state = {"hopping": True, "a_dead": False}

    def choose(device: FleetDevice) -> int:
        if state["a_dead"]:
            return b.device_port
        if device.port is None:
            return a.device_port if device.index % 2 else b.device_port
        # hop to the other instance (also what a device does when its server is down)
        return b.device_port if device.port == a.device_port else a.device_port

    try:
        await a.ready()
        await b.ready()
        fleet = Fleet(24, choose, recorder, hop_every=4).start()
        await wait_for(lambda: all(d.hops >= 6 for d in fleet.devices), timeout=30)

        for d in fleet.devices:  # stop hopping: each device stays where it is
            d.hop_every = 0
        await settle(0.5)
        holders = {d.imei: ports[d.port] for d in fleet.devices if d.port is not None}
        assert len(holders) == len(fleet.devices)
        hop_registry_s = await wait_registry(redis_proc, holders, timeout=10)

        a.kill()  # instance a dies: its devices move to b
        state["a_dead"] = True
        killed_at = reactor.seconds()
        recovery = await fleet.recovery_after(killed_at + 0.5)
        await wait_registry(redis_proc, dict.fromkeys(fleet.imeis, "fault-b"), timeout=10)
        await settle(1.0)
        await fleet.stop()
        report = check_invariant(redis_proc, recorder)
        await b.assert_no_errors()
        emit_figures(
            "two_instances_hopping",
            {
                **figures_of(report, fleet),
                "registry_consistent_after_hops_s": round(hop_registry_s, 2),
                "recovery_after_instance_kill_s": round(recovery + 0.5, 2),
            },
        )
    finally:
        recorder.close()
        a.kill()
        b.kill()


class RegistryWrites:
    """Records, in order, the registry's writes as sent to and answered by Redis, and when a
    device's register was asked for: what shows that a test's race really happened."""

    def __init__(self, registry: Any) -> None:
        self.events: list[str] = []
        redis = registry.redis
        execute, run_script, register = redis.execute, redis.run_script, registry.register

        def spy_execute(*args: Any, **kw: Any) -> Any:
            d = execute(*args, **kw)
            return self._watch("register", d) if args[0] == "HSET" else d

        def spy_run_script(script: Any, keys: Any, args: Any, **kw: Any) -> Any:
            return self._watch("unregister", run_script(script, keys, args, **kw))

        def spy_register(imei: str) -> Any:
            self.events.append("register asked")
            return register(imei)

        redis.execute, redis.run_script = spy_execute, spy_run_script
        registry.register = spy_register

    def _watch(self, name: str, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self.events.append(f"sent {name}")

        def done(result: Any) -> Any:
            failed = isinstance(result, Failure)
            self.events.append(f"{'failed' if failed else 'answered'} {name}")
            return result

        return d.addBoth(done)

    def answered(self, name: str) -> bool:
        return any(e in (f"answered {name}", f"failed {name}") for e in self.events)


def command_stats(redis: RedisProcess, command: str) -> dict[str, int]:
    """``INFO commandstats`` of one command: calls, failed_calls, ..."""
    for line in redis.cmd("INFO", "commandstats").splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            pairs = (kv.split("=") for kv in line.split(":", 1)[1].split(","))
            return {k: int(float(v)) for k, v in pairs}
    return {}


@pytest_twisted.ensureDeferred
async def test_registry_field_kept_when_unregister_is_reordered_by_noscript(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """The device closes and reconnects to the same instance while Redis stalls (here a
    CLIENT PAUSE of 1 s), before the compare-and-delete script is in Redis's script cache
    (a fresh or restarted Redis, SCRIPT FLUSH). The device is connected: its field must stay.
    The command timeout (5 s) outlasts the pause: the unregister is answered, not timed out."""
    running = await start(redis_proc, tmp_path, "--publish-timeout", "5")
    try:
        dev = await running.device()
        await wait_for(lambda: redis_proc.cmd("HGET", REGISTRY, IMEI) == "test-a")
        writes = RegistryWrites(running.svc.registry)
        redis_proc.cmd("SCRIPT", "FLUSH")
        redis_proc.cmd("CLIENT", "PAUSE", "1000", "ALL")
        await dev.close()  # -> EVALSHA compare-and-delete (NOSCRIPT, then EVAL)
        await wait_for(lambda: running.sample("teltonika_connections_active") == 0)
        dev2 = await running.device()  # -> HSET
        await wait_for(lambda: writes.answered("register"), timeout=10)  # the pause is over
        await running.svc.registry.settled()
        # the race happened: the device was back while its unregister waited in Redis, and
        # that unregister went through the NOSCRIPT retry
        assert writes.events == [
            "sent unregister", "register asked", "answered unregister",
            "sent register", "answered register",
        ], writes.events  # fmt: skip
        assert command_stats(redis_proc, "evalsha").get("failed_calls", 0) >= 1
        assert command_stats(redis_proc, "eval").get("calls", 0) >= 1
        assert running.sample("teltonika_connections_active") == 1
        assert redis_proc.cmd("HGET", REGISTRY, IMEI) == "test-a"
        await dev2.close()
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_registry_field_kept_when_unregister_is_reordered_by_the_pool(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """As above with the script cached, while the service's shared (pooled) connections
    are busy too (a PING sent just before): the device's HSET must not overtake its
    compare-and-delete, whichever connection Redis serves first after the stall."""
    from teltonika_ingest.server.registry import COMPARE_AND_DELETE

    running = await start(redis_proc, tmp_path, "--publish-timeout", "5")
    try:
        redis_proc.cmd("SCRIPT", "LOAD", COMPARE_AND_DELETE.source)
        dev = await running.device()
        await wait_for(lambda: redis_proc.cmd("HGET", REGISTRY, IMEI) == "test-a")
        writes = RegistryWrites(running.svc.registry)
        redis_proc.cmd("CLIENT", "PAUSE", "800", "ALL")
        ping = running.svc.redis.execute("PING")
        ping.addErrback(lambda _f: None)
        await dev.close()  # compare-and-delete
        await wait_for(lambda: running.sample("teltonika_connections_active") == 0)
        dev2 = await running.device()  # HSET
        await wait_for(lambda: writes.answered("register"), timeout=10)
        await running.svc.registry.settled()
        assert writes.events == [
            "sent unregister", "register asked", "answered unregister",
            "sent register", "answered register",
        ], writes.events  # fmt: skip
        assert ping.called  # the pooled PING was held by the same stall
        assert running.sample("teltonika_connections_active") == 1
        assert redis_proc.cmd("HGET", REGISTRY, IMEI) == "test-a"
        await dev2.close()
    finally:
        await running.svc.stopService()


@pytest_twisted.ensureDeferred
async def test_registry_field_kept_when_the_unregister_timed_out(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """The compare-and-delete times out (Redis stalled longer than the command timeout) but
    stays queued in Redis; the device reconnects, and its HSET is sent only after that. The
    device is connected: its field must stay."""
    from teltonika_ingest.server.registry import COMPARE_AND_DELETE

    running = await start(redis_proc, tmp_path)  # --publish-timeout 1: the command timeout
    try:
        redis_proc.cmd("SCRIPT", "LOAD", COMPARE_AND_DELETE.source)
        dev = await running.device()
        await wait_for(lambda: redis_proc.cmd("HGET", REGISTRY, IMEI) == "test-a")
        writes = RegistryWrites(running.svc.registry)
        hsets = command_stats(redis_proc, "hset").get("calls", 0)
        redis_proc.cmd("CLIENT", "PAUSE", "2500", "ALL")
        await dev.close()  # compare-and-delete
        await wait_for(lambda: running.sample("teltonika_connections_active") == 0)
        # it times out on our side (still queued in Redis)
        await wait_for(lambda: writes.answered("unregister"), timeout=10)
        assert writes.events == ["sent unregister", "failed unregister"], writes.events
        dev2 = await running.device()  # HSET
        assert writes.events[2:4] == ["register asked", "sent register"], writes.events
        # Redis runs what was queued once the pause is over: the compare-and-delete, then the
        # HSET (one connection, in order), whether or not our side waited for its answer
        await wait_for(lambda: command_stats(redis_proc, "hset").get("calls", 0) > hsets, 10)
        await running.svc.registry.settled()
        assert running.sample("teltonika_connections_active") == 1
        assert redis_proc.cmd("HGET", REGISTRY, IMEI) == "test-a"
        await dev2.close()
    finally:
        await running.svc.stopService()


def test_recorder_and_first_ack_helpers(tmp_path: Path) -> None:
    recorder = AckRecorder(tmp_path / "a.log")
    device = FleetDevice(1, lambda _d: 0, recorder)
    device.ack_times = [1.0, 2.0, 3.0]
    assert device.first_ack_after(1.5) == 2.0
    assert device.first_ack_after(3.0) is None
    recorder.acked(device.imei, [T0], 10.0, 0.001)
    recorder.close()
    assert recorder.acked_between(9.0, 11.0) == 1
    assert json.loads((tmp_path / "a.log").read_text())["ts"] == T0
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
