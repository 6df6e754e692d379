"""TLS (``ssl:``) and PROXY protocol (``haproxy:``) device listeners, service in-process."""

from __future__ import annotations

import datetime
import ipaddress
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import endpoints, reactor, ssl
from twisted.internet.protocol import Factory
from twisted.logger import LogEvent, globalLogPublisher

from teltonika_ingest.codec import encode_imei
from teltonika_ingest.config import Config
from teltonika_ingest.server.tap import IngestService

from device import DeviceProtocol, connect_device
from redisproc import RedisProcess
from support import avl_frame

pytestmark = pytest.mark.integration

IMEI = "356307042441013"
PROXY_V1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 56324 5027\r\n"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


async def start(redis: RedisProcess, tmp_path: Path, listen: str) -> tuple[IngestService, int]:
    config = Config.from_args(
        [
            "--listen", listen,
            "--metrics", "tcp:0:interface=127.0.0.1",
            "--redis-url", f"redis://127.0.0.1:{redis.port}/0",
            "--instance-id", "tls-proxy-test",
            "--publish-timeout", "2",
        ],
        environ={},
        cwd=tmp_path,
    )  # fmt: skip
    svc = IngestService(config)
    svc.startService()
    device_port, _http = await svc.listening
    return svc, device_port.getHost().port


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(seen.append)


def sample(svc: IngestService, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(name, labels or None) or 0.0


# --------------------------------------------------------------------------- TLS


@pytest_twisted.ensureDeferred
async def test_device_over_tls(redis_session: RedisProcess, tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    svc, port = await start(
        redis_session, tmp_path, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    )
    try:
        trust = ssl.Certificate.loadPEM(cert.read_bytes())
        tls = endpoints.wrapClientTLS(
            ssl.optionsForClientTLS("localhost", trustRoot=trust),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5),
        )
        dev: DeviceProtocol = await tls.connect(Factory.forProtocol(DeviceProtocol))
        dev.send(encode_imei(IMEI))
        assert await dev.expect(1) == b"\x01"
        dev.send(avl_frame(2))
        assert await dev.expect(4) == struct.pack(">I", 2)  # published, then ACKed
        assert redis_session.cmd("XLEN", "telemetry:teltonika") == 2
        version = dev.transport.getHandle().get_protocol_version_name()  # type: ignore[attr-defined]
        assert version in ("TLSv1.2", "TLSv1.3")
        await dev.close()

        # a device speaking plain TCP to the TLS port gets nothing back
        plain = await connect_device(port)
        plain.send(encode_imei(IMEI))
        await plain.wait_closed()
        assert plain.received == b""
        assert sample(svc, "teltonika_handshakes_total", result="accepted") == 1
    finally:
        await svc.stopService()


# --------------------------------------------------------------------------- PROXY protocol


@pytest_twisted.ensureDeferred
async def test_proxy_v1_header_then_handshake(redis_session: RedisProcess, tmp_path: Path) -> None:
    svc, port = await start(redis_session, tmp_path, "haproxy:tcp:0:interface=127.0.0.1")
    try:
        dev = await connect_device(port)
        dev.send(PROXY_V1 + encode_imei(IMEI))  # header and handshake in one segment
        assert await dev.expect(1) == b"\x01"
        dev.send(avl_frame(1))
        assert await dev.expect(4) == struct.pack(">I", 1)
        await dev.close()

        split = await connect_device(port)  # header split across segments
        split.send(PROXY_V1[:10])
        split.send(PROXY_V1[10:])
        split.send(encode_imei(IMEI))
        assert await split.expect(1) == b"\x01"
        await split.close()
        assert sample(svc, "teltonika_handshakes_total", result="accepted") == 2
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_proxy_v1_real_client_address_is_logged(
    redis_session: RedisProcess, tmp_path: Path, events: list[LogEvent]
) -> None:
    svc, port = await start(redis_session, tmp_path, "haproxy:tcp:0:interface=127.0.0.1")
    try:
        dev = await connect_device(port)
        dev.send(PROXY_V1 + encode_imei(IMEI))
        assert await dev.expect(1) == b"\x01"
        await dev.close()
    finally:
        await svc.stopService()
    peers = [str(e["peer"]) for e in events if e.get("imei") == IMEI and "peer" in e]
    assert peers, "no event with the device's imei and peer"
    assert all("203.0.113.7" in peer for peer in peers), peers


@pytest_twisted.ensureDeferred
async def test_direct_client_on_proxy_listener_is_dropped(
    redis_session: RedisProcess, tmp_path: Path
) -> None:
    svc, port = await start(redis_session, tmp_path, "haproxy:tcp:0:interface=127.0.0.1")
    try:
        dev = await connect_device(port)
        dev.send(encode_imei(IMEI))  # no PROXY header: a device connecting directly
        await dev.wait_closed()
        assert dev.received == b""
        assert sample(svc, "teltonika_handshakes_total", result="accepted") == 0
        assert svc.redis.connected
    finally:
        await svc.stopService()
