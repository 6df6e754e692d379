"""Simulated Teltonika devices: load generator and replay of captured frames.

Every simulated device behaves like a real tracker (protocol.md §1, §4): it connects,
sends its IMEI handshake, waits for ``01``, then sends AVL packets one at a time, each
only after the ACK of the previous one. A packet that gets no ACK within the ACK
timeout (or a wrong count, or a dropped connection) is sent again, byte for byte,
after reconnecting. Devices can answer Codec 12/14 GPRS commands.

Cheap per packet, so that the simulator is not what a benchmark measures:

* frames are encoded once per *template* (a few per codec, shared by devices); a new
  packet copies its template's bytes after patching the record timestamps and the CRC
  in place (``FrameTemplate.build``: ~3 µs for 10 records);
* one reactor, no per-packet timers: ACK and handshake timeouts are found by one
  periodic sweep; paced devices use one ``callLater`` per packet;
* latencies go into a log-linear histogram (``LatencyHistogram``: exact to 1 µs below
  1 ms, 1 % above), which also merges across processes.

Timeline of a run (seconds after start): device *i* of *N* connects at
``ramp_up * i / N``; back-to-back devices send as soon as their handshake is accepted;
paced devices (``rate`` > 0) send their first packet at ``ramp_up + (i / N) / rate``
(start times spread over the first period after the ramp-up) and then every
``1 / rate`` s. With a ``duration``, sending stops at ``ramp_up + duration``; the
*steady window* is ``[ramp_up, ramp_up + duration]``: rates and the "steady" latency
percentiles count only that window, so connection storms do not pollute them.
With ``packets``, each device stops after that many ACKed packets.

This module never prints: progress goes to a callback, results are plain dicts.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from teltonika_ingest.codec import (
    CODEC_8,
    CODEC_8E,
    CODEC_16,
    AvlPacket,
    CommandMessage,
)
from teltonika_ingest.sim.devices import (
    AWAITING_ACK,
    HANDSHAKE_SENT,
    BaseDevice,
    TcpDevice,
    UdpDevice,
    default_answer,
)
from teltonika_ingest.sim.stats import Stats
from teltonika_ingest.sim.traffic import (
    FrameTemplate,
    SimConfig,
    UdpTemplate,
    build_packet,
    imei_for,
    source_address,
)

# --------------------------------------------------------------------------- the run


class Simulation:
    """Many devices on one reactor. ``run()`` fires with the summary dict."""

    def __init__(
        self,
        config: SimConfig,
        *,
        reactor: Any = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        on_command: Callable[[str, CommandMessage], None] | None = None,
        on_ack: Callable[[str, int, int], None] | None = None,
        answer: Callable[[str, str], bytes] = default_answer,
    ) -> None:
        config.validate()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.progress = progress
        self.on_command = on_command
        #: called with (imei, first record timestamp ms, record count) for every ACKed packet
        self.on_ack = on_ack
        self.answer = answer
        self.rnd = random.Random(config.seed + config.first_device)
        self.stats = Stats()
        self.records = config.records
        self.period = 1.0 / config.rate if config.rate > 0 else 0.0
        self.packets_limit = config.packets
        self.sending_stopped = False
        self.closing = False
        self.connecting = 0
        self.open_connections = 0
        self.handshaken = 0
        self.finished_devices = 0
        self.interval_latencies: list[float] = []
        self.steady_from = 0.0  # perf_counter bounds of the steady window
        self.steady_until = float("inf")
        self.stop_wall = float("inf")  # reactor time when sending stops (with a duration)
        self.udp_host = ""
        self.udp_port = config.udp_port or 0
        self.devices: list[BaseDevice] = []
        self._result: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._calls: list[Any] = []  # IDelayedCall
        self._loops: list[LoopingCall] = []
        self._started_wall = 0.0
        self._started_perf = 0.0
        self._stopped_perf: float | None = None
        self._steady_start_counts: dict[str, int] | None = None
        self._steady_end_counts: dict[str, int] | None = None
        self._last_tick: tuple[float, int, int] = (0.0, 0, 0)
        self._close_deadline: Any = None  # IDelayedCall | None
        self.incomplete = False
        self._build_devices()

    # -- set-up

    def _codec_of(self, global_index: int) -> str:
        if self.config.codec == "mix":
            return (CODEC_8, CODEC_8E, CODEC_16)[global_index % 3]
        return self.config.codec

    def _build_devices(self) -> None:
        config = self.config
        if config.udp:
            self.udp_host = socket.gethostbyname(config.host)
        rnd = random.Random(config.seed)
        ios = config.ios
        packets: dict[str, list[AvlPacket]] = {}
        codecs = {self._codec_of(i) for i in range(3)} if config.codec == "mix" else {config.codec}
        count = max(1, min(config.templates, config.devices))
        for codec in sorted(codecs):
            packets[codec] = [build_packet(codec, config.records, ios, rnd) for _ in range(count)]
        tcp_templates = {
            codec: [FrameTemplate(p) for p in plist] for codec, plist in packets.items()
        }
        for local in range(config.devices):
            index = config.first_device + local
            imei = imei_for(config.imei_base, index)
            codec = self._codec_of(index)
            slot = (index // (3 if config.codec == "mix" else 1)) % count
            device: BaseDevice
            if config.udp:
                device = UdpDevice(self, index, imei, UdpTemplate(packets[codec][slot], imei))
            else:
                device = TcpDevice(self, index, imei, tcp_templates[codec][slot])
            self.devices.append(device)

    def bind_address(self, index: int) -> tuple[str, int] | None:
        """Where device ``index`` (global) binds its socket: with --source-addresses, one of
        that many loopback addresses (past the ~28,000 ephemeral ports of one address)."""
        n = self.config.source_addresses
        return (source_address(index % n), 0) if n else None

    @property
    def frame_sizes(self) -> list[int]:
        return sorted({d.template.size for d in self.devices})

    # -- run

    def run(self) -> defer.Deferred[dict[str, Any]]:
        config = self.config
        clock = self.clock
        total = config.total_devices or config.devices
        self._started_wall = clock.seconds()
        self._started_perf = time.perf_counter()
        self.steady_from = self._started_perf + config.ramp_up
        period = self.period
        for device in self.devices:
            share = device.index / total if total else 0.0
            device.next_due = self._started_wall + config.ramp_up + share * period
            self._calls.append(clock.callLater(config.ramp_up * share, device.start))
        if config.duration is not None:
            stop_at = config.ramp_up + config.duration
            self.stop_wall = self._started_wall + stop_at
            self._calls.append(clock.callLater(stop_at, self._stop_sending))
        if config.ramp_up > 0:
            self._calls.append(clock.callLater(config.ramp_up, self._steady_begins))
        else:
            self._steady_start_counts = self._counts()
        self._calls.append(clock.callLater(config.effective_max_time, self._overtime))
        sweep_every = max(0.05, min(1.0, config.ack_timeout / 5))
        self._start_loop(self._sweep, sweep_every)
        if self.progress is not None and config.progress_interval > 0:
            self._last_tick = (self._started_perf, 0, 0)
            self._start_loop(self._tick, config.progress_interval, now=False)
        if not self.devices:
            self._calls.append(clock.callLater(0, self._stop_sending))
        return self._result

    def _start_loop(self, fn: Callable[[], None], interval: float, now: bool = True) -> None:
        loop = LoopingCall(fn)
        loop.clock = self.clock
        self._loops.append(loop)
        loop.start(interval, now=now)

    def _counts(self) -> dict[str, int]:
        stats = self.stats
        return {
            "packets_acked": stats.packets_acked,
            "records_acked": stats.records_acked,
            "perf": int(time.perf_counter() * 1e6),
        }

    def _steady_begins(self) -> None:
        self._steady_start_counts = self._counts()

    def _sweep(self) -> None:
        now = time.perf_counter()
        timeout = self.config.ack_timeout
        for device in self.devices:
            if device.state >= HANDSHAKE_SENT:
                device.sweep(now, timeout)

    def _tick(self) -> None:
        now = time.perf_counter()
        stats = self.stats
        last_t, last_packets, last_records = self._last_tick
        span = max(now - last_t, 1e-9)
        lats = sorted(self.interval_latencies)
        self.interval_latencies = []
        p99 = lats[min(len(lats) - 1, int(len(lats) * 0.99))] * 1000 if lats else 0.0
        assert self.progress is not None
        self.progress(
            {
                "t": round(now - self._started_perf, 3),
                "devices": len(self.devices),
                "connected": self.handshaken,
                "packets_acked": stats.packets_acked,
                "records_acked": stats.records_acked,
                "packets_per_s": (stats.packets_acked - last_packets) / span,
                "records_per_s": (stats.records_acked - last_records) / span,
                "p99_ms": p99,
                "reconnects": stats.reconnects,
                "errors": sum(stats.errors.values()),
            }
        )
        self._last_tick = (now, stats.packets_acked, stats.records_acked)

    def _device_finished(self) -> None:
        self.finished_devices += 1
        if (
            self.config.duration is None
            and self.finished_devices >= len(self.devices)
            and not self.closing
        ):
            self._stop_sending()

    def _stop_sending(self) -> None:
        if self.sending_stopped:
            return
        self.sending_stopped = True
        self._stopped_perf = time.perf_counter()
        self.steady_until = self._stopped_perf
        self._steady_end_counts = self._counts()
        if self._steady_start_counts is None:
            self._steady_start_counts = {"packets_acked": 0, "records_acked": 0, "perf": 0}
        for device in self.devices:
            if device.state is not AWAITING_ACK:
                device._cancel_timer()
        if not self.closing:
            self._start_loop(self._check_drained, 0.02)

    def _check_drained(self) -> None:
        """After sending stopped: close once no packet awaits its ACK (or past the timeout)."""
        if self.closing:
            return
        if not any(d.state is AWAITING_ACK for d in self.devices):
            self._close_all()
        elif self._stopped_perf is not None and (
            time.perf_counter() - self._stopped_perf > self.config.ack_timeout
        ):
            self.incomplete = True
            self._close_all()

    def stop(self) -> None:
        """Stop sending now; close once in-flight packets are ACKed (again: close now)."""
        if not self.sending_stopped:
            self._stop_sending()
        elif not self.closing:
            self.incomplete = True
            self._close_all()

    def _overtime(self) -> None:
        if not self.closing:
            self.incomplete = True
            self._stop_sending()
            self._close_all()

    def _close_all(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self._stopped_perf is None:
            self._stop_sending()
        self._ended_perf = time.perf_counter()
        for call in self._calls:
            if call.active():
                call.cancel()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self.progress is not None:
            self._tick()
        for device in self.devices:
            device.close()
        self._close_deadline = self.clock.callLater(5.0, self._abort_rest)
        self._connection_gone()

    def _abort_rest(self) -> None:
        self._close_deadline = None
        for device in self.devices:
            proto = getattr(device, "proto", None)
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()
        self._complete()

    def _connection_gone(self) -> None:
        if self.closing and self.open_connections <= 0 and self.connecting <= 0:
            self._complete()

    def _complete(self) -> None:
        if self._result.called:
            return
        if self._close_deadline is not None and self._close_deadline.active():
            self._close_deadline.cancel()
        self._result.callback(self.summary())

    # -- results

    def summary(self) -> dict[str, Any]:
        config = self.config
        stats = self.stats
        end_perf = getattr(self, "_ended_perf", time.perf_counter())
        elapsed = end_perf - self._started_perf
        start = self._steady_start_counts or {"packets_acked": 0, "records_acked": 0, "perf": 0}
        end = self._steady_end_counts or self._counts()
        window = (end["perf"] - (start["perf"] or int(self._started_perf * 1e6))) / 1e6
        packets = end["packets_acked"] - start["packets_acked"]
        records = end["records_acked"] - start["records_acked"]
        out: dict[str, Any] = {
            "mode": "udp" if config.udp else "tcp",
            "host": config.host,
            "port": config.udp_port if config.udp else config.port,
            "devices": len(self.devices),
            "codec": config.codec,
            "records_per_packet": config.records,
            "ios_per_record": config.ios,
            "frame_bytes": self.frame_sizes,
            "rate_per_device": config.rate,
            "ramp_up_s": config.ramp_up,
            "duration_s": config.duration,
            "packets_per_device": config.packets,
            "processes": 1,
            "elapsed_s": round(elapsed, 3),
            "window_s": round(window, 3),
            "window_packets_acked": packets,
            "window_records_acked": records,
            "packets_per_s": packets / window if window > 0 else 0.0,
            "records_per_s": records / window if window > 0 else 0.0,
            **stats.counters(),
            "connected_at_end": self.handshaken,
            "errors": dict(sorted(stats.errors.items())),
            "errors_total": sum(stats.errors.values()),
            "incomplete": self.incomplete,
            "ack_latency_ms": stats.latency.summary_ms(),
            "steady_ack_latency_ms": stats.steady_latency.summary_ms(),
            "histogram": stats.latency.to_json(),
            "steady_histogram": stats.steady_latency.to_json(),
        }
        return out
