"""Service configuration: options, environment, ``tap.conf`` and built-in defaults.

One table, :data:`OPTIONS`, is the single source of truth. It drives

* the ``twistd teltonika-ingest`` command line (:class:`Options`),
* the environment variable and INI key of every option,
* the shipped ``tap.conf`` (:func:`render_tap_conf`) and the reference table in
  OPERATIONS.md (:func:`render_reference`), both checked against it by the tests.

Precedence (contract.md section 1): command line > environment > ``--config`` INI file
(default ``./tap.conf`` when that file exists) > built-in default. The usage options are all
declared with default ``None`` so that "given on the command line" can be told from "not
given"; :meth:`Options.postOptions` resolves every layer and builds :class:`Config`.

Every invalid value fails with one ``usage.UsageError`` whose message is a single line naming the
option, the bad value and where it came from, e.g.::

    --handshake-timeout: expected a positive number of seconds, got 'abc'
    (from environment TELTONIKA_HANDSHAKE_TIMEOUT)

(on one line). Redis passwords are never echoed.

Run ``python -m teltonika_ingest.config tap.conf`` to regenerate ``tap.conf`` and
``python -m teltonika_ingest.config reference`` to print the OPERATIONS.md table.
"""

from __future__ import annotations

import ast
import configparser
import contextlib
import difflib
import ipaddress
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
from twisted.python import usage

__all__ = [
    "CONFIG_SECTION",
    "DEFAULT_CONFIG_FILE",
    "FRAME_OVERHEAD",
    "OPTIONS",
    "OPTIONS_BY_NAME",
    "PROCESSOR_OPTIONS",
    "PROCESSOR_TABLE",
    "Config",
    "OptionSpec",
    "OptionTable",
    "Options",
    "ProcessorConfig",
    "ProcessorOptions",
    "RedisTarget",
    "check_server_endpoint",
    "render_reference",
    "render_tap_conf",
    "server_endpoint_types",
    "with_backlog",
]

CONFIG_SECTION: Final = "teltonika-ingest"
DEFAULT_CONFIG_FILE: Final = "tap.conf"

# Preamble (4) + data field length (4) + CRC (4) around the data field of a TCP frame.
FRAME_OVERHEAD: Final = 12

REDIS_DEFAULT_PORT: Final = 6379
LOG_FORMATS: Final = ("text", "json")
WORKER_SOCKETS: Final = ("reuseport", "shared")
LOG_LEVELS: Final = ("debug", "info", "warn", "error", "critical")

_TRUE: Final = frozenset({"true", "yes", "1", "on"})
_FALSE: Final = frozenset({"false", "no", "0", "off"})


# --------------------------------------------------------------------------- the table


@attrs.frozen
class OptionSpec:
    """One service option.

    ``default`` is the text form, exactly as it appears (commented out) in ``tap.conf``;
    ``""`` means off / none / derived (see ``help``). ``kind`` selects the parser and validator
    (one of the keys of ``_PARSERS``). ``why`` justifies the default of a limit (OPERATIONS.md).
    ``in_file`` is false only for ``config`` itself, which cannot name another file.
    """

    name: str
    env: str
    default: str
    kind: str
    help: str
    why: str = ""
    in_file: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def attr(self) -> str:
        """The :class:`Config` field this option fills."""
        return _ATTR_OVERRIDES.get(self.name, self.name.replace("-", "_"))

    @property
    def key(self) -> str:
        """The key in the ``[teltonika-ingest]`` section of the INI file."""
        return self.name


_ATTR_OVERRIDES: Final = {"redis-url": "redis", "config": "config_file"}


