"""Device authority: allow-list file (+ SIGHUP reload), Redis set, Luhn; over real TCP too."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor
from twisted.logger import LogEvent, globalLogPublisher

from teltonika_ingest.codec import encode_imei
from teltonika_ingest.config import Config, RedisTarget
from teltonika_ingest.redis.client import RedisClient
from teltonika_ingest.server.authority import (
    AuthorityMetrics,
    DeviceAuthority,
    build_authority,
    install_sighup,
    luhn_valid,
    parse_allow_list,
)
from teltonika_ingest.server.tap import IngestService

from device import connect_device, wait_for
from redisproc import RedisProcess

LISTED = "356307042441013"  # Luhn-valid
OTHER = "352093081452251"  # Luhn-valid, not listed
LUHN_VALID = ["356307042441013", "490154203237518", "356938035643809", "352093081452251"]
LUHN_INVALID = ["356307042441012", "490154203237519", "356938035643808", "35209308145225X"]


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    """Every log event published while the test runs."""
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(seen.append)


def messages(events: list[LogEvent], **fields: Any) -> list[LogEvent]:
    return [e for e in events if all(e.get(k) == v for k, v in fields.items())]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- Luhn


@pytest.mark.parametrize("imei", LUHN_VALID)
def test_luhn_valid(imei: str) -> None:
    assert luhn_valid(imei)


@pytest.mark.parametrize("imei", [*LUHN_INVALID, "", "1234", "3563070424410130", "٣" * 15])
def test_luhn_invalid(imei: str) -> None:
    assert not luhn_valid(imei)


def test_luhn_check_refuses_before_any_list() -> None:
    authority = DeviceAuthority(luhn=True)
    assert authority.restricts
    assert authority.check("356307042441013") is True
    assert authority.check("356307042441012") is False


# --------------------------------------------------------------------------- file parsing


def test_parse_comments_blanks_and_invalid_lines() -> None:
    parsed = parse_allow_list(
        "\ufeff# fleet A\n"
        "356307042441013\n"
        "\n"
        "   352093081452251   # truck 12, inline comment\n"
        "35630704244101\n"  # 14 digits
        "abc\n"
        "356307042441013\n"  # duplicate: fine
        "  # indented comment\n"
        "3563070424410130\n"  # 16 digits
    )
    assert parsed.imeis == {"356307042441013", "352093081452251"}
    assert [(n, line) for n, line, _ in parsed.invalid] == [
        (5, "35630704244101"),
        (6, "abc"),
        (9, "3563070424410130"),
    ]


def test_parse_with_luhn_skips_bad_check_digits() -> None:
    parsed = parse_allow_list("356307042441013\n356307042441012\n", luhn=True)
    assert parsed.imeis == {"356307042441013"}
    assert parsed.invalid[0][:2] == (2, "356307042441012")
    assert "Luhn" in parsed.invalid[0][2]


def test_file_authority_allows_listed_only(tmp_path: Path, events: list[LogEvent]) -> None:
    registry = CollectorRegistry()
    path = write(tmp_path / "allow.txt", f"{LISTED}\nnot-an-imei\n")
    authority = DeviceAuthority(allow_list=str(path), metrics=AuthorityMetrics.create(registry))
    assert authority.check(LISTED) is True
    assert authority.check(OTHER) is False
    assert sample(registry, "teltonika_allow_list_size") == 1
    assert sample(registry, "teltonika_allow_list_reloads_total", result="ok") == 1
    assert sample(registry, "teltonika_allow_list_reloads_total", result="error") == 0
    [warning] = messages(events, line_number=2)
    assert warning["log_level"].name == "warn" and warning["line"] == "not-an-imei"
    assert messages(events, imei=OTHER, reason="not_listed")


def test_unreadable_file_at_start_is_fatal(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        DeviceAuthority(allow_list=str(tmp_path / "missing.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"356307042441013 # caf\xe9\n")
    with pytest.raises(UnicodeDecodeError):
        DeviceAuthority(allow_list=str(bad))


def test_empty_list_refuses_everyone_and_warns(tmp_path: Path, events: list[LogEvent]) -> None:
    authority = DeviceAuthority(allow_list=str(write(tmp_path / "a", "# nobody yet\n")))
    assert authority.check(LISTED) is False
    assert any("is empty" in e["log_format"] for e in events)


def test_reload_swaps_the_list_and_a_failed_reload_keeps_it(
    tmp_path: Path, events: list[LogEvent]
) -> None:
    registry = CollectorRegistry()
    path = write(tmp_path / "allow.txt", f"{LISTED}\n")
    authority = DeviceAuthority(allow_list=str(path), metrics=AuthorityMetrics.create(registry))
    write(path, f"{OTHER}\n")
    assert authority.reload() is True
    assert authority.check(OTHER) is True and authority.check(LISTED) is False
    [reloaded] = messages(events, added=1, removed=1)
    assert reloaded["count"] == 1

    path.unlink()
    assert authority.reload() is False
    assert authority.check(OTHER) is True  # the old list is kept
    assert sample(registry, "teltonika_allow_list_reloads_total", result="ok") == 2
    assert sample(registry, "teltonika_allow_list_reloads_total", result="error") == 1
    assert sample(registry, "teltonika_allow_list_size") == 1
    [error] = [e for e in events if e["log_level"].name == "error"]
    assert "could not be reloaded" in error["log_format"] and error["count"] == 1


def test_no_restriction_allows_all_and_build_returns_none(tmp_path: Path) -> None:
    assert DeviceAuthority().check("000000000000001") is True
    config = Config.from_args([], environ={}, cwd=tmp_path)
    assert build_authority(config, None, CollectorRegistry()) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- SIGHUP


@pytest.fixture
def restore_sighup() -> Iterator[None]:
    before = signal.getsignal(signal.SIGHUP)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_and_chains_to_the_previous_handler(
    tmp_path: Path, restore_sighup: None
) -> None:
    registry = CollectorRegistry()
    path = write(tmp_path / "allow.txt", f"{LISTED}\n")
    authority = DeviceAuthority(allow_list=str(path), metrics=AuthorityMetrics.create(registry))
    previous_calls: list[int] = []

    def previous(signum: int, frame: Any) -> None:
        previous_calls.append(signum)

    signal.signal(signal.SIGHUP, previous)
    uninstall = authority.install_sighup(reactor)
    try:
        write(path, f"{LISTED}\n{OTHER}\n")
        assert authority.check(OTHER) is False
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: authority.check(OTHER) is True)
        assert previous_calls == [signal.SIGHUP]

        # a reload that cannot read the file keeps the list (and the process)
        path.unlink()
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(
            lambda: sample(registry, "teltonika_allow_list_reloads_total", result="error") == 1
        )
        assert authority.check(OTHER) is True
        assert previous_calls == [signal.SIGHUP, signal.SIGHUP]
    finally:
        uninstall()
    assert signal.getsignal(signal.SIGHUP) is previous


@pytest_twisted.ensureDeferred
async def test_sighup_with_default_previous_handler_does_not_terminate(
    restore_sighup: None,
) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    reloaded: defer.Deferred[None] = defer.Deferred()
    uninstall = install_sighup(reactor, lambda: reloaded.callback(None))
    try:
        os.kill(os.getpid(), signal.SIGHUP)  # SIG_DFL would kill the test process
        await reloaded.addTimeout(5, reactor)
    finally:
        uninstall()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


@pytest_twisted.ensureDeferred
async def test_two_installs_share_the_handler_and_restore_the_previous_one(
    restore_sighup: None,
) -> None:
    def previous(signum: int, frame: Any) -> None:
        pass

    signal.signal(signal.SIGHUP, previous)
    calls: list[str] = []
    uninstall_a = install_sighup(reactor, lambda: calls.append("a"))
    uninstall_b = install_sighup(reactor, lambda: calls.append("b"))
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: sorted(calls) == ["a", "b"])
        uninstall_a()  # e.g. one of two services in a test stopped first
        assert signal.getsignal(signal.SIGHUP) is not previous
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: len(calls) == 3)
        assert calls[2] == "b"
    finally:
        uninstall_a()  # twice: harmless
        uninstall_b()
    assert signal.getsignal(signal.SIGHUP) is previous


# --------------------------------------------------------------------------- Redis set


@pytest_twisted.async_yield_fixture
async def redis_client(redis_proc: RedisProcess) -> AsyncIterator[RedisClient]:
    client = RedisClient(
        RedisTarget(host="127.0.0.1", port=redis_proc.port), reactor=reactor, command_timeout=1
    )
    client.startService()
    await wait_for(lambda: client.connected)
    yield client
    await client.stopService()


@pytest_twisted.ensureDeferred
async def test_redis_set(redis_client: RedisClient, redis_proc: RedisProcess) -> None:
    redis_proc.cmd("SADD", "devices:allowed", OTHER)
    authority = DeviceAuthority(redis=redis_client, redis_key="devices:allowed")
    assert await defer.maybeDeferred(authority.check, OTHER) is True
    assert await defer.maybeDeferred(authority.check, LISTED) is False
    redis_proc.cmd("SADD", "devices:allowed", LISTED)  # takes effect at once, no reload
    assert await defer.maybeDeferred(authority.check, LISTED) is True


@pytest_twisted.ensureDeferred
async def test_redis_down_refuses_unless_the_file_allows(
    redis_client: RedisClient, redis_proc: RedisProcess, tmp_path: Path, events: list[LogEvent]
) -> None:
    registry = CollectorRegistry()
    redis_proc.cmd("SADD", "devices:allowed", OTHER)
    authority = DeviceAuthority(
        allow_list=str(write(tmp_path / "allow.txt", f"{LISTED}\n")),
        redis=redis_client,
        redis_key="devices:allowed",
        metrics=AuthorityMetrics.create(registry),
    )
    # union of the two lists
    assert await defer.maybeDeferred(authority.check, LISTED) is True
    assert await defer.maybeDeferred(authority.check, OTHER) is True

    redis_proc.stop()
    await wait_for(lambda: not redis_client.connected)
    assert await defer.maybeDeferred(authority.check, LISTED) is True  # the file still allows
    assert await defer.maybeDeferred(authority.check, OTHER) is False  # fail closed
    assert sample(registry, "teltonika_allow_list_lookup_failures_total") == 1
    assert messages(events, imei=OTHER, reason="allow_list_unavailable")


# --------------------------------------------------------------------------- over TCP


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_rejected_device_gets_00_over_tcp(
    redis_session: RedisProcess, tmp_path: Path
) -> None:
    allow = write(tmp_path / "allow.txt", f"{LISTED}\n")
    config = Config.from_args(
        [
            "--listen", "tcp:0:interface=127.0.0.1",
            "--metrics", "tcp:0:interface=127.0.0.1",
            "--redis-url", f"redis://127.0.0.1:{redis_session.port}/0",
            "--instance-id", "auth-test",
            "--allow-list", str(allow),
            "--luhn",
        ],
        environ={},
        cwd=tmp_path,
    )  # fmt: skip
    svc = IngestService(config)
    assert svc.factory.authority is not None  # built from the config by IngestService
    svc.startService()
    try:
        device_port, _http = await svc.listening
        port = device_port.getHost().port

        refused = await connect_device(port)
        refused.send(encode_imei(OTHER))
        assert await refused.expect(1) == b"\x00"
        await refused.wait_closed()

        bad_luhn = await connect_device(port)
        bad_luhn.send(encode_imei("356307042441012"))
        assert await bad_luhn.expect(1) == b"\x00"
        await bad_luhn.wait_closed()

        accepted = await connect_device(port)
        accepted.send(encode_imei(LISTED))
        assert await accepted.expect(1) == b"\x01"
        await accepted.close()

        registry = svc.metrics.registry
        assert sample(registry, "teltonika_handshakes_total", result="rejected") == 2
        assert sample(registry, "teltonika_handshakes_total", result="accepted") == 1
        assert sample(registry, "teltonika_allow_list_size") == 1
    finally:
        await svc.stopService()
