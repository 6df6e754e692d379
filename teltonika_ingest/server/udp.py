"""UDP device listener (protocol.md §4).

Each datagram is decoded, its IMEI checked by the same device authority as a TCP handshake
(``--allow-list``, ``--allow-list-key``, ``--luhn``), published, and only then ACKed with the
UDP ACK format. A refused IMEI gets no ACK and nothing is stored
(``teltonika_udp_datagrams_total{result="rejected"}``). A device that missed our ACK resends
the same datagram (same IMEI and AVL packet id): within ``dedup_window`` seconds it is ACKed
again without being published twice (it was checked and stored the first time).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from teltonika_ingest.codec import CodecError, UdpPacket, decode_udp_datagram, encode_udp_ack
from teltonika_ingest.server.budget import RepeatLimiter, suppressed_note
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.publisher import Publisher

if TYPE_CHECKING:
    from teltonika_ingest.server.protocol import Authority

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
        authority: Authority | None = None,
    ) -> None:
        self.publisher = publisher
        self.authority = authority
        # one warning per peer and minute at most for malformed or refused datagrams
        self.log_limit = RepeatLimiter(clock)
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
            peer = f"{addr[0]}:{addr[1]}"
            logged, suppressed = self.log_limit.allow(("malformed", addr[0]))
            if logged:
                log.warn(
                    "malformed UDP datagram from {peer}: {error}{suppressed_note}",
                    peer=peer,
                    error=e,
                    suppressed=suppressed,
                    suppressed_note=suppressed_note(suppressed),
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
        if seen is not None and seen[0] == digest and now - seen[1] <= self.dedup_window:
            metrics.udp_datagrams.labels(result="duplicate").inc()
            log.debug("re-ACKing resent UDP packet {key}", key=key)
            self._write(encode_udp_ack(pkt.packet_id, pkt.avl_packet_id, seen[2]), addr)
            return
        if (pkt.imei, pkt.avl_packet_id, digest) in self._in_progress:
            # The first copy is still being published; its ACK will answer this one too.
            metrics.udp_datagrams.labels(result="duplicate").inc()
            return
        marker = (pkt.imei, pkt.avl_packet_id, digest)
        self._in_progress.add(marker)
        if self.authority is None:
            self._publish(pkt, addr, key, digest, marker, now)
            return
        d = defer.maybeDeferred(self.authority.check, pkt.imei)
        d.addCallbacks(
            self._decided,
            self._check_failed,
            callbackArgs=(pkt, addr, key, digest, marker, now),
            errbackArgs=(pkt, addr, marker),
        )
        d.addErrback(self._unexpected)

    def _decided(
        self,
        allowed: bool,
        pkt: UdpPacket,
        addr: Any,
        key: tuple[str, int],
        digest: bytes,
        marker: tuple[str, int, bytes],
        received: float,
    ) -> None:
        if allowed:
            self._publish(pkt, addr, key, digest, marker, received)
        else:
            self._refused(pkt, addr, marker, "not allowed")

    def _check_failed(self, failure: Failure, pkt: UdpPacket, addr: Any, marker: Any) -> None:
        # The authority could not answer (e.g. Redis down): refuse, the device resends.
        self._refused(pkt, addr, marker, f"authorization failed: {failure.getErrorMessage()}")

    def _refused(self, pkt: UdpPacket, addr: Any, marker: Any, why: str) -> None:
        self._in_progress.discard(marker)
        self.metrics.udp_datagrams.labels(result="rejected").inc()
        logged, suppressed = self.log_limit.allow(("rejected", pkt.imei))
        if logged:
            log.warn(
                "UDP packet of {imei} from {peer} refused ({why}): not ACKed, not stored"
                "{suppressed_note}",
                imei=pkt.imei,
                peer=f"{addr[0]}:{addr[1]}",
                why=why,
                suppressed=suppressed,
                suppressed_note=suppressed_note(suppressed),
            )

    def _unexpected(self, failure: Failure) -> None:
        self.metrics.session_errors.inc()
        log.failure("unexpected error handling a UDP datagram", failure=failure)

    def _publish(
        self,
        pkt: UdpPacket,
        addr: Any,
        key: tuple[str, int],
        digest: bytes,
        marker: tuple[str, int, bytes],
        received: float,
    ) -> None:
        metrics = self.metrics
        count = len(pkt.packet.records)
        codec = pkt.packet.codec
        metrics.frames.labels(codec=codec, result="ok").inc()
        d = self.publisher.publish(pkt.imei, pkt.packet, int(received * 1000), received)

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

    def stop_reading(self) -> None:
        """Shutdown step 2: read no more datagrams (they wait in the kernel and are dropped
        with the port; unACKed, the devices resend them). Datagrams being published are still
        ACKed: the port stays open for writing until the service stops it."""
        if self.transport is not None:
            self.transport.stopReading()  # type: ignore[attr-defined]

    def drain(self) -> defer.Deferred[None]:
        return self.publisher.drain()