OPTIONS: Final[tuple[OptionSpec, ...]] = (
    OptionSpec(
        "listen",
        "TELTONIKA_LISTEN",
        "tcp:5027",
        "endpoint",
        "Twisted server endpoint string for devices, of any type Twisted has a parser or "
        "plugin for (tcp:, tcp6:, ssl:, unix:, haproxy:, systemd:, ...)",
        why="5027 is the port commonly used for Teltonika devices (Traccar's Teltonika port), "
        "so existing device profiles carry over; all interfaces, because devices connect "
        "from the mobile network.",
    ),
    OptionSpec(
        "udp-port",
        "TELTONIKA_UDP_PORT",
        "0",
        "udp-port",
        "UDP port for devices that send over UDP; 0 or empty = no UDP listener",
    ),
    OptionSpec(
        "udp-interface",
        "TELTONIKA_UDP_INTERFACE",
        "",
        "ip-or-empty",
        "IP address the UDP port binds to; empty = all interfaces",
    ),
    OptionSpec(
        "metrics",
        "TELTONIKA_METRICS",
        "tcp:9090:interface=127.0.0.1",
        "endpoint",
        "Twisted server endpoint string for the HTTP operations listener "
        "(/metrics, /healthz, /readyz)",
        why="loopback only: the listener has no authentication; expose it deliberately "
        "(e.g. tcp:9090:interface=0.0.0.0 behind a firewall) for a scraper on another host.",
    ),
    OptionSpec(
        "redis-url",
        "REDIS_URL",
        "",
        "redis-url",
        "redis://[:password@]host[:port][/db] or unix:///path/to/socket[?db=N&password=P]; "
        "empty = start an embedded redis-server (development only)",
    ),
    OptionSpec(
        "stream",
        "REDIS_TELEMETRY_STREAM",
        "telemetry:teltonika",
        "key",
        "Redis stream key for telemetry (dead letters go to this key + ':dlq')",
    ),
    OptionSpec(
        "stream-maxlen",
        "TELTONIKA_STREAM_MAXLEN",
        "1000000",
        "count",
        "approximate stream length cap (XADD MAXLEN ~ N); 0 = never trim",
        why="about a day at 10 records/s, roughly 0.5 GB of Redis memory at ~500 bytes an "
        "entry; the stream is a buffer for the stream processor, not an archive.",
    ),
    OptionSpec(
        "instance-id",
        "TELTONIKA_INSTANCE_ID",
        "",
        "instance-id",
        "this process's identity in the connection registry; empty = the host name",
    ),
    OptionSpec(
        "config",
        "TELTONIKA_CONFIG",
        "./" + DEFAULT_CONFIG_FILE,
        "config",
        "INI file to read; an explicitly named file must exist; empty = read no file",
        in_file=False,
    ),
    OptionSpec(
        "data-dir",
        "TELTONIKA_DATA_DIR",
        "./var",
        "path",
        "data directory of the embedded Redis (unused when a Redis URL is set)",
    ),
    OptionSpec(
        "handshake-timeout",
        "TELTONIKA_HANDSHAKE_TIMEOUT",
        "30",
        "seconds",
        "seconds a new connection has to send its IMEI before it is closed",
        why="a device sends its IMEI as soon as the socket opens; 30 s covers a slow 2G "
        "link while reclaiming sockets of scanners and half-open connects quickly.",
    ),
    OptionSpec(
        "idle-timeout",
        "TELTONIKA_IDLE_TIMEOUT",
        "600",
        "seconds",
        "close a device connection that sent nothing for this many seconds",
        why="sockets left half-open by carrier NAT are reclaimed within minutes; a device that "
        "was cut reconnects when it has data. Fleets that must stay reachable for commands "
        "while parked (long device open-link timeout, rare records) need a value above the "
        "device's send period.",
    ),
    OptionSpec(
        "max-frame-size",
        "TELTONIKA_MAX_FRAME_SIZE",
        "65536",
        "bytes",
        "largest data-field length accepted in a frame, in bytes; larger frames close the "
        "connection",
        why="Teltonika documents 1280 bytes as the largest AVL packet of current devices; "
        "64 KiB leaves room for Codec 8E variable-length IO while a garbage length field "
        "cannot make the service buffer gigabytes.",
    ),
    OptionSpec(
        "max-buffer",
        "TELTONIKA_MAX_BUFFER",
        "262144",
        "bytes",
        "most unconsumed bytes buffered per connection; must be at least max-frame-size + 12",
        why="four maximum frames; bounds memory per connection (10 000 devices x 256 KiB is "
        "the worst case, real buffers hold one partial frame).",
    ),
    OptionSpec(
        "max-buffered-bytes",
        "TELTONIKA_MAX_BUFFERED_BYTES",
        "268435456",
        "count",
        "bytes of partial frames buffered across all connections; beyond it the devices "
        "with the biggest buffers are not read until the total is under three quarters of "
        "it (teltonika_memory_pauses_total); 0 = no global bound",
        why="256 MiB: 4,000 connections each holding a whole 64 KiB frame, far more than real "
        "devices buffer (a partial frame of a few hundred bytes while it arrives), while "
        "100,000 parked connections could otherwise ask for --max-buffer each (25 GB).",
    ),
    OptionSpec(
        "max-connections",
        "TELTONIKA_MAX_CONNECTIONS",
        "0",
        "count",
        "most simultaneous device connections; extra ones are closed at once; 0 = unlimited",
        why="unlimited: the file descriptor limit (LimitNOFILE) is the real bound; set this "
        "below it so overload is refused cleanly instead of failing in accept().",
    ),
    OptionSpec(
        "max-connections-per-address",
        "TELTONIKA_MAX_CONNECTIONS_PER_ADDRESS",
        "0",
        "count",
        "most simultaneous device connections from one source IP address; extra ones are "
        "closed at once; 0 = unlimited",
        why="off: devices behind a carrier's NAT (or a private APN) share a few public "
        "addresses, so a per-address limit would lock out a real fleet; set it only when "
        "devices have addresses of their own. Behind haproxy: the limit counts the balancer.",
    ),
    OptionSpec(
        "frame-timeout",
        "TELTONIKA_FRAME_TIMEOUT",
        "30",
        "seconds-or-zero",
        "seconds a device has to complete a frame once its first byte arrived, or the "
        "connection is closed (unlike --idle-timeout, a byte does not restart it); 0 = off",
        why="a 64 KiB frame takes ~26 s at 20 kbit/s (slow GPRS), a real 1,280-byte packet "
        "well under a second; a peer trickling a frame byte by byte holds its socket and "
        "buffer at most this long.",
    ),
    OptionSpec(
        "listen-backlog",
        "TELTONIKA_LISTEN_BACKLOG",
        "1024",
        "positive-int",
        "listen backlog of the device listener (queue of connections not yet accepted), "
        "added to --listen as backlog=N unless it names one itself; the kernel caps it at "
        "net.core.somaxconn",
        why="Twisted's default of 50 overflows when a fleet reconnects at once (a restart, a "
        "cell outage): 122-242 of a 3,000-connection burst overflowed it; an overflowed "
        "connect waits for a SYN retransmission (1 s, 3 s, ...).",
    ),
    OptionSpec(
        "publish-timeout",
        "TELTONIKA_PUBLISH_TIMEOUT",
        "5",
        "seconds",
        "a Redis publish unanswered for this many seconds has failed (the packet is not ACKed)",
        why="a healthy XADD answers in milliseconds; the Redis client holds commands while "
        "it reconnects, so without a bound a device would wait minutes. Not ACKing makes "
        "the device resend, which is safe.",
    ),
    OptionSpec(
        "max-inflight",
        "TELTONIKA_MAX_INFLIGHT",
        "1024",
        "positive-int",
        "packets (and dead letters) handed to Redis and not yet confirmed, across the "
        "process; beyond that they wait, and once as many wait, reading from devices pauses "
        "until none does (teltonika_publish_backpressure_total); a packet arriving while 8 "
        "times as many wait is not ACKed (teltonika_publish_overflow_total)",
        why="enough to keep Redis busy under thousands of devices; when Redis or this process "
        "falls behind, devices wait with their data instead of being refused and reconnecting, "
        "and memory stays bounded.",
    ),
    OptionSpec(
        "udp-dedup-window",
        "TELTONIKA_UDP_DEDUP_WINDOW",
        "60",
        "seconds-or-zero",
        "seconds a resent UDP datagram (same IMEI and AVL packet id) is re-ACKed instead of "
        "republished; 0 = no deduplication",
        why="a device resends an unacknowledged datagram after its ACK wait (seconds to tens "
        "of seconds); 60 s covers a few retries while the memory per device stays tiny.",
    ),
    OptionSpec(
        "device-message-budget",
        "TELTONIKA_DEVICE_MESSAGE_BUDGET",
        "60",
        "count",
        "device messages (Codec 13, answers with no command in flight) per device per "
        "minute written to commands:results; further ones are counted and dropped; 0 = "
        "unlimited",
        why="a device sends Codec 13 messages now and then (a serial-link reading, a "
        "driver message); one a second on average is plenty, while one device looping "
        "(~6,500 a second were seen) cannot trim the other commands' outcomes out of the "
        "capped stream or flood the log.",
    ),
    OptionSpec(
        "dead-letter-budget",
        "TELTONIKA_DEAD_LETTER_BUDGET",
        "10",
        "count",
        "undecodable frames per device per minute written to the dead-letter stream; "
        "beyond it the frame is not stored, not ACKed and the connection is closed (the "
        "device resends it later); 0 = unlimited",
        why="a dead letter is a firmware bug or a new codec worth a look, not a stream: ten a "
        "minute keep the evidence while one device cannot fill Redis with up to ~98 KiB "
        "a frame.",
    ),
    OptionSpec(
        "dlq-max-bytes",
        "TELTONIKA_DLQ_MAX_BYTES",
        "268435456",
        "count",
        "approximate Redis memory bound of the dead-letter stream in bytes (its oldest "
        "entries are trimmed beyond it, as by --stream-maxlen); 0 = entries only",
        why="256 MiB: thousands of dead letters of the largest frames, while the entry cap "
        "(--stream-maxlen) alone would allow ~98 GB of them.",
    ),
    OptionSpec(
        "results-max-bytes",
        "TELTONIKA_RESULTS_MAX_BYTES",
        "67108864",
        "count",
        "approximate Redis memory bound of commands:results in bytes (oldest outcomes "
        "trimmed beyond it, besides its 100,000-entry cap); 0 = entries only",
        why="64 MiB holds the 100,000 outcomes of ordinary commands (~300 bytes each) with "
        "room to spare, and bounds a stream of large device answers.",
    ),
    OptionSpec(
        "command-timeout",
        "TELTONIKA_COMMAND_TIMEOUT",
        "30",
        "seconds",
        "default seconds to wait for a device's answer to a GPRS command (timeout_s overrides)",
        why="devices answer in a few seconds, but a command waits until the device is idle "
        "and its link may be slow.",
    ),
    OptionSpec(
        "max-command-length",
        "TELTONIKA_MAX_COMMAND_LENGTH",
        "512",
        "bytes",
        "longest command payload in bytes (text, or hex decoded); longer entries are invalid",
        why="Teltonika limits an SMS/GPRS text command to 160 characters on current devices; "
        "512 leaves room for binary serial-link payloads and older firmware while a runaway "
        "entry cannot flood a device.",
    ),
    OptionSpec(
        "command-queue-ttl",
        "TELTONIKA_COMMAND_QUEUE_TTL",
        "86400",
        "seconds",
        "default seconds a queued command (commands:queue) waits for its device before it "
        "expires (ttl_s overrides; at most 30 days)",
        why="a day covers a truck's night in a dead zone or a weekend in a depot; a command "
        "older than that is rarely still wanted (send a longer ttl_s when it is).",
    ),
    OptionSpec(
        "command-queue-attempts",
        "TELTONIKA_COMMAND_QUEUE_ATTEMPTS",
        "3",
        "positive-int",
        "default deliveries of a queued command without an answer before it fails "
        "(max_attempts overrides)",
        why="a delivery lost with a dropped connection is normal on mobile links; three "
        "unanswered deliveries mean the device does not understand the command.",
    ),
    OptionSpec(
        "command-queue-max-per-device",
        "TELTONIKA_COMMAND_QUEUE_MAX_PER_DEVICE",
        "32",
        "positive-int",
        "most queued commands per IMEI; further entries are invalid (queue full)",
        why="devices take one command at a time; a few dozen waiting is already minutes of "
        "work on a slow link, and a runaway sender cannot fill Redis through one device.",
    ),
    OptionSpec(
        "command-queue-max-total",
        "TELTONIKA_COMMAND_QUEUE_MAX_TOTAL",
        "500000",
        "positive-int",
        "most queued commands in Redis in all (all devices); further entries are invalid",
        why="100,000 devices with a few commands each fit; at about 0.6 KB per queued "
        "command (measured, BENCHMARKS.md) the queue stays under ~310 MB of Redis memory.",
    ),
    OptionSpec(
        "command-queue-sweep-interval",
        "TELTONIKA_COMMAND_QUEUE_SWEEP_INTERVAL",
        "5",
        "seconds",
        "how often each instance expires due queued commands (one script per page of due "
        "commands, nothing per queued command)",
        why="an expired outcome is at most this late; 5 s costs one cheap script call per "
        "instance when nothing is due.",
    ),
    OptionSpec(
        "janitor-interval",
        "TELTONIKA_JANITOR_INTERVAL",
        "60",
        "seconds",
        "seconds between registry janitor passes (fields of instances without heartbeat)",
        why="the heartbeat key lives 90 s, so a dead instance's registry fields are gone at "
        "most about 150 s after it died, at the cost of one registry scan a minute.",
    ),
    OptionSpec(
        "drain-timeout",
        "TELTONIKA_DRAIN_TIMEOUT",
        "10",
        "seconds",
        "seconds graceful shutdown waits for in-flight publishes to finish and be ACKed",
        why="twice the publish timeout: every in-flight publish has either finished or failed "
        "by then.",
    ),
    OptionSpec(
        "shutdown-timeout",
        "TELTONIKA_SHUTDOWN_TIMEOUT",
        "30",
        "seconds",
        "whole graceful shutdown budget in seconds, then exit status 1; "
        "must be greater than drain-timeout",
        why="fits inside systemd's default stop timeout (90 s); Kubernetes' default grace "
        "period is also 30 s and docker stop waits only 10 s, so set "
        "terminationGracePeriodSeconds / docker stop -t / stop_grace_period above this value.",
    ),
    OptionSpec(
        "log-format",
        "TELTONIKA_LOG_FORMAT",
        "text",
        "log-format",
        "log output format: text or json (one object per line)",
    ),
    OptionSpec(
        "log-level",
        "TELTONIKA_LOG_LEVEL",
        "info",
        "log-level",
        "least severe level logged: debug, info, warn, error or critical",
    ),
    OptionSpec(
        "allow-list",
        "TELTONIKA_ALLOW_LIST",
        "",
        "optional-file",
        "file of allowed IMEIs, one per line, # comments; empty = no file",
    ),
    OptionSpec(
        "allow-list-key",
        "TELTONIKA_ALLOW_LIST_KEY",
        "",
        "optional-key",
        "Redis set of allowed IMEIs; empty = no Redis allow list",
    ),
    OptionSpec(
        "luhn",
        "TELTONIKA_LUHN",
        "false",
        "bool",
        "reject IMEIs that fail the Luhn check digit (command line: --luhn / --no-luhn)",
    ),
    OptionSpec(
        "workers",
        "TELTONIKA_WORKERS",
        "1",
        "positive-int",
        "worker processes serving the same device and UDP ports (needs a tcp: --listen); "
        "worker i registers as <instance-id>-i",
        why="a single process is the simplest to run and already holds the 10,000 devices "
        "measured in BENCHMARKS.md; use about one worker per core when one core is not enough.",
    ),
    OptionSpec(
        "worker-sockets",
        "TELTONIKA_WORKER_SOCKETS",
        "reuseport",
        "worker-sockets",
        "with --workers > 1: reuseport = one SO_REUSEPORT listening socket per worker "
        "(the kernel spreads connections), shared = one socket accepted from by every worker",
        why="both spread 2,000 connections over 2 workers within 4 % here (BENCHMARKS.md, "
        "'Workers'); reuseport wakes one worker per new connection where a shared socket wakes "
        "them all (the cost grows with N), while shared lets the live workers take the "
        "connections of one being restarted.",
    ),
    OptionSpec(
        "time-valid-window",
        "TELTONIKA_TIME_VALID_WINDOW",
        "600",
        "seconds-or-zero",
        "a record timestamped more than this many seconds after received_at gets "
        '"time_valid": false (so do timestamps before 2010); the record is published anyway',
        why="contract.md section 8: 10 minutes. Device clocks come from GNSS (or the "
        "network): minutes ahead means a bad clock, not a fast one; 0 = nothing in the future.",
    ),
    OptionSpec(
        "io-names",
        "TELTONIKA_IO_NAMES",
        "false",
        "bool",
        'add the "io" object (named, scaled IO values for the device\'s model) to every '
        "payload; attributes stay as they are (command line: --io-names / --no-io-names)",
    ),
    OptionSpec(
        "default-model",
        "TELTONIKA_DEFAULT_MODEL",
        "",
        "model",
        "device model for --io-names when neither the Redis hash nor the allow-list file "
        "names one (e.g. FMB920); empty = unknown: only the ids common to all families",
    ),
    OptionSpec(
        "model-key",
        "TELTONIKA_MODEL_KEY",
        "devices:model",
        "optional-key",
        "Redis hash IMEI -> device model for --io-names; empty = no Redis lookup",
    ),
)

