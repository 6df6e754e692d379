"""UDP device listener (protocol.md §4).

Each datagram is decoded, published, and only then ACKed with the UDP ACK format. A device
that missed our ACK resends the same datagram (same IMEI and AVL packet id): within
``dedup_window`` seconds it is ACKed again without being published twice.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika_ingest.codec import CodecError, decode_udp_datagram, encode_udp_ack
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.publisher import Publisher

log = Logger()

_PURGE_EVERY = 1024  # datagrams between sweeps of the dedup table


class UdpListener(DatagramProtocol):
    def __init__(
        self,
        *,
        publisher: Publisher,
        metrics: Metrics,
        clock: IReactorTime,
        dedup_window: float = 60.0,
    ) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self.clock = clock
        self.dedup_window = dedup_window
        # (imei, avl packet id) -> (digest of the datagram body, when published, ack count)
        self._published: dict[tuple[str, int], tuple[bytes, float, int]] = {}
        # (imei, avl packet id, digest) -> publish in progress
        self._in_progress: set[tuple[str, int, bytes]] = set()
        self._since_purge = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            self._handle(datagram, addr)
        except Exception:
            self.metrics.session_errors.inc()
            log.failure("unexpected error handling a UDP datagram from {peer}", peer=addr)

    def _handle(self, datagram: bytes, addr: Any) -> None:
        metrics = self.metrics
        metrics.bytes_received.inc(len(datagram))
        try:
            pkt = decode_udp_datagram(datagram)
        except CodecError as e:
            metrics.udp_datagrams.labels(result="malformed").inc()
            log.warn(
                "malformed UDP datagram from {peer}: {error}", peer=f"{addr[0]}:{addr[1]}", error=e
            )
            return
        now = self.clock.seconds()
        self._since_purge += 1
        if self._since_purge >= _PURGE_EVERY:
            self._purge(now)
        key = (pkt.imei, pkt.avl_packet_id)
        # The datagram minus its 2-byte packet id (a resend may carry a new packet id).
        digest = hashlib.blake2b(datagram[4:], digest_size=16).digest()
        seen = self._published.get(key)
        count = len(pkt.packet.records)
        if seen is not None and seen[0] == digest and now - seen[1] <= self.dedup_window:
            metrics.udp_datagrams.labels(result="duplicate").inc()
            log.debug("re-ACKing resent UDP packet {key}", key=key)
            self._write(encode_udp_ack(pkt.packet_id, pkt.avl_packet_id, seen[2]), addr)
            return
        if (pkt.imei, pkt.avl_packet_id, digest) in self._in_progress:
            # The first copy is still being published; its ACK will answer this one too.
            metrics.udp_datagrams.labels(result="duplicate").inc()
            return
        codec = pkt.packet.codec
        metrics.frames.labels(codec=codec, result="ok").inc()
        marker = (pkt.imei, pkt.avl_packet_id, digest)
        self._in_progress.add(marker)
        received = now
        d = self.publisher.publish(pkt.imei, pkt.packet, int(now * 1000), now)

        def published(_: Any) -> None:
            self._in_progress.discard(marker)
            self._published[key] = (digest, self.clock.seconds(), count)
            metrics.records.labels(codec=codec).inc(count)
            metrics.udp_datagrams.labels(result="ok").inc()
            self._write(encode_udp_ack(pkt.packet_id, pkt.avl_packet_id, count), addr)
            acked = self.clock.seconds()
            metrics.ack_latency.observe(acked - received)
            metrics.reply_to_ack.observe(acked - self.publisher.replied_at)

        def failed(failure: Failure) -> None:
            self._in_progress.discard(marker)
            metrics.udp_datagrams.labels(result="publish_failed").inc()
            log.error(
                "publish failed for UDP packet of {imei}; not ACKed: {error}",
                imei=pkt.imei,
                error=failure.getErrorMessage(),
            )

        d.addCallbacks(published, failed)
        d.addErrback(lambda f: log.failure("UDP ACK failed", failure=f))

    def _write(self, data: bytes, addr: Any) -> None:
        if self.transport is not None:  # None once the port stopped listening
            self.transport.write(data, addr)

    def _purge(self, now: float) -> None:
        self._since_purge = 0
        horizon = now - self.dedup_window
        stale = [k for k, v in self._published.items() if v[1] < horizon]
        for k in stale:
            del self._published[k]

    def drain(self) -> defer.Deferred[None]:
        return self.publisher.drain()
