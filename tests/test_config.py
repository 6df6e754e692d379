"""Configuration layer: precedence, validation messages, INI file, Redis URLs, shipped docs.

Every test passes its own environment dict and working directory (tmp_path): nothing here reads
the real environment or the real working directory.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.python import usage

from teltonika_ingest.config import (
    CONFIG_SECTION,
    OPTIONS,
    OPTIONS_BY_NAME,
    Config,
    Options,
    RedisTarget,
    check_server_endpoint,
    render_reference,
    render_tap_conf,
)

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def load(
    cwd: Path,
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
    ini: str | None = None,
) -> Config:
    """Config from argv / env / a ./tap.conf holding ``ini`` (section header added)."""
    if ini is not None:
        (cwd / "tap.conf").write_text(f"[{CONFIG_SECTION}]\n{ini}\n", encoding="utf-8")
    return Config.from_args(argv or [], environ=env or {}, cwd=cwd)


def load_error(cwd: Path, **kwargs: object) -> str:
    with pytest.raises(usage.UsageError) as caught:
        load(cwd, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def file_source(cwd: Path) -> str:
    return f"config file {cwd / 'tap.conf'}"


# --------------------------------------------------------------------------- defaults


def test_defaults_without_any_layer(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.listen == "tcp:5027"
    assert config.udp_port is None
    assert config.udp_interface == ""
    assert config.metrics == "tcp:9090:interface=127.0.0.1"
    assert config.redis is None
    assert config.embedded_redis
    assert config.stream == "telemetry:teltonika"
    assert config.dlq_stream == "telemetry:teltonika:dlq"
    assert config.stream_maxlen == 1_000_000
    assert config.instance_id == socket.gethostname()
    assert config.config_file is None
    assert config.data_dir == str(tmp_path / "var")
    assert config.handshake_timeout == 30
    assert config.idle_timeout == 600
    assert config.max_frame_size == 65536
    assert config.max_buffer == 262144
    assert config.max_connections == 0
    assert config.publish_timeout == 5
    assert config.max_inflight == 1024
    assert config.udp_dedup_window == 60
    assert config.command_timeout == 30
    assert config.max_command_length == 512
    assert config.janitor_interval == 60
    assert config.drain_timeout == 10
    assert config.shutdown_timeout == 30
    assert config.log_format == "text"
    assert config.log_level == "info"
    assert config.allow_list is None
    assert config.allow_list_key is None
    assert config.luhn is False
    assert config.heartbeat_interval == 30.0
    assert config.heartbeat_ttl == 90
    assert set(config.sources) == {spec.name for spec in OPTIONS}
    assert set(config.sources.values()) == {"default"}


def test_direct_construction_uses_the_same_defaults(tmp_path: Path) -> None:
    loaded = load(tmp_path)
    # Config() leaves the default data directory relative; everything else is identical.
    assert Config(data_dir=loaded.data_dir) == loaded


def test_describe_lists_every_option_with_its_source(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        argv=["--redis-url", "redis://:s3cret@cache:6379/2"],
        env={"TELTONIKA_IDLE_TIMEOUT": "90"},
    )
    lines = config.describe()
    assert len(lines) == len(OPTIONS)
    assert "redis-url = redis://:***@cache:6379/2 (command line)" in lines
    assert "idle-timeout = 90.0 (environment TELTONIKA_IDLE_TIMEOUT)" in lines
    assert "s3cret" not in "\n".join(lines)
    assert "s3cret" not in repr(config)


# --------------------------------------------------------------------------- precedence


def test_precedence_of_the_four_layers(tmp_path: Path) -> None:
    env = {"TELTONIKA_HANDSHAKE_TIMEOUT": "20"}
    ini = "handshake-timeout = 15"
    argv = ["--handshake-timeout", "25"]
    assert load(tmp_path, argv=argv, env=env, ini=ini).handshake_timeout == 25
    assert load(tmp_path, env=env, ini=ini).handshake_timeout == 20
    assert load(tmp_path, ini=ini).handshake_timeout == 15
    (tmp_path / "tap.conf").unlink()
    assert load(tmp_path).handshake_timeout == 30


# Three valid, distinct values per option: (command line argv, environment, INI file).
SAMPLES: dict[str, tuple[list[str], str, str]] = {
    "listen": (["--listen", "tcp:1001"], "tcp:1002", "unix:/tmp/x.sock"),
    "udp-port": (["--udp-port", "1001"], "1002", "1003"),
    "udp-interface": (["--udp-interface", "127.0.0.1"], "::1", "10.0.0.3"),
    "metrics": (["--metrics", "tcp:2001"], "tcp6:2002", "tcp:2003:interface=127.0.0.1"),
    "redis-url": (["--redis-url", "redis://a:1/1"], "redis://b:2/2", "unix:///run/r.sock"),
    "stream": (["--stream", "s1"], "s2", "s3"),
    "stream-maxlen": (["--stream-maxlen", "1"], "2", "3"),
    "instance-id": (["--instance-id", "i1"], "i2", "i3"),
    "data-dir": (["--data-dir", "d1"], "d2", "/srv/d3"),
    "handshake-timeout": (["--handshake-timeout", "1"], "2", "3"),
    "idle-timeout": (["--idle-timeout", "1"], "2", "3"),
    "max-frame-size": (["--max-frame-size", "1000"], "1001", "1002"),
    "max-buffer": (["--max-buffer", "300000"], "300001", "300002"),
    "max-connections": (["--max-connections", "1"], "2", "3"),
    "max-buffered-bytes": (["--max-buffered-bytes", "0"], "2", "3"),
    "max-connections-per-address": (["--max-connections-per-address", "1"], "2", "3"),
    "frame-timeout": (["--frame-timeout", "0"], "2", "3.5"),
    "listen-backlog": (["--listen-backlog", "1"], "2", "3"),
    "publish-timeout": (["--publish-timeout", "1"], "2", "3.5"),
    "max-inflight": (["--max-inflight", "1"], "2", "3"),
    "udp-dedup-window": (["--udp-dedup-window", "0"], "2", "3"),
    "device-message-budget": (["--device-message-budget", "0"], "2", "3"),
    "dead-letter-budget": (["--dead-letter-budget", "0"], "2", "3"),
    "dlq-max-bytes": (["--dlq-max-bytes", "0"], "2", "3"),
    "results-max-bytes": (["--results-max-bytes", "1"], "0", "3"),
    "command-timeout": (["--command-timeout", "1"], "2", "3"),
    "max-command-length": (["--max-command-length", "1"], "2", "3"),
    "command-queue-ttl": (["--command-queue-ttl", "60"], "3600", "7200"),
    "command-queue-attempts": (["--command-queue-attempts", "1"], "2", "4"),
    "command-queue-max-per-device": (["--command-queue-max-per-device", "1"], "2", "3"),
    "command-queue-max-total": (["--command-queue-max-total", "1"], "2", "3"),
    "command-queue-sweep-interval": (["--command-queue-sweep-interval", "1"], "2", "0.5"),
    "janitor-interval": (["--janitor-interval", "1"], "2", "3"),
    "drain-timeout": (["--drain-timeout", "1"], "2", "3"),
    "shutdown-timeout": (["--shutdown-timeout", "31"], "32", "33"),
    "log-format": (["--log-format", "json"], "text", "json"),
    "log-level": (["--log-level", "debug"], "error", "warn"),
    "allow-list": (["--allow-list", "a.txt"], "b.txt", "c.txt"),
    "allow-list-key": (["--allow-list-key", "k1"], "k2", "k3"),
    "luhn": (["--luhn"], "false", "yes"),
    "workers": (["--workers", "2"], "3", "4"),
    "worker-sockets": (["--worker-sockets", "shared"], "reuseport", "shared"),
    "time-valid-window": (["--time-valid-window", "0"], "60", "3600"),
    "io-names": (["--io-names"], "false", "yes"),
    "default-model": (["--default-model", "fmb920"], "TAT100", "FMB640"),
    "model-key": (["--model-key", "m1"], "m2", "m3"),
}


def test_samples_cover_every_option() -> None:
    assert set(SAMPLES) == {spec.name for spec in OPTIONS} - {"config"}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_precedence_for_every_option(tmp_path: Path, name: str) -> None:
    spec = OPTIONS_BY_NAME[name]
    argv, env_value, ini_value = SAMPLES[name]
    for file in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / file).write_text("356307042441013\n")
    env = {spec.env: env_value}
    ini = f"{spec.key} = {ini_value}"

    def value(config: Config) -> object:
        return getattr(config, spec.attr)

    from_cli = value(load(tmp_path, argv=argv))
    from_env = value(load(tmp_path, env=env))
    from_ini = value(load(tmp_path, ini=ini))
    (tmp_path / "tap.conf").unlink()
    default = value(load(tmp_path))
    assert from_cli != from_env != from_ini != default

    config = load(tmp_path, argv=argv, env=env, ini=ini)
    assert (value(config), config.sources[name]) == (from_cli, "command line")
    config = load(tmp_path, env=env, ini=ini)
    assert (value(config), config.sources[name]) == (from_env, f"environment {spec.env}")
    config = load(tmp_path, ini=ini)
    assert (value(config), config.sources[name]) == (from_ini, file_source(tmp_path))


def test_empty_environment_value_overrides_the_file(tmp_path: Path) -> None:
    config = load(tmp_path, env={"REDIS_URL": ""}, ini="redis-url = redis://cache:6379/0")
    assert config.redis is None
    assert config.sources["redis-url"] == "environment REDIS_URL"


def test_values_are_stripped(tmp_path: Path) -> None:
    assert load(tmp_path, env={"TELTONIKA_IDLE_TIMEOUT": " 45 "}).idle_timeout == 45


def test_udp_port_zero_or_empty_is_off(tmp_path: Path) -> None:
    assert load(tmp_path, argv=["--udp-port", "0"]).udp_port is None
    assert load(tmp_path, env={"TELTONIKA_UDP_PORT": ""}).udp_port is None
    assert load(tmp_path, ini="udp-port = 5027").udp_port == 5027


def test_relative_paths_resolve_against_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "allowed.txt").write_text("356307042441013\n")
    config = load(tmp_path, argv=["--data-dir", "data/redis", "--allow-list", "etc/allowed.txt"])
    assert config.data_dir == str(tmp_path / "data" / "redis")
    assert config.allow_list == str(tmp_path / "etc" / "allowed.txt")


def test_instance_id_empty_means_host_name(tmp_path: Path) -> None:
    config = load(tmp_path, env={"TELTONIKA_INSTANCE_ID": ""})
    assert config.instance_id == socket.gethostname()


def test_log_level_accepts_warning_and_any_case(tmp_path: Path) -> None:
    assert load(tmp_path, env={"TELTONIKA_LOG_LEVEL": "WARNING"}).log_level == "warn"
    assert load(tmp_path, argv=["--log-format", "JSON"]).log_format == "json"


# --------------------------------------------------------------------------- booleans


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("true", True),
        ("yes", True),
        ("1", True),
        ("on", True),
        ("TRUE", True),
        ("Yes", True),
        ("false", False),
        ("no", False),
        ("0", False),
        ("off", False),
        ("OFF", False),
    ],
)
def test_boolean_words(tmp_path: Path, word: str, expected: bool) -> None:
    assert load(tmp_path, env={"TELTONIKA_LUHN": word}).luhn is expected
    assert load(tmp_path, ini=f"luhn = {word}").luhn is expected


def test_boolean_flags_override_environment_and_file(tmp_path: Path) -> None:
    assert load(tmp_path, argv=["--luhn"], env={"TELTONIKA_LUHN": "no"}).luhn is True
    assert load(tmp_path, argv=["--no-luhn"], env={"TELTONIKA_LUHN": "yes"}).luhn is False
    assert load(tmp_path, argv=["--no-luhn"], ini="luhn = on").luhn is False
    # Without a flag the lower layers decide.
    assert load(tmp_path, env={"TELTONIKA_LUHN": "yes"}, ini="luhn = off").luhn is True


def test_boolean_flag_and_its_negation_together_is_an_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, argv=["--luhn", "--no-luhn"])
    assert message == "--luhn and --no-luhn: both given on the command line"


@pytest.mark.parametrize("where", ["env", "ini"])
def test_bad_boolean(tmp_path: Path, where: str) -> None:
    if where == "env":
        message = load_error(tmp_path, env={"TELTONIKA_LUHN": "maybe"})
        source = "environment TELTONIKA_LUHN"
    else:
        message = load_error(tmp_path, ini="luhn = maybe")
        source = file_source(tmp_path)
    assert message == (
        f"--luhn: expected true/false, yes/no, on/off or 1/0, got 'maybe' (from {source})"
    )


# --------------------------------------------------------------------------- validation

BAD_VALUES: list[tuple[str, str, str]] = [
    ("handshake-timeout", "abc", "expected a positive number of seconds"),
    ("handshake-timeout", "0", "expected a positive number of seconds"),
    ("handshake-timeout", "-3", "expected a positive number of seconds"),
    ("handshake-timeout", "nan", "expected a positive number of seconds"),
    ("handshake-timeout", "inf", "expected a positive number of seconds"),
    ("idle-timeout", "", "expected a positive number of seconds"),
    ("publish-timeout", "5s", "expected a positive number of seconds"),
    ("command-timeout", "0", "expected a positive number of seconds"),
    ("janitor-interval", "-1", "expected a positive number of seconds"),
    ("drain-timeout", "x", "expected a positive number of seconds"),
    ("shutdown-timeout", "", "expected a positive number of seconds"),
    ("udp-dedup-window", "-1", "expected a number of seconds (0 = off)"),
    ("time-valid-window", "-1", "expected a number of seconds (0 = off)"),
    ("default-model", "FMX999", "expected a device model the IO catalogue knows"),
    ("model-key", "a b", "expected a non-empty Redis key"),
    ("max-frame-size", "1.5", "expected a positive whole number of bytes"),
    ("max-frame-size", "0", "expected a positive whole number of bytes"),
    ("max-buffer", "lots", "expected a positive whole number of bytes"),
    ("max-command-length", "-5", "expected a positive whole number of bytes"),
    ("max-connections", "-1", "expected a whole number >= 0"),
    ("stream-maxlen", "1e6", "expected a whole number >= 0"),
    ("max-inflight", "0", "expected a whole number >= 1"),
    ("udp-port", "70000", "expected a UDP port number 1-65535"),
    ("udp-port", "udp", "expected a UDP port number 1-65535"),
    ("udp-interface", "eth0", "expected an IP address"),
    ("listen", "5027", "a bare port number is not an endpoint string (write 'tcp:5027')"),
    ("listen", "", "expected a Twisted server endpoint string such as 'tcp:5027'"),
    ("listen", "http:80", "unknown endpoint type 'http' (expected one of tcp:, unix:, ssl:"),
    ("listen", "TCP:5027", "unknown endpoint type 'TCP'"),
    ("listen", "tcp:abc", "tcp: expected a number, not 'abc'"),
    ("listen", "tcp:70000", "tcp: port must be a number 0-65535"),
    ("listen", "tcp:5027:interfce=10.0.0.1", "unknown tcp: parameter 'interfce'"),
    ("listen", "tcp:5027:backlog=x", "tcp: expected a number, not 'x'"),
    ("listen", "tcp:5027:10.0.0.1:50:extra", "too many ':'-separated arguments for tcp:"),
    ("listen", "tcp:interface=10.0.0.1", "tcp: the port is missing"),
    ("listen", "tcp:5027:port=5028", "tcp: parameter 'port' given twice"),
    ("listen", "unix:address=/run/t.sock:addres=x", "unknown unix: parameter 'addres'"),
    ("listen", "unix:/run/t.sock:mode=999", "unix: expected an octal number, not '999'"),
    ("listen", "ssl:privateKey=k.pem", "ssl: the port is missing"),
    ("listen", "systemd:domain=INET", "systemd: Specify exactly one of descriptor index or name"),
    ("listen", "systemd:domain=INET:index=first", "systemd: expected a number, not 'first'"),
    ("listen", "haproxy:5027", "after 'haproxy:': a bare port number is not an endpoint"),
    ("metrics", "9090", "a bare port number is not an endpoint string (write 'tcp:9090')"),
    ("metrics", "http://127.0.0.1:9090", "unknown endpoint type 'http'"),
    ("redis-url", "rediss://cache:6380/0", "rediss:// (TLS) is not supported"),
    ("redis-url", "http://cache", "expected redis://[:password@]host[:port][/db] or unix://"),
    ("redis-url", "cache:6379", "expected redis://[:password@]host[:port][/db] or unix://"),
    ("redis-url", "redis://", "the host is missing"),
    ("redis-url", "redis://cache:port/0", "the port must be a number 1-65535"),
    ("redis-url", "redis://cache:0/0", "the port must be a number 1-65535"),
    ("redis-url", "redis://cache:6379/zero", "the database must be a number >= 0"),
    ("redis-url", "redis://cache:6379/-1", "the database must be a number >= 0"),
    ("redis-url", "redis://user:pw@cache", "a user name in the URL is not supported"),
    ("redis-url", "redis://cache?db=1", "unexpected '?' part in a redis:// URL"),
    ("redis-url", "unix://run/redis.sock", "expected an absolute socket path after unix://"),
    ("redis-url", "unix:///run/redis.sock?dbb=1", "unknown query parameter 'dbb'"),
    ("redis-url", "unix:///run/redis.sock?db=x", "the database must be a number >= 0"),
    ("stream", "", "expected a non-empty Redis key without spaces"),
    ("stream", "telemetry teltonika", "expected a non-empty Redis key without spaces"),
    ("allow-list-key", "allowed imeis", "expected a non-empty Redis key without spaces"),
    ("instance-id", "node 1", "expected a non-empty instance id without spaces"),
    ("log-format", "xml", "expected one of text, json"),
    ("log-level", "verbose", "expected one of debug, info, warn, error, critical"),
    ("data-dir", "", "expected a directory path"),
]


@pytest.mark.parametrize("where", ["cli", "env", "ini"])
@pytest.mark.parametrize(("name", "bad", "problem"), BAD_VALUES)
def test_invalid_value_message(
    tmp_path: Path, where: str, name: str, bad: str, problem: str
) -> None:
    spec = OPTIONS_BY_NAME[name]
    if where == "cli":
        message = load_error(tmp_path, argv=[spec.flag, bad])
        source = "command line"
    elif where == "env":
        message = load_error(tmp_path, env={spec.env: bad})
        source = f"environment {spec.env}"
    else:
        message = load_error(tmp_path, ini=f"{spec.key} = {bad}")
        source = file_source(tmp_path)
    shown = re.sub(r"(?<=://)[^@/]*@", "***@", bad) if name == "redis-url" else bad
    assert message.startswith(f"{spec.flag}: {problem}"), message
    assert message.endswith(f", got {shown!r} (from {source})"), message


def test_example_message_from_the_brief(tmp_path: Path) -> None:
    message = load_error(tmp_path, env={"TELTONIKA_HANDSHAKE_TIMEOUT": "abc"})
    assert message == (
        "--handshake-timeout: expected a positive number of seconds, got 'abc' "
        "(from environment TELTONIKA_HANDSHAKE_TIMEOUT)"
    )


def test_allow_list_file_must_exist(tmp_path: Path) -> None:
    message = load_error(tmp_path, argv=["--allow-list", "missing.txt"])
    assert message == (
        f"--allow-list: no such file: {tmp_path / 'missing.txt'}, got 'missing.txt' "
        "(from command line)"
    )


def test_multi_line_value_is_refused(tmp_path: Path) -> None:
    message = load_error(tmp_path, ini="stream = a\n  b")
    assert message == (
        f"--stream: expected a single line, got 'a\\nb' (from {file_source(tmp_path)})"
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@cache:port/0",
        "redis://:s3cret@cache/x",
        "unix:///r.sock?password=s3cret&db=x",
    ],
)
def test_redis_password_is_never_echoed(tmp_path: Path, url: str) -> None:
    message = load_error(tmp_path, env={"REDIS_URL": url})
    assert "s3cret" not in message
    assert "***" in message
    assert message.startswith("--redis-url: ")


# --------------------------------------------------------------------------- cross-option rules


def test_shutdown_timeout_must_exceed_drain_timeout(tmp_path: Path) -> None:
    message = load_error(tmp_path, argv=["--shutdown-timeout", "10"])
    assert message == (
        "--shutdown-timeout: must be greater than --drain-timeout (10, from default), "
        "got '10' (from command line)"
    )
    message = load_error(
        tmp_path, env={"TELTONIKA_DRAIN_TIMEOUT": "40"}, ini="shutdown-timeout = 35"
    )
    assert message == (
        "--shutdown-timeout: must be greater than --drain-timeout "
        "(40, from environment TELTONIKA_DRAIN_TIMEOUT), "
        f"got '35' (from {file_source(tmp_path)})"
    )
    (tmp_path / "tap.conf").unlink()
    message = load_error(tmp_path, argv=["--drain-timeout", "30"])
    assert message.startswith("--shutdown-timeout: must be greater than --drain-timeout (30,")
    assert message.endswith("got '30' (from default)")
    config = load(tmp_path, argv=["--drain-timeout", "30", "--shutdown-timeout", "30.5"])
    assert (config.drain_timeout, config.shutdown_timeout) == (30, 30.5)


def test_buffer_must_hold_a_whole_frame(tmp_path: Path) -> None:
    message = load_error(tmp_path, argv=["--max-frame-size", "1000", "--max-buffer", "1011"])
    assert message == (
        "--max-buffer: must hold a whole frame, at least --max-frame-size + 12 = 1012 bytes "
        "(--max-frame-size from command line), got '1011' (from command line)"
    )
    config = load(tmp_path, argv=["--max-frame-size", "1000", "--max-buffer", "1012"])
    assert config.max_buffer == 1012
    message = load_error(tmp_path, env={"TELTONIKA_MAX_FRAME_SIZE": "262144"})
    assert message.endswith("got '262144' (from default)")


# --------------------------------------------------------------------------- the INI file


def test_default_tap_conf_in_the_working_directory_is_read(tmp_path: Path) -> None:
    config = load(tmp_path, ini="stream = from-file")
    assert config.stream == "from-file"
    assert config.config_file == str(tmp_path / "tap.conf")
    assert config.sources["config"] == "default"


def test_missing_default_tap_conf_is_fine(tmp_path: Path) -> None:
    assert load(tmp_path).config_file is None


def test_explicit_config_file(tmp_path: Path) -> None:
    (tmp_path / "tap.conf").write_text(f"[{CONFIG_SECTION}]\nstream = default-file\n")
    (tmp_path / "other.conf").write_text(f"[{CONFIG_SECTION}]\nstream = other\n")
    (tmp_path / "env.conf").write_text(f"[{CONFIG_SECTION}]\nstream = env\n")
    env = {"TELTONIKA_CONFIG": "env.conf"}
    config = load(tmp_path, argv=["--config", "other.conf"], env=env)
    assert (config.stream, config.config_file) == ("other", str(tmp_path / "other.conf"))
    assert config.sources["config"] == "command line"
    config = load(tmp_path, env=env)
    assert (config.stream, config.sources["config"]) == ("env", "environment TELTONIKA_CONFIG")


def test_empty_config_name_reads_no_file(tmp_path: Path) -> None:
    (tmp_path / "tap.conf").write_text(f"[{CONFIG_SECTION}]\nstream = from-file\n")
    assert load(tmp_path, argv=["--config", ""]).stream == "telemetry:teltonika"
    assert load(tmp_path, env={"TELTONIKA_CONFIG": ""}).config_file is None


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, argv=["--config", "nope.conf"])
    assert message == (
        f"--config: no such file: {tmp_path / 'nope.conf'}, got 'nope.conf' (from command line)"
    )
    message = load_error(tmp_path, env={"TELTONIKA_CONFIG": "/nonexistent/tap.conf"})
    assert message == (
        "--config: no such file: /nonexistent/tap.conf, got '/nonexistent/tap.conf' "
        "(from environment TELTONIKA_CONFIG)"
    )


def test_unreadable_config_file(tmp_path: Path) -> None:
    (tmp_path / "tap.conf").mkdir()
    message = load_error(tmp_path)
    assert message.startswith(f"--config: cannot read {tmp_path / 'tap.conf'}: ")
    assert message.endswith("(from default)")


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, ini="handshake-timout = 15")
    assert message == (
        f"{tmp_path / 'tap.conf'}: unknown key 'handshake-timout' in [teltonika-ingest] "
        "(did you mean 'handshake-timeout'?)"
    )
    message = load_error(tmp_path, ini="handshake_timeout = 15")
    assert "(did you mean 'handshake-timeout'?)" in message
    message = load_error(tmp_path, ini="colour = blue")
    assert message == f"{tmp_path / 'tap.conf'}: unknown key 'colour' in [teltonika-ingest]"


def test_config_key_cannot_be_set_in_the_file(tmp_path: Path) -> None:
    message = load_error(tmp_path, ini="config = other.conf")
    assert message == (
        f"{tmp_path / 'tap.conf'}: key 'config' cannot be set in a config file; "
        "use --config or TELTONIKA_CONFIG"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[teltonika]\nstream = x\n", "unknown section [teltonika]"),
        ("[DEFAULT]\nstream = x\n", "unknown section [DEFAULT]"),
        ("stream = x\n", "line 1: setting before the [teltonika-ingest] section header"),
        ("[teltonika-ingest]\nstream = a\nstream = b\n", "line 3: key 'stream' repeated"),
        ("[teltonika-ingest]\n[teltonika-ingest]\n", "line 2: section [teltonika-ingest] repeated"),
        ("[teltonika-ingest]\nluhn\n", "line 2: expected 'key = value', got 'luhn'"),
    ],
)
def test_malformed_file(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "tap.conf").write_text(text)
    message = load_error(tmp_path)
    assert message.startswith(f"{tmp_path / 'tap.conf'}: {problem}"), message


def test_file_comments_case_and_percent(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        ini=(
            "; a comment\n"
            "# another\n"
            "Idle-Timeout = 45  # inline comment\n"
            "redis-url = redis://:p%25w@cache:6379/3\n"
        ),
    )
    assert config.idle_timeout == 45
    assert config.redis == RedisTarget(host="cache", port=6379, db=3, password="p%w")


def test_file_without_the_section_is_empty(tmp_path: Path) -> None:
    (tmp_path / "tap.conf").write_text("# nothing here\n")
    assert load(tmp_path) == load(tmp_path, argv=["--config", ""])


# --------------------------------------------------------------------------- Redis URLs


@pytest.mark.parametrize(
    ("url", "target", "described"),
    [
        (
            "redis://cache:6380/2",
            RedisTarget(host="cache", port=6380, db=2),
            "redis://cache:6380/2",
        ),
        ("redis://cache", RedisTarget(host="cache", port=6379, db=0), "redis://cache:6379/0"),
        ("redis://cache/", RedisTarget(host="cache", port=6379, db=0), "redis://cache:6379/0"),
        (
            "redis://:s3cret@10.0.0.5:6379/1",
            RedisTarget(host="10.0.0.5", port=6379, db=1, password="s3cret"),
            "redis://:***@10.0.0.5:6379/1",
        ),
        (
            "redis://:p%40ss%2Fw@cache:6379/0",
            RedisTarget(host="cache", port=6379, db=0, password="p@ss/w"),
            "redis://:***@cache:6379/0",
        ),
        ("REDIS://[::1]:6379/0", RedisTarget(host="::1", port=6379, db=0), "redis://[::1]:6379/0"),
        (
            "unix:///run/redis/redis.sock",
            RedisTarget(unix_path="/run/redis/redis.sock", db=0),
            "unix:///run/redis/redis.sock?db=0",
        ),
        (
            "unix:///run/redis.sock?db=3&password=s3cret",
            RedisTarget(unix_path="/run/redis.sock", db=3, password="s3cret"),
            "unix:///run/redis.sock?db=3&password=***",
        ),
    ],
)
def test_redis_url_forms(tmp_path: Path, url: str, target: RedisTarget, described: str) -> None:
    assert RedisTarget.parse(url) == target
    assert target.describe() == described
    assert "s3cret" not in repr(target)
    assert target.is_unix == (target.unix_path is not None)
    assert load(tmp_path, env={"REDIS_URL": url}).redis == target


def test_redis_url_errors_are_value_errors_without_the_url() -> None:
    with pytest.raises(ValueError, match=r"^rediss:// \(TLS\) is not supported") as caught:
        RedisTarget.parse("rediss://:s3cret@cache:6380/0")
    assert "s3cret" not in str(caught.value)


# --------------------------------------------------------------------------- endpoints

GOOD_ENDPOINTS = [
    "tcp:0",
    "tcp:5027",
    "tcp:5027:interface=127.0.0.1",
    "tcp:port=5027:backlog=100",
    "tcp6:5027:interface=\\:\\:1",
    "ssl:5027:privateKey=key.pem:certKey=cert.pem",
    "unix:/run/teltonika.sock",
    "unix:address=/run/t.sock:mode=660:lockfile=0",
    "haproxy:tcp:5028",
    "systemd:domain=INET:index=0",
    "systemd:domain=INET6:name=devices",
]


@pytest.mark.parametrize("description", GOOD_ENDPOINTS)
def test_good_endpoints_are_accepted(tmp_path: Path, description: str) -> None:
    check_server_endpoint(description)
    assert load(tmp_path, argv=["--listen", description]).listen == description


# The check is Twisted's own parsing (serverFromString without listening): it agrees with
# Twisted on every string that needs no file and no inherited socket, plugin types included.
@pytest.mark.parametrize(
    ("description", "ok"),
    [
        ("tcp:5027", True),
        ("tcp:5027:interface=127.0.0.1:backlog=10", True),
        ("unix:/tmp/t.sock:mode=600", True),
        ("tcp6:5027:interface=\\:\\:1", True),
        ("haproxy:tcp:5027", True),
        ("stdio:", True),  # any endpoint type Twisted knows, not a list of six
        ("tcp:abc", False),
        ("tcp:5027:interfce=127.0.0.1", False),
        ("tcp:5027:backlog=many", False),
        ("unix:/tmp/t.sock:mode=9", False),
        ("unix:/tmp/t.sock:lockfile=x", False),
        ("tcp6:5027:interfce=x", False),
        ("haproxy:tcp:5027:bogus=1", False),
    ],
)
def test_endpoint_check_agrees_with_twisted(description: str, ok: bool) -> None:
    try:
        serverFromString(MemoryReactor(), description)
        twisted_ok = True
    except (ValueError, TypeError):
        twisted_ok = False
    try:
        check_server_endpoint(description)
        ours_ok = True
    except ValueError:
        ours_ok = False
    assert (twisted_ok, ours_ok) == (ok, ok)


# --------------------------------------------------------------------------- usage.Options


def test_options_builds_config_and_keeps_raw_command_line(tmp_path: Path) -> None:
    options = Options(environ={"TELTONIKA_IDLE_TIMEOUT": "99"}, cwd=tmp_path)
    options.parseOptions(["--handshake-timeout=7", "--luhn"])
    assert options["handshake-timeout"] == "7"
    assert options["idle-timeout"] is None  # not given on the command line
    assert options.config.handshake_timeout == 7
    assert options.config.idle_timeout == 99
    assert options.config.luhn is True


def test_options_constructible_like_twistd_does() -> None:
    # twistd instantiates the plugin's options class without arguments.
    options = Options()
    assert all(options[spec.name] is None for spec in OPTIONS)
    assert "TELTONIKA_HANDSHAKE_TIMEOUT" in str(options)


def test_positional_arguments_and_unknown_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError):
        load(tmp_path, argv=["extra"])
    with pytest.raises(usage.UsageError, match="option --bogus not recognized"):
        load(tmp_path, argv=["--bogus", "1"])


def test_every_option_is_on_the_command_line() -> None:
    long_options = {opt.rstrip("=") for opt in Options().longOpt}
    assert {spec.name for spec in OPTIONS} <= long_options
    assert "no-luhn" in long_options


def test_env_names_follow_the_contract() -> None:
    contract = {
        "listen": "TELTONIKA_LISTEN",
        "udp-port": "TELTONIKA_UDP_PORT",
        "metrics": "TELTONIKA_METRICS",
        "redis-url": "REDIS_URL",
        "stream": "REDIS_TELEMETRY_STREAM",
        "stream-maxlen": "TELTONIKA_STREAM_MAXLEN",
        "instance-id": "TELTONIKA_INSTANCE_ID",
        "config": "TELTONIKA_CONFIG",
    }
    for spec in OPTIONS:
        expected = contract.get(spec.name, "TELTONIKA_" + spec.name.upper().replace("-", "_"))
        assert spec.env == expected
    assert len({spec.env for spec in OPTIONS}) == len(OPTIONS)


# --------------------------------------------------------------------------- tap.conf

SETTING_LINE = re.compile(r"^#\s*([a-z][a-z0-9-]*)\s*=\s*(.*)$")


def _tap_conf() -> str:
    return (REPO / "tap.conf").read_text(encoding="utf-8")


def test_tap_conf_is_generated_from_the_table() -> None:
    assert _tap_conf() == render_tap_conf(), (
        "tap.conf is stale: python -m teltonika_ingest.config tap.conf > tap.conf"
    )


def test_tap_conf_lists_every_option_commented_out_at_its_default() -> None:
    settings: dict[str, str] = {}
    for line in _tap_conf().splitlines():
        match = SETTING_LINE.match(line)
        if match:
            assert match[1] not in settings, f"{match[1]} listed twice"
            settings[match[1]] = match[2]
        else:
            # Apart from comments and blank lines, only the section header.
            assert line == "" or line.startswith("#") or line == f"[{CONFIG_SECTION}]", line
    file_specs = [spec for spec in OPTIONS if spec.in_file]
    assert settings == {spec.key: spec.default for spec in file_specs}
    assert [spec.name for spec in OPTIONS if not spec.in_file] == ["config"]
    assert "--config" in _tap_conf() and "TELTONIKA_CONFIG" in _tap_conf()


def test_tap_conf_as_shipped_equals_no_file(tmp_path: Path) -> None:
    (tmp_path / "tap.conf").write_text(_tap_conf(), encoding="utf-8")
    shipped = load(tmp_path)
    assert shipped.config_file == str(tmp_path / "tap.conf")
    assert shipped == load(tmp_path, argv=["--config", ""])


def test_tap_conf_uncommented_equals_no_file(tmp_path: Path) -> None:
    lines = [
        line[1:].lstrip() if SETTING_LINE.match(line) else line for line in _tap_conf().splitlines()
    ]
    (tmp_path / "tap.conf").write_text("\n".join(lines), encoding="utf-8")
    uncommented = load(tmp_path)
    assert set(uncommented.sources.values()) == {"default", file_source(tmp_path)}
    assert uncommented == load(tmp_path, argv=["--config", ""])


# --------------------------------------------------------------------------- OPERATIONS.md


def _reference_section() -> str:
    text = (REPO / "OPERATIONS.md").read_text(encoding="utf-8")
    start = text.index("\n## Configuration reference\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_operations_md_documents_every_option() -> None:
    section = _reference_section()
    for spec in OPTIONS:
        rows = [line for line in section.splitlines() if line.startswith(f"| `{spec.flag}`")]
        assert len(rows) == 1, spec.name
        assert f"`{spec.env}`" in rows[0]
        assert (f"`{spec.default}`" if spec.default else "*(empty)*") in rows[0]
    assert render_reference() in section, (
        "OPERATIONS.md is stale: paste python -m teltonika_ingest.config reference"
    )


def test_operations_md_mentions_only_existing_options() -> None:
    long_options = {opt.rstrip("=") for opt in Options().longOpt}
    mentioned = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", _reference_section()))
    assert mentioned, "the section mentions no option at all"
    assert mentioned <= long_options, mentioned - long_options


def test_every_limit_explains_its_default() -> None:
    limits = {
        "handshake-timeout",
        "idle-timeout",
        "max-frame-size",
        "max-buffer",
        "max-connections",
        "publish-timeout",
        "max-inflight",
        "udp-dedup-window",
        "command-timeout",
        "max-command-length",
        "janitor-interval",
        "drain-timeout",
        "shutdown-timeout",
        "stream-maxlen",
    }
    assert {spec.name for spec in OPTIONS if spec.why} >= limits