OPTIONS_BY_NAME: Final[Mapping[str, OptionSpec]] = {spec.name: spec for spec in OPTIONS}

PROCESSOR_SECTION: Final = "teltonika-processor"
PROCESSOR_CONFIG_FILE: Final = "processor.conf"

# The processor's table (contract.md section 9): same kinds, same layers, its own file.
PROCESSOR_OPTIONS: Final[tuple[OptionSpec, ...]] = (
    OptionSpec(
        "redis-url",
        "REDIS_URL",
        "",
        "redis-url",
        "the Redis the ingest publishes to: redis://[:password@]host[:port][/db] or "
        "unix:///path/to/socket[?db=N&password=P]; empty = start an embedded redis-server "
        "(development only)",
    ),
    OptionSpec(
        "database-url",
        "DATABASE_URL",
        "",
        "database-url",
        "PostgreSQL: postgresql://user[:password]@host[:port]/db or "
        "postgresql:///db?host=/socket/dir; empty = start an embedded PostgreSQL "
        "(development only)",
    ),
    OptionSpec(
        "stream",
        "REDIS_TELEMETRY_STREAM",
        "telemetry:teltonika",
        "key",
        "the telemetry stream consumed (dead letters go to this key + ':processor:dlq')",
    ),
    OptionSpec(
        "group",
        "PROCESSOR_GROUP",
        "teltonika-processor",
        "key",
        "consumer group (created at the start of the stream on first start)",
    ),
    OptionSpec(
        "consumer",
        "PROCESSOR_CONSUMER",
        "",
        "instance-id",
        "this instance's consumer name in the group; empty = the host name",
    ),
    OptionSpec(
        "metrics",
        "PROCESSOR_METRICS",
        "tcp:9092:interface=127.0.0.1",
        "endpoint",
        "Twisted server endpoint string for /metrics, /healthz, /readyz",
        why="loopback only, as the ingest's 9090: the listener has no authentication.",
    ),
    OptionSpec(
        "live",
        "PROCESSOR_LIVE",
        "",
        "optional-endpoint",
        "Twisted server endpoint string for the live feed (/ws) and page (/); empty = off",
    ),
    OptionSpec(
        "live-tokens",
        "PROCESSOR_LIVE_TOKENS",
        "",
        "optional-file",
        "file of live-feed tokens, 'TOKEN IMEI[,IMEI...]' or 'TOKEN *' one a line; empty = no file",
    ),
    OptionSpec(
        "live-auth-hook",
        "PROCESSOR_LIVE_AUTH_HOOK",
        "",
        "hook",
        "external authorisation for live-feed tokens the file does not know: "
        "package.module:attribute (OPERATIONS.md, Live feed); empty = none",
    ),
    OptionSpec(
        "batch-size",
        "PROCESSOR_BATCH_SIZE",
        "4000",
        "positive-int",
        "most stream entries read (XREADGROUP COUNT) and written to PostgreSQL in one transaction",
        why="only a backlog fills a batch (a read returns what is there), so the size costs "
        "no latency at the live rate; draining a backlog, 4000 rows per COPY did 55k records/s "
        "against 49k with 1000 here (BENCHMARKS.md), about 70 ms a transaction.",
    ),
    OptionSpec(
        "block-time",
        "PROCESSOR_BLOCK_TIME",
        "1",
        "seconds",
        "seconds one XREADGROUP waits for new entries before it reads again",
        why="an idle processor wakes once a second (claims, lag, shutdown) while new entries "
        "are delivered as soon as they are added.",
    ),
    OptionSpec(
        "claim-idle",
        "PROCESSOR_CLAIM_IDLE",
        "60",
        "seconds",
        "entries pending this many seconds in any consumer (a dead instance) are claimed "
        "(XAUTOCLAIM)",
        why="far above a healthy batch's read-to-ack time (milliseconds to seconds, or the "
        "drain timeout), so a live instance's entries are never stolen.",
    ),
    OptionSpec(
        "claim-interval",
        "PROCESSOR_CLAIM_INTERVAL",
        "30",
        "seconds",
        "seconds between XAUTOCLAIM passes (one also runs at start)",
    ),
    OptionSpec(
        "dlq-attempts",
        "PROCESSOR_DLQ_ATTEMPTS",
        "5",
        "positive-int",
        "an entry that fails to decode or to write this many deliveries goes to the "
        "processor's dead-letter stream and is acknowledged",
        why="a transient problem clears in one or two deliveries; five claims a claim-idle "
        "apart leave minutes to notice before a record is set aside.",
    ),
    OptionSpec(
        "device-state-size",
        "PROCESSOR_DEVICE_STATE_SIZE",
        "100000",
        "positive-int",
        "devices whose last position is kept in memory (least recently used evicted)",
        why="about 200 bytes a device, ~20 MB for 100 000 devices; an evicted device costs "
        "one last_positions query when it reports again.",
    ),
    OptionSpec(
        "write-retry-max",
        "PROCESSOR_WRITE_RETRY_MAX",
        "30",
        "seconds",
        "longest backoff between attempts to write a batch while PostgreSQL fails",
    ),
    OptionSpec(
        "instance-id",
        "PROCESSOR_INSTANCE_ID",
        "",
        "instance-id",
        "this process's identity in logs and dead letters; empty = the host name",
    ),
    OptionSpec(
        "config",
        "PROCESSOR_CONFIG",
        "./" + PROCESSOR_CONFIG_FILE,
        "config",
        "INI file to read; an explicitly named file must exist; empty = read no file",
        in_file=False,
    ),
    OptionSpec(
        "data-dir",
        "PROCESSOR_DATA_DIR",
        "./var",
        "path",
        "data directory of the embedded Redis and PostgreSQL (unused when URLs are set)",
    ),
    OptionSpec(
        "drain-timeout",
        "PROCESSOR_DRAIN_TIMEOUT",
        "10",
        "seconds",
        "seconds graceful shutdown waits for the in-flight batch to be written and acknowledged",
        why="a batch writes in well under a second; ten leave room for a slow PostgreSQL "
        "while staying inside the shutdown timeout.",
    ),
    OptionSpec(
        "shutdown-timeout",
        "PROCESSOR_SHUTDOWN_TIMEOUT",
        "30",
        "seconds",
        "whole graceful shutdown budget in seconds, then exit status 1; "
        "must be greater than drain-timeout",
        why="as the ingest's: inside systemd's 90 s and Kubernetes' 30 s grace period.",
    ),
    OptionSpec(
        "log-format",
        "PROCESSOR_LOG_FORMAT",
        "text",
        "log-format",
        "log output format: text or json (one object per line)",
    ),
    OptionSpec(
        "log-level",
        "PROCESSOR_LOG_LEVEL",
        "info",
        "log-level",
        "least severe level logged: debug, info, warn, error or critical",
    ),
)


