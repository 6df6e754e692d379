"""The processor's options (contract.md section 9) through the shared config machinery."""

from __future__ import annotations

import socket
from pathlib import Path

import attrs
import pytest
from twisted.python import usage

from teltonika_ingest.config import (
    PROCESSOR_SECTION,
    PROCESSOR_TABLE,
    ProcessorConfig,
    render_reference,
    render_tap_conf,
)

REPO = Path(__file__).parent.parent

CONTRACT = {
    "redis-url": ("REDIS_URL", ""),
    "database-url": ("DATABASE_URL", ""),
    "stream": ("REDIS_TELEMETRY_STREAM", "telemetry:teltonika"),
    "group": ("PROCESSOR_GROUP", "teltonika-processor"),
    "consumer": ("PROCESSOR_CONSUMER", ""),
    "metrics": ("PROCESSOR_METRICS", "tcp:9092:interface=127.0.0.1"),
    "live": ("PROCESSOR_LIVE", ""),
    "live-tokens": ("PROCESSOR_LIVE_TOKENS", ""),
}


def load(tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> ProcessorConfig:
    return ProcessorConfig.from_args(list(argv), environ=env or {}, cwd=tmp_path)


def test_contract_names_env_and_defaults() -> None:
    by_name = PROCESSOR_TABLE.by_name
    for name, (env, default) in CONTRACT.items():
        assert (by_name[name].env, by_name[name].default) == (env, default), name


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.redis is None and config.database_url is None
    assert config.consumer == socket.gethostname()
    assert config.group == "teltonika-processor"
    assert config.dlq_stream == "telemetry:teltonika:processor:dlq"
    assert config.live is None and config.live_tokens is None
    direct = ProcessorConfig(consumer=config.consumer, instance_id=config.instance_id)
    assert config == attrs.evolve(direct, data_dir=str(tmp_path / "var"))


def test_layers_command_line_env_file(tmp_path: Path) -> None:
    (tmp_path / "processor.conf").write_text(
        f"[{PROCESSOR_SECTION}]\ngroup = from-file\nbatch-size = 10\nblock-time = 3\n"
    )
    config = load(
        tmp_path, "--group", "from-cli", env={"PROCESSOR_GROUP": "env", "PROCESSOR_BATCH_SIZE": "7"}
    )
    assert (config.group, config.batch_size, config.block_time) == ("from-cli", 7, 3.0)
    assert config.sources["block-time"] == f"config file {tmp_path / 'processor.conf'}"


def test_the_ingest_section_is_not_the_processors(tmp_path: Path) -> None:
    (tmp_path / "processor.conf").write_text("[teltonika-ingest]\nlisten = tcp:1\n")
    with pytest.raises(usage.UsageError, match=r"unknown section \[teltonika-ingest\]"):
        load(tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--database-url", "mysql://x/y"], "--database-url: expected postgresql://"),
        (["--database-url", "postgresql:///db"], "the host is missing"),
        (["--live", "9091"], "--live: a bare port number"),
        (["--batch-size", "0"], "--batch-size: expected a whole number >= 1"),
        (["--drain-timeout", "40"], "--shutdown-timeout: must be greater than --drain-timeout"),
        (["--live-tokens", "/nonexistent"], "--live-tokens: no such file"),
        (["--live-auth-hook", "just_a_module"], "--live-auth-hook: expected package.module:"),
    ],
)
def test_invalid_values(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as e:
        load(tmp_path, *argv)
    assert message in str(e.value)


def test_database_password_is_never_echoed(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError) as e:
        load(tmp_path, "--database-url", "postgresql://u:s3cret@h:99999/db")
    assert "s3cret" not in str(e.value)
    config = load(tmp_path, "--database-url", "postgresql://u:s3cret@h/db")
    assert not any("s3cret" in line for line in config.describe())
    assert "database-url = postgresql://u:***@h/db (command line)" in config.describe()


def test_unix_socket_url_and_live_endpoint(tmp_path: Path) -> None:
    config = load(
        tmp_path, "--database-url", "postgresql:///teltonika?host=/run/pg", "--live", "tcp:9091"
    )
    assert config.database_url == "postgresql:///teltonika?host=/run/pg"
    assert config.live == "tcp:9091"
    hooked = load(tmp_path, "--live-auth-hook", "sso.live:Authorizer")
    assert hooked.live_auth_hook == "sso.live:Authorizer" and config.live_auth_hook is None


def test_shipped_processor_conf_and_reference_are_generated() -> None:
    assert (REPO / "processor.conf").read_text() == render_tap_conf(PROCESSOR_TABLE)
    assert render_reference(PROCESSOR_TABLE) in (REPO / "OPERATIONS.md").read_text()