# --------------------------------------------------------------------------- value parsers


class _Invalid(ValueError):
    """A value failed its check; the message says what was expected (no value, no source)."""


def _number(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _Invalid(expected) from None
    if not math.isfinite(value):
        raise _Invalid(expected)
    return value


def _integer(text: str, expected: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise _Invalid(expected) from None


def _parse_seconds(text: str) -> float:
    expected = "expected a positive number of seconds"
    value = _number(text, expected)
    if value <= 0:
        raise _Invalid(expected)
    return value


def _parse_seconds_or_zero(text: str) -> float:
    expected = "expected a number of seconds (0 = off)"
    value = _number(text, expected)
    if value < 0:
        raise _Invalid(expected)
    return value


def _parse_bytes(text: str) -> int:
    expected = "expected a positive whole number of bytes"
    value = _integer(text, expected)
    if value <= 0:
        raise _Invalid(expected)
    return value


def _parse_count(text: str) -> int:
    expected = "expected a whole number >= 0 (0 = unlimited / off)"
    value = _integer(text, expected)
    if value < 0:
        raise _Invalid(expected)
    return value


def _parse_positive_int(text: str) -> int:
    expected = "expected a whole number >= 1"
    value = _integer(text, expected)
    if value < 1:
        raise _Invalid(expected)
    return value


def _parse_udp_port(text: str) -> int | None:
    if text == "":
        return None
    expected = "expected a UDP port number 1-65535 (0 or empty = off)"
    value = _integer(text, expected)
    if not 0 <= value <= 65535:
        raise _Invalid(expected)
    return value or None


def _parse_ip_or_empty(text: str) -> str:
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise _Invalid(
                "expected an IP address such as 127.0.0.1 or :: (empty = all interfaces)"
            ) from None
    return text


def _no_space(text: str, what: str) -> str:
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise _Invalid(f"expected a non-empty {what} without spaces or control characters")
    return text


def _parse_key(text: str) -> str:
    return _no_space(text, "Redis key")


def _parse_optional_key(text: str) -> str | None:
    return _no_space(text, "Redis key") if text else None


def _parse_hook(text: str) -> str | None:
    """``package.module:attribute`` (imported when the service is built); empty = none."""
    if not text:
        return None
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", text):
        raise _Invalid(f"expected package.module:attribute, got {text!r}")
    return text


def _parse_model(text: str) -> str | None:
    """A device model the IO catalogue knows, in its spelling; empty = none."""
    if not text:
        return None
    from teltonika_ingest.catalog import catalogue  # loaded only when a model is given

    model = catalogue().resolve(text)
    if model is None:
        raise _Invalid(
            "expected a device model the IO catalogue knows, such as FMB920 or TAT100 "
            "(teltonika-ingest io lists them)"
        )
    return model


def _parse_instance_id(text: str) -> str:
    if text == "":
        return socket.gethostname()
    return _no_space(text, "instance id")


def _parse_bool(text: str) -> bool:
    word = text.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _Invalid("expected true/false, yes/no, on/off or 1/0")


def _choice(
    choices: Sequence[str], aliases: Mapping[str, str] | None = None
) -> Callable[[str], str]:
    def parse(text: str) -> str:
        word = text.lower()
        word = (aliases or {}).get(word, word)
        if word not in choices:
            raise _Invalid("expected one of " + ", ".join(choices))
        return word

    return parse


def _parse_endpoint(text: str) -> str:
    try:
        check_server_endpoint(text)
    except ValueError as e:
        raise _Invalid(str(e)) from None
    return text


def _parse_redis_url(text: str) -> RedisTarget | None:
    if text == "":
        return None
    try:
        return RedisTarget.parse(text)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _parse_optional_endpoint(text: str) -> str | None:
    return _parse_endpoint(text) if text else None


_DATABASE_SCHEMES: Final = ("postgresql", "postgres")


def _parse_database_url(text: str) -> str | None:
    """A libpq connection URI (checked for shape; libpq parses it when connecting)."""
    if text == "":
        return None
    expected = (
        "expected postgresql://user[:password]@host[:port]/db or postgresql:///db?host=/socket/dir"
    )
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _Invalid(expected) from None
    if parts.scheme.lower() not in _DATABASE_SCHEMES or parts.fragment:
        raise _Invalid(expected)
    if not parts.hostname and "host=" not in parts.query:
        raise _Invalid(expected + " (the host is missing)")
    return text


def describe_database_url(url: str | None) -> str:
    """A database URL for logs: the password replaced by ``***``."""
    if url is None:
        return "(embedded)"
    shown = re.sub(r"(?<=://)([^:@/]*):[^@/]*@", r"\1:***@", url)
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", shown)


def _resolve_path(text: str, cwd: str | None) -> str:
    path = os.path.expanduser(text)
    if cwd is not None:
        path = os.path.normpath(os.path.join(cwd, path))
    return path


# Parsers of the path kinds take the working directory (None: leave relative paths alone).
_PARSERS: Final[dict[str, Callable[[str], Any]]] = {
    "endpoint": _parse_endpoint,
    "optional-endpoint": _parse_optional_endpoint,
    "database-url": _parse_database_url,
    "udp-port": _parse_udp_port,
    "ip-or-empty": _parse_ip_or_empty,
    "redis-url": _parse_redis_url,
    "key": _parse_key,
    "optional-key": _parse_optional_key,
    "count": _parse_count,
    "positive-int": _parse_positive_int,
    "bytes": _parse_bytes,
    "seconds": _parse_seconds,
    "seconds-or-zero": _parse_seconds_or_zero,
    "instance-id": _parse_instance_id,
    "model": _parse_model,
    "hook": _parse_hook,
    "log-format": _choice(LOG_FORMATS),
    "log-level": _choice(LOG_LEVELS, {"warning": "warn"}),
    "bool": _parse_bool,
    "worker-sockets": _choice(WORKER_SOCKETS),
}
_PATH_KINDS: Final = frozenset({"path", "optional-file", "config"})


def _parse_path(spec: OptionSpec, text: str, cwd: str | None) -> str | None:
    if text == "":
        if spec.kind == "path":
            raise _Invalid("expected a directory path")
        return None
    path = _resolve_path(text, cwd)
    if spec.kind == "optional-file" and cwd is not None and not os.path.isfile(path):
        raise _Invalid(f"no such file: {path}")
    return path


def _builtin(spec: OptionSpec) -> Any:
    """The built-in default of option ``spec`` as a Config value (paths left relative)."""
    if spec.kind in _PATH_KINDS:
        return _parse_path(spec, spec.default, None)
    return _PARSERS[spec.kind](spec.default)


# --------------------------------------------------------------------------- endpoints

# Parameters of Twisted's server endpoint parsers, in positional order; the first is required.
_ENDPOINT_PARAMS: Final[dict[str, tuple[str, ...]]] = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": (
        "port",
        "privateKey",
        "certKey",
        "sslmethod",
        "interface",
        "backlog",
        "extraCertChain",
        "dhParameters",
    ),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "systemd": ("domain", "index", "name"),
}


def _split_endpoint(description: str) -> Iterator[tuple[str | None, str]]:
    """Yield (keyword or None, value) for each ':'-separated part, honouring backslash escapes
    the way ``twisted.internet.endpoints`` does."""
    key: str | None = None
    current = ""
    chars = iter(description)
    for c in chars:
        if c == "\\":
            current += next(chars, "")
        elif c == ":":
            yield key, current
            key, current = None, ""
        elif c == "=" and key is None:
            key, current = current, ""
        else:
            current += c
    yield key, current


def _endpoint_values(kind: str, rest: str, sep: str) -> dict[str, str]:
    """The parameters of a (non-haproxy) endpoint string, by name; raises ValueError."""
    params = _ENDPOINT_PARAMS[kind]
    values: dict[str, str] = {}
    positional = 0
    for key, value in _split_endpoint(rest) if sep else ():
        if key is None:
            if positional >= len(params):
                raise ValueError(f"too many ':'-separated arguments for {kind}:")
            name = params[positional]
            positional += 1
        elif key not in params:
            raise ValueError(
                f"unknown {kind}: parameter {key!r} (known: " + ", ".join(params) + ")"
            )
        else:
            name = key
        if name in values:
            raise ValueError(f"{kind}: parameter {name!r} given twice")
        values[name] = value
    return values


def with_backlog(description: str, backlog: int) -> str:
    """``description`` with ``:backlog=N`` added, when its endpoint type takes a listen
    backlog (tcp, tcp6, ssl, unix, and haproxy around one of them) and does not already name
    one (positionally or as ``backlog=``: the endpoint string wins). ``systemd:`` sockets are
    listening already: unchanged. Expects a string that passed :func:`check_server_endpoint`."""
    kind, sep, rest = description.partition(":")
    if kind == "haproxy":
        return "haproxy:" + with_backlog(rest, backlog)
    if kind not in _ENDPOINT_PARAMS or "backlog" not in _ENDPOINT_PARAMS[kind]:
        return description
    if "backlog" in _endpoint_values(kind, rest, sep):
        return description
    return f"{description}:backlog={backlog}"


def server_endpoint_types() -> tuple[str, ...]:
    """The server endpoint types Twisted knows here: its built-in parsers, then every
    installed ``IStreamServerEndpointStringParser`` plugin (``tcp6:``, ``systemd:``,
    ``haproxy:``, ...), as ``serverFromString`` itself finds them."""
    from twisted.internet import endpoints
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    builtin = tuple(getattr(endpoints, "_serverParsers", {"tcp": 0, "ssl": 0, "unix": 0}))
    plugins = sorted({p.prefix for p in getPlugins(IStreamServerEndpointStringParser)})
    return builtin + tuple(p for p in plugins if p not in builtin)


_TYPE_ERRORS: Final = (
    (re.compile(r"unexpected keyword argument '(\w+)'"), "unknown {kind}: parameter {0!r}"),
    (
        re.compile(r"missing \d+ required positional argument: '(\w+)'"),
        "{kind}: the {0} is missing",
    ),
    (re.compile(r"multiple values for argument '(\w+)'"), "{kind}: parameter {0!r} given twice"),
    (
        re.compile(r"positional arguments? but \d+ (?:were|was) given"),
        "too many ':'-separated arguments for {kind}:",
    ),
)


def check_server_endpoint(description: str) -> None:
    """Check a server endpoint string the way Twisted reads it, without listening.

    The string goes through ``serverFromString`` (Twisted's own grammar, built-in parsers
    and endpoint plugins) against a ``MemoryReactor``: building an endpoint opens nothing, so
    any endpoint type installed is accepted and checked by its own parser. What only exists
    when the service starts is left to the start: TLS key files (``ssl:``) and descriptors
    inherited from systemd (``systemd:`` outside socket activation). Raises ``ValueError``
    saying what was expected, in Twisted's terms.
    """
    if description == "":
        raise ValueError("expected a Twisted server endpoint string such as 'tcp:5027'")
    if description.isdigit():
        raise ValueError(
            f"a bare port number is not an endpoint string (write 'tcp:{description}')"
        )
    kind, _sep, rest = description.partition(":")
    types = server_endpoint_types()
    if kind not in types:
        raise ValueError(
            f"unknown endpoint type {kind!r} (expected one of "
            + ", ".join(t + ":" for t in types)
            + ")"
        )
    if kind == "haproxy":
        # haproxy: wraps another server endpoint (haproxy:tcp:5027); say which part is wrong
        try:
            check_server_endpoint(rest)
        except ValueError as e:
            raise ValueError(f"after 'haproxy:': {e}") from None
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        endpoint = serverFromString(MemoryReactor(), description)
    except TypeError as e:
        for pattern, message in _TYPE_ERRORS:
            found = pattern.search(str(e))
            if found:
                raise ValueError(message.format(*found.groups(), kind=kind)) from None
        raise ValueError(f"{kind}: {e}") from None
    except Exception as e:
        if kind == "ssl":
            return  # its key and certificate files are read and checked when it starts
        if kind == "systemd" and isinstance(e, IndexError | KeyError):
            return  # no such socket passed in this environment: checked when it starts
        number = re.search(r"invalid literal for int\(\) with base (\d+): (.*)$", str(e))
        if number:
            what = "an octal number" if number.group(1) == "8" else "a number"
            raise ValueError(f"{kind}: expected {what}, not {number.group(2)}") from None
        raise ValueError(f"{kind}: {e}") from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ValueError(f"{kind}: port must be a number 0-65535")


# --------------------------------------------------------------------------- Redis target


def _password_repr(password: str | None) -> str:
    return "None" if password is None else "'***'"


@attrs.frozen
class RedisTarget:
    """Where the external Redis is: TCP ``host``/``port`` or ``unix_path``, plus db/password.

    ``repr()`` and :meth:`describe` never show the password.
    """

    host: str | None = None
    port: int | None = None
    unix_path: str | None = None
    db: int = 0
    password: str | None = attrs.field(default=None, repr=_password_repr)

    @property
    def is_unix(self) -> bool:
        return self.unix_path is not None

    def describe(self) -> str:
        """A URL for logs, with the password replaced by ``***``."""
        if self.unix_path is not None:
            query = f"?db={self.db}"
            if self.password is not None:
                query += "&password=***"
            return f"unix://{self.unix_path}{query}"
        auth = ":***@" if self.password is not None else ""
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/{self.db}"

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        """Parse ``redis://[:password@]host[:port][/db]`` or
        ``unix:///path/to/socket[?db=N][&password=P]``.

        Raises ``ValueError`` saying what was expected; the message never contains the URL.
        """
        usage_hint = (
            "expected redis://[:password@]host[:port][/db] or unix:///path/to/socket[?db=N]"
        )
        try:
            parts = urlsplit(url)
        except ValueError:
            raise ValueError(usage_hint) from None
        scheme = parts.scheme.lower()
        if scheme == "rediss":
            raise ValueError(
                "rediss:// (TLS) is not supported; use redis:// on a private network, "
                "or a local TLS tunnel (stunnel, spiped) reached by redis:// or unix://"
            )
        if parts.fragment:
            raise ValueError(usage_hint + " (no '#' part)")
        if scheme == "redis":
            return cls._parse_tcp(parts, usage_hint)
        if scheme == "unix":
            return cls._parse_unix(parts)
        raise ValueError(usage_hint)

    @classmethod
    def _parse_tcp(cls, parts: Any, usage_hint: str) -> RedisTarget:
        if parts.query:
            raise ValueError(
                "unexpected '?' part in a redis:// URL; the database goes in the path, "
                "redis://host:6379/1"
            )
        if parts.username:
            raise ValueError(
                "a user name in the URL is not supported, only a password: "
                "redis://:password@host:6379/0"
            )
        host = parts.hostname
        if not host:
            raise ValueError("the host is missing, e.g. redis://cache:6379/0")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the port must be a number 1-65535") from None
        if port == 0:
            raise ValueError("the port must be a number 1-65535")
        db = cls._db(parts.path[1:] if parts.path.startswith("/") else parts.path)
        password = unquote(parts.password) if parts.password else None
        return cls(host=host, port=port or REDIS_DEFAULT_PORT, db=db, password=password)

    @classmethod
    def _parse_unix(cls, parts: Any) -> RedisTarget:
        path = unquote(parts.path)
        if parts.netloc or not path.startswith("/") or path == "/":
            raise ValueError(
                "expected an absolute socket path after unix:// (three slashes), "
                "e.g. unix:///run/redis/redis.sock"
            )
        db, password = 0, None
        seen: set[str] = set()
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in seen:
                raise ValueError(f"{key!r} given twice in the query")
            seen.add(key)
            if key == "db":
                db = cls._db(value)
            elif key == "password":
                password = value or None
            else:
                raise ValueError(
                    f"unknown query parameter {key!r} in a unix:// URL (known: db, password)"
                )
        return cls(unix_path=path, db=db, password=password)

    @staticmethod
    def _db(text: str) -> int:
        if text == "":
            return 0
        if not text.isdigit() or len(text) > 9:
            raise ValueError("the database must be a number >= 0, e.g. redis://host:6379/0")
        return int(text)


# --------------------------------------------------------------------------- Config


# Built-in defaults as Config values, by option name (paths left relative; instance-id is
# filled in per Config, see its field).
_DEFAULTS: Final[dict[str, Any]] = {
    spec.name: _builtin(spec) for spec in OPTIONS if spec.name != "instance-id"
}


@attrs.frozen
class Config:
    """The resolved configuration of one service process.

    Direct construction (tests) uses the built-in defaults for every field not given; paths are
    then left as given. :meth:`from_args` and :class:`Options` resolve all layers, validate, and
    make paths absolute (relative to the working directory).
    """

    listen: str = _DEFAULTS["listen"]
    udp_port: int | None = _DEFAULTS["udp-port"]
    udp_interface: str = _DEFAULTS["udp-interface"]
    metrics: str = _DEFAULTS["metrics"]
    redis: RedisTarget | None = _DEFAULTS["redis-url"]  # None: start the embedded Redis
    stream: str = _DEFAULTS["stream"]
    stream_maxlen: int = _DEFAULTS["stream-maxlen"]  # 0: no trimming
    instance_id: str = attrs.field(factory=socket.gethostname)
    # The INI file actually read (None: none); not part of equality.
    config_file: str | None = attrs.field(default=None, eq=False)
    data_dir: str = _DEFAULTS["data-dir"]
    handshake_timeout: float = _DEFAULTS["handshake-timeout"]
    idle_timeout: float = _DEFAULTS["idle-timeout"]
    max_frame_size: int = _DEFAULTS["max-frame-size"]
    max_buffer: int = _DEFAULTS["max-buffer"]
    max_buffered_bytes: int = _DEFAULTS["max-buffered-bytes"]  # 0: no global bound
    max_connections: int = _DEFAULTS["max-connections"]  # 0: unlimited
    max_connections_per_address: int = _DEFAULTS["max-connections-per-address"]  # 0: unlimited
    frame_timeout: float = _DEFAULTS["frame-timeout"]  # 0: no deadline
    listen_backlog: int = _DEFAULTS["listen-backlog"]
    publish_timeout: float = _DEFAULTS["publish-timeout"]
    max_inflight: int = _DEFAULTS["max-inflight"]
    udp_dedup_window: float = _DEFAULTS["udp-dedup-window"]  # 0: no deduplication
    device_message_budget: int = _DEFAULTS["device-message-budget"]  # 0: unlimited
    dead_letter_budget: int = _DEFAULTS["dead-letter-budget"]  # 0: unlimited
    dlq_max_bytes: int = _DEFAULTS["dlq-max-bytes"]  # 0: entries only
    results_max_bytes: int = _DEFAULTS["results-max-bytes"]  # 0: entries only
    command_timeout: float = _DEFAULTS["command-timeout"]
    max_command_length: int = _DEFAULTS["max-command-length"]
    command_queue_ttl: float = _DEFAULTS["command-queue-ttl"]
    command_queue_attempts: int = _DEFAULTS["command-queue-attempts"]
    command_queue_max_per_device: int = _DEFAULTS["command-queue-max-per-device"]
    command_queue_max_total: int = _DEFAULTS["command-queue-max-total"]
    command_queue_sweep_interval: float = _DEFAULTS["command-queue-sweep-interval"]
    janitor_interval: float = _DEFAULTS["janitor-interval"]
    drain_timeout: float = _DEFAULTS["drain-timeout"]
    shutdown_timeout: float = _DEFAULTS["shutdown-timeout"]
    log_format: str = _DEFAULTS["log-format"]  # "text" | "json"
    log_level: str = _DEFAULTS["log-level"]  # "debug" | "info" | "warn" | "error" | "critical"
    allow_list: str | None = _DEFAULTS["allow-list"]
    allow_list_key: str | None = _DEFAULTS["allow-list-key"]
    luhn: bool = _DEFAULTS["luhn"]
    workers: int = _DEFAULTS["workers"]
    worker_sockets: str = _DEFAULTS["worker-sockets"]  # "reuseport" | "shared"
    time_valid_window: float = _DEFAULTS["time-valid-window"]
    io_names: bool = _DEFAULTS["io-names"]
    default_model: str | None = _DEFAULTS["default-model"]
    model_key: str | None = _DEFAULTS["model-key"]
    # Fixed by the contract (SET instance:heartbeat:{id} EX 90 every 30 s); not options.
    heartbeat_interval: float = 30.0
    heartbeat_ttl: int = 90
    # option name -> where its value came from ("default", "command line",
    # "environment NAME", "config file PATH"); not part of equality.
    sources: Mapping[str, str] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def dlq_stream(self) -> str:
        """The dead-letter stream key (contract.md section 2: stream key + ':dlq')."""
        return self.stream + ":dlq"

    @property
    def embedded_redis(self) -> bool:
        return self.redis is None

    def describe(self) -> list[str]:
        """One ``name = value (source)`` line per option, password hidden, for the start-up log."""
        lines = []
        for spec in OPTIONS:
            value = getattr(self, spec.attr)
            if isinstance(value, RedisTarget):
                shown = value.describe()
            elif value is None:
                shown = "(none)" if spec.name != "redis-url" else "(embedded)"
            else:
                shown = str(value).lower() if isinstance(value, bool) else str(value)
            lines.append(f"{spec.name} = {shown} ({self.sources.get(spec.name, 'default')})")
        return lines

    @classmethod
    def from_args(
        cls,
        argv: Sequence[str],
        environ: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Config:
        """Parse plugin arguments (as after ``twistd teltonika-ingest``) with all layers.

        ``environ`` defaults to ``os.environ`` and ``cwd`` to the working directory.
        Raises ``usage.UsageError`` (one-line message) for invalid input.
        """
        options = Options(environ=environ, cwd=cwd)
        options.parseOptions(list(argv))
        return options.config


_PROCESSOR_DEFAULTS: Final[dict[str, Any]] = {
    spec.name: _builtin(spec) for spec in PROCESSOR_OPTIONS if spec.kind != "instance-id"
}


@attrs.frozen
class ProcessorConfig:
    """The resolved configuration of one processor process (contract.md section 9).

    Built like :class:`Config`: direct construction uses the built-in defaults,
    :meth:`from_args` / :class:`ProcessorOptions` resolve every layer.
    """

    redis: RedisTarget | None = _PROCESSOR_DEFAULTS["redis-url"]  # None: embedded Redis
    database_url: str | None = _PROCESSOR_DEFAULTS["database-url"]  # None: embedded PostgreSQL
    stream: str = _PROCESSOR_DEFAULTS["stream"]
    group: str = _PROCESSOR_DEFAULTS["group"]
    consumer: str = attrs.field(factory=socket.gethostname)
    metrics: str = _PROCESSOR_DEFAULTS["metrics"]
    live: str | None = _PROCESSOR_DEFAULTS["live"]  # None: no live feed
    live_tokens: str | None = _PROCESSOR_DEFAULTS["live-tokens"]
    live_auth_hook: str | None = _PROCESSOR_DEFAULTS["live-auth-hook"]
    batch_size: int = _PROCESSOR_DEFAULTS["batch-size"]
    block_time: float = _PROCESSOR_DEFAULTS["block-time"]
    claim_idle: float = _PROCESSOR_DEFAULTS["claim-idle"]
    claim_interval: float = _PROCESSOR_DEFAULTS["claim-interval"]
    dlq_attempts: int = _PROCESSOR_DEFAULTS["dlq-attempts"]
    device_state_size: int = _PROCESSOR_DEFAULTS["device-state-size"]
    write_retry_max: float = _PROCESSOR_DEFAULTS["write-retry-max"]
    instance_id: str = attrs.field(factory=socket.gethostname)
    config_file: str | None = attrs.field(default=None, eq=False)
    data_dir: str = _PROCESSOR_DEFAULTS["data-dir"]
    drain_timeout: float = _PROCESSOR_DEFAULTS["drain-timeout"]
    shutdown_timeout: float = _PROCESSOR_DEFAULTS["shutdown-timeout"]
    log_format: str = _PROCESSOR_DEFAULTS["log-format"]
    log_level: str = _PROCESSOR_DEFAULTS["log-level"]
    sources: Mapping[str, str] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def dlq_stream(self) -> str:
        """The processor's dead-letter stream (contract.md section 9)."""
        return self.stream + ":processor:dlq"

    def describe(self) -> list[str]:
        """One ``name = value (source)`` line per option, passwords hidden."""
        lines = []
        for spec in PROCESSOR_OPTIONS:
            value = getattr(self, spec.attr)
            if isinstance(value, RedisTarget):
                shown = value.describe()
            elif spec.kind == "database-url":
                shown = describe_database_url(value)
            elif value is None:
                shown = "(embedded)" if spec.name == "redis-url" else "(none)"
            else:
                shown = str(value)
            lines.append(f"{spec.name} = {shown} ({self.sources.get(spec.name, 'default')})")
        return lines

    @classmethod
    def from_args(
        cls,
        argv: Sequence[str],
        environ: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> ProcessorConfig:
        """Parse plugin arguments (as after ``twistd teltonika-processor``) with all layers."""
        options = ProcessorOptions(environ=environ, cwd=cwd)
        options.parseOptions(list(argv))
        config: ProcessorConfig = options.config
        return config


# --------------------------------------------------------------------------- resolution


@attrs.frozen
class _Raw:
    text: str
    source: str


def _error(spec: OptionSpec, problem: str, raw: _Raw) -> usage.UsageError:
    shown = raw.text
    if spec.kind == "database-url":
        shown = describe_database_url(shown)
    if spec.kind == "redis-url":
        shown = re.sub(r"(?<=://)[^@/]*@", "***@", shown)
        shown = re.sub(r"(?i)(password=)[^&]*", r"\1***", shown)
    return usage.UsageError(f"{spec.flag}: {problem}, got {shown!r} (from {raw.source})")


def _read_ini(path: str, shown: str, table: OptionTable | None = None) -> dict[str, _Raw]:
    """Read the table's section (``[teltonika-ingest]``) of ``path``; any problem is a
    UsageError."""
    table = table or INGEST_TABLE
    CONFIG_SECTION = table.section  # the messages below name the table's section
    parser = configparser.ConfigParser(
        interpolation=None,
        default_section="\x00no default section",
        inline_comment_prefixes=("#",),
        empty_lines_in_values=False,
        strict=True,
    )
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except OSError as e:
        raise usage.UsageError(
            f"--config: cannot read {path}: {e.strerror} (from {shown})"
        ) from None
    except UnicodeDecodeError:
        raise usage.UsageError(f"{path}: not UTF-8 text") from None
    except configparser.MissingSectionHeaderError as e:
        raise usage.UsageError(
            f"{path}: line {e.lineno}: setting before the [{CONFIG_SECTION}] section header: "
            f"{e.line.strip()!r}"
        ) from None
    except configparser.DuplicateSectionError as e:
        raise usage.UsageError(f"{path}: line {e.lineno}: section [{e.section}] repeated") from None
    except configparser.DuplicateOptionError as e:
        raise usage.UsageError(f"{path}: line {e.lineno}: key {e.option!r} repeated") from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        with contextlib.suppress(ValueError, SyntaxError):
            line = ast.literal_eval(line)  # Python < 3.13 stores repr(line)
        raise usage.UsageError(
            f"{path}: line {lineno}: expected 'key = value', got {str(line).strip()!r}"
        ) from None
    except configparser.Error as e:  # pragma: no cover - any other parser complaint
        raise usage.UsageError(f"{path}: {' '.join(str(e).split())}") from None
    for section in parser.sections():
        if section != CONFIG_SECTION:
            raise usage.UsageError(
                f"{path}: unknown section [{section}] (the only section is [{CONFIG_SECTION}])"
            )
    if not parser.has_section(CONFIG_SECTION):
        return {}
    source = f"config file {path}"
    values: dict[str, _Raw] = {}
    file_keys = [spec.key for spec in table.options if spec.in_file]
    for key, value in parser.items(CONFIG_SECTION):
        spec = table.by_name.get(key)
        if spec is None:
            close = difflib.get_close_matches(key.replace("_", "-"), file_keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise usage.UsageError(f"{path}: unknown key {key!r} in [{CONFIG_SECTION}]{hint}")
        if not spec.in_file:
            raise usage.UsageError(
                f"{path}: key {key!r} cannot be set in a config file; use {spec.flag} or {spec.env}"
            )
        values[key] = _Raw(value, source)
    return values


def _config_file(
    cli: Mapping[str, str | None], environ: Mapping[str, str], cwd: str, table: OptionTable
) -> tuple[str | None, str]:
    """The INI file to read (or None) and where that choice came from."""
    spec = table.by_name["config"]
    given = cli.get(spec.name)
    if given is not None:
        raw = _Raw(given.strip(), "command line")
    elif spec.env in environ:
        raw = _Raw(environ[spec.env].strip(), f"environment {spec.env}")
    else:
        path = _resolve_path(spec.default, cwd)
        return (path, "default") if os.path.exists(path) else (None, "default")
    if raw.text == "":
        return None, raw.source
    path = _resolve_path(raw.text, cwd)
    if not os.path.exists(path):
        raise _error(spec, f"no such file: {path}", raw)
    return path, raw.source


def resolve(
    cli: Mapping[str, str | None],
    environ: Mapping[str, str],
    cwd: str,
    table: OptionTable | None = None,
) -> Any:
    """Build the table's config (:class:`Config` for the ingest's, the default) from command
    line values (None = not given), an environment and a working directory. Raises
    ``usage.UsageError`` with a one-line message."""
    table = table or INGEST_TABLE
    config_file, config_source = _config_file(cli, environ, cwd, table)
    ini = _read_ini(config_file, config_source, table) if config_file else {}

    values: dict[str, Any] = {}
    raws: dict[str, _Raw] = {}
    sources: dict[str, str] = {}
    for spec in table.options:
        if spec.name == "config":
            values[spec.attr] = config_file
            sources[spec.name] = config_source
            continue
        given = cli.get(spec.name)
        if given is not None:
            raw = _Raw(given, "command line")
        elif spec.env in environ:
            raw = _Raw(environ[spec.env], f"environment {spec.env}")
        elif spec.key in ini:
            raw = ini[spec.key]
        else:
            raw = _Raw(spec.default, "default")
        text = raw.text.strip()
        if "\n" in text or "\r" in text:
            raise _error(spec, "expected a single line", raw)
        try:
            if spec.kind in _PATH_KINDS:
                values[spec.attr] = _parse_path(spec, text, cwd)
            else:
                values[spec.attr] = _PARSERS[spec.kind](text)
        except _Invalid as e:
            raise _error(spec, str(e), raw) from None
        raws[spec.name] = raw
        sources[spec.name] = raw.source
    table.check(table, values, raws)
    return table.build(**values, sources=sources)


def _check_shutdown(
    table: OptionTable, values: Mapping[str, Any], raws: Mapping[str, _Raw]
) -> None:
    if values["shutdown_timeout"] <= values["drain_timeout"]:
        drain = raws["drain-timeout"]
        raise _error(
            table.by_name["shutdown-timeout"],
            f"must be greater than --drain-timeout ({drain.text.strip()}, from {drain.source})",
            raws["shutdown-timeout"],
        )


def _check_ingest(table: OptionTable, values: Mapping[str, Any], raws: Mapping[str, _Raw]) -> None:
    _check_shutdown(table, values, raws)
    if values["workers"] > 1 and not values["listen"].startswith("tcp:"):
        listen = raws["listen"]
        raise _error(
            table.by_name["workers"],
            f"more than one worker needs a plain tcp: --listen endpoint, not "
            f"{listen.text.strip()!r} (from {listen.source})",
            raws["workers"],
        )
    needed = values["max_frame_size"] + FRAME_OVERHEAD
    if values["max_buffer"] < needed:
        frame = raws["max-frame-size"]
        raise _error(
            OPTIONS_BY_NAME["max-buffer"],
            f"must hold a whole frame, at least --max-frame-size + {FRAME_OVERHEAD} = {needed} "
            f"bytes (--max-frame-size from {frame.source})",
            raws["max-buffer"],
        )


@attrs.frozen
class OptionTable:
    """One service's options: its table, INI section and config class (the machinery above
    and :class:`Options` work on any table)."""

    service: str
    options: tuple[OptionSpec, ...]
    section: str
    build: Callable[..., Any]
    check: Callable[[OptionTable, Mapping[str, Any], Mapping[str, _Raw]], None]

    @property
    def by_name(self) -> Mapping[str, OptionSpec]:
        return {spec.name: spec for spec in self.options}


INGEST_TABLE: Final = OptionTable(
    "teltonika-ingest", OPTIONS, CONFIG_SECTION, Config, _check_ingest
)
PROCESSOR_TABLE: Final = OptionTable(
    "teltonika-processor",
    PROCESSOR_OPTIONS,
    PROCESSOR_SECTION,
    ProcessorConfig,
    _check_shutdown,
)


# --------------------------------------------------------------------------- usage.Options


def _usage_doc(spec: OptionSpec) -> str:
    default = spec.default or "empty"
    return f"{spec.help}. [env {spec.env}; default {default}]"


def _opt_parameters(options: Sequence[OptionSpec]) -> list[list[Any]]:
    return [[spec.name, None, None, _usage_doc(spec)] for spec in options if spec.kind != "bool"]


def _opt_flags(options: Sequence[OptionSpec]) -> list[list[Any]]:
    return [
        flag
        for spec in options
        if spec.kind == "bool"
        for flag in (
            [spec.name, None, _usage_doc(spec)],
            ["no-" + spec.name, None, f"Turn {spec.flag} off (overrides environment and file)."],
        )
    ]


class _TableOptions(usage.Options):
    """``usage.Options`` for one :class:`OptionTable`; after parsing, :attr:`config` holds the
    result. (No optParameters here: ``usage.Options`` accumulates them over base classes.)

    ``environ`` and ``cwd`` default to the process environment and working directory (twistd
    instantiates this class without arguments); tests pass their own.
    """

    table: OptionTable
    synopsis = "[options]"

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self._environ = environ
        self._cwd = None if cwd is None else os.fspath(cwd)
        for spec in self.table.options:
            if spec.kind == "bool":
                # usage.Options defaults flags to 0; None tells "not given" apart.
                self[spec.name] = None
                self["no-" + spec.name] = None

    def postOptions(self) -> None:
        cli: dict[str, str | None] = {}
        for spec in self.table.options:
            if spec.kind == "bool":
                on, off = self[spec.name], self["no-" + spec.name]
                if on and off:
                    raise usage.UsageError(
                        f"{spec.flag} and --no-{spec.name}: both given on the command line"
                    )
                cli[spec.name] = "true" if on else "false" if off else None
            else:
                cli[spec.name] = self[spec.name]
        environ = os.environ if self._environ is None else self._environ
        cwd = os.getcwd() if self._cwd is None else self._cwd
        self.config = resolve(cli, environ, cwd, self.table)


class Options(_TableOptions):
    """``twistd teltonika-ingest`` options; after parsing, :attr:`config` holds the result."""

    table = INGEST_TABLE
    longdesc = (
        "Every option can also be set by an environment variable and in the INI file "
        "(--config, default ./tap.conf if present, section [teltonika-ingest], keys are the "
        "option names). Precedence: command line > environment > config file > default. "
        "See OPERATIONS.md, 'Configuration reference'."
    )
    optParameters = _opt_parameters(OPTIONS)
    optFlags = _opt_flags(OPTIONS)

    config: Config


class ProcessorOptions(_TableOptions):
    """``twistd teltonika-processor`` options; after parsing, :attr:`config` holds the
    result."""

    table = PROCESSOR_TABLE
    longdesc = (
        "Every option can also be set by an environment variable and in the INI file "
        f"(--config, default ./{PROCESSOR_CONFIG_FILE} if present, section "
        f"[{PROCESSOR_SECTION}], keys are the option names). Precedence: command line > "
        "environment > config file > default. See OPERATIONS.md, 'The processor'."
    )
    optParameters = _opt_parameters(PROCESSOR_OPTIONS)
    optFlags = _opt_flags(PROCESSOR_OPTIONS)

    config: ProcessorConfig


# --------------------------------------------------------------------------- generated docs

_FILE_HEADER: Final = """\
# {service} configuration file (INI).
#
# Read from the file named by --config or {config_env}; without either, from ./{file}
# when it exists (an explicitly named file must exist; an empty name reads no file).
# Precedence: command line > environment > this file > built-in default.
# Every setting is shown below commented out, at its built-in default: uncomment to change it.
# Keys are the long option names; unknown keys are an error. Booleans: true/false, yes/no,
# on/off, 1/0. Relative paths are relative to the working directory, not to this file.
# Generated from teltonika_ingest/config.py: python -m teltonika_ingest.config {what}

[{section}]
"""


def render_tap_conf(table: OptionTable | None = None) -> str:
    """The shipped ``tap.conf`` (or ``processor.conf`` for the processor's table): every file
    option commented out at its default."""
    table = table or INGEST_TABLE
    config = table.by_name["config"]
    parts = [
        _FILE_HEADER.format(
            service=table.service,
            config_env=config.env,
            file=os.path.basename(config.default),
            what=os.path.basename(config.default),
            section=table.section,
        )
    ]
    for spec in table.options:
        if not spec.in_file:
            continue
        setting = f"# {spec.key} = {spec.default}".rstrip()
        parts.append(f"\n# {spec.help} (env {spec.env})\n{setting}\n")
    return "".join(parts)


def _md_default(spec: OptionSpec) -> str:
    return f"`{spec.default}`" if spec.default else "*(empty)*"


def render_reference(table: OptionTable | None = None) -> str:
    """The option table and the "why this default" list of OPERATIONS.md."""
    table = table or INGEST_TABLE
    file = os.path.basename(table.by_name["config"].default)
    rows = [
        f"| option | env | {file} key | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in table.options:
        key = f"`{spec.key}`" if spec.in_file else "—"
        flag = f"`{spec.flag}`"
        if spec.kind == "bool":
            flag += f" / `--no-{spec.name}`"
        rows.append(f"| {flag} | `{spec.env}` | {key} | {_md_default(spec)} | {spec.help} |")
    rows.append("")
    rows.append("Why these defaults:")
    rows.append("")
    for spec in table.options:
        if spec.why:
            rows.append(f"* `{spec.flag}` = {_md_default(spec)}: {spec.why}")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str]) -> int:
    what = argv[0] if argv else ""
    if what == "tap.conf":
        sys.stdout.write(render_tap_conf())
    elif what == "reference":
        sys.stdout.write(render_reference())
    elif what == PROCESSOR_CONFIG_FILE:
        sys.stdout.write(render_tap_conf(PROCESSOR_TABLE))
    elif what == "processor-reference":
        sys.stdout.write(render_reference(PROCESSOR_TABLE))
    else:
        sys.stderr.write(
            "usage: python -m teltonika_ingest.config "
            f"tap.conf|reference|{PROCESSOR_CONFIG_FILE}|processor-reference\n"
        )
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
