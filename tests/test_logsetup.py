"""Log format (text / JSON lines), level filter, unhandled-error counting, twistd hook."""

from __future__ import annotations

import gc
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Application
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from teltonika_ingest import logsetup
from teltonika_ingest.server.metrics import Metrics

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


# --------------------------------------------------------------------------- JSON lines


def test_json_lines_parse_with_structured_fields() -> None:
    out = io.StringIO()
    log = Logger(
        namespace="teltonika_ingest.server.protocol", observer=logsetup.json_lines_observer(out)
    )
    log.info(
        "ACKed {records} records ({codec}) for {imei} from {peer}",
        records=3,
        codec="8E",
        imei="356307042441013",
        peer="203.0.113.7:56324",
    )
    log.warn("odd values {x}", x=object(), nan=float("nan"), big=2**80, nested={"a": (1, 2)})
    log.info("a field called {message}", message="collides")
    log.warn(
        "heartbeat failed: {error}",
        error="connecting",
        address=IPv4Address("TCP", "10.0.0.5", 6379),
    )
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("session of {imei} crashed", imei="352093081452251")

    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # one object per line, nothing else
    ack, odd, collide, plain, crash = (json.loads(line) for line in lines)
    assert ack["level"] == "info"
    assert ack["namespace"] == "teltonika_ingest.server.protocol"
    assert ack["message"] == "ACKed 3 records (8E) for 356307042441013 from 203.0.113.7:56324"
    assert (ack["records"], ack["codec"], ack["imei"], ack["peer"]) == (
        3,
        "8E",
        "356307042441013",
        "203.0.113.7:56324",
    )
    assert ack["time"].endswith("Z") and len(ack["time"]) == 24
    assert not [key for key in ack if key.startswith("log_")]
    assert odd["level"] == "warn"
    assert odd["x"].startswith("<object object")
    assert odd["nan"] == "nan" and odd["big"] == 2**80 and odd["nested"] == {"a": [1, 2]}
    assert collide["message"] == "a field called collides"
    assert collide["field_message"] == "collides"
    # a field named error (no failure) keeps its name; addresses are host:port
    assert plain["error"] == "connecting" and "error_" not in plain
    assert plain["address"] == "10.0.0.5:6379"
    assert crash["level"] == "critical"
    assert crash["error"] == "ZeroDivisionError: division by zero"
    assert "Traceback" in crash["traceback"] and "1 / 0" in crash["traceback"]
    assert crash["imei"] == "352093081452251"


def test_json_lines_of_legacy_events() -> None:
    out = io.StringIO()
    publisher = LogPublisher(logsetup.json_lines_observer(out))
    legacy = legacy_log.LogPublisher(publisher, publisher)
    legacy.msg("txredisapi says", "hello")
    try:
        raise ValueError("boom")
    except ValueError:
        legacy.msg(failure=Failure(), isError=1, why="legacy err")
    info, err = json_lines(out.getvalue())
    assert info["message"] == "txredisapi says hello" and info["level"] == "info"
    assert info["namespace"] == "twisted" and err["namespace"] == "twisted"  # not log_legacy
    assert "time" in info and not isinstance(info["time"], float)
    assert err["level"] == "critical" and err["error"] == "ValueError: boom"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_twisted_routine_lines_are_debug(fmt: str) -> None:
    """Port and factory chatter and ClientService's per-retry line are debug: gone at info,
    kept (as debug) at debug; anything else of Twisted's stays at its level."""
    for level, expected in (("info", 0), ("debug", 7)):
        out = io.StringIO()
        publisher = LogPublisher(logsetup.observer_for(fmt, level, out))
        legacy = legacy_log.LogPublisher(publisher, publisher)
        # a plain Factory (what an endpoint's connect wraps) logs new-style, in its own
        # namespace, through the global publisher
        globalLogPublisher.addObserver(publisher)
        try:
            factory = Factory()
            factory.doStart()
            factory.doStop()
        finally:
            globalLogPublisher.removeObserver(publisher)
        legacy.msg("TeltonikaFactory starting on 5027")
        legacy.msg("(TCP Port 5027 Closed)")
        legacy.msg("Starting factory <txredisapi.RedisFactory object at 0x7f>")
        legacy.msg("Stopping factory <txredisapi.RedisFactory object at 0x7f>")
        Logger(
            namespace="twisted.application._client_service.ClientService", observer=publisher
        ).info("Scheduling retry {attempt} to connect {endpoint}", attempt=1, endpoint="x")
        legacy.msg("something else entirely")
        text = out.getvalue()
        assert "something else entirely" in text
        lines = text.splitlines()
        assert len(lines) == expected + 1, text
        if fmt == "json" and expected:
            assert [e["level"] for e in json_lines(text)] == ["debug"] * 7 + ["info"]


# --------------------------------------------------------------------------- level filter


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_level_filter_drops_debug_at_info(fmt: str) -> None:
    out = io.StringIO()
    log = Logger(namespace="t", observer=logsetup.observer_for(fmt, "info", out))
    log.debug("debug-event")
    log.info("info-event")
    log.warn("warn-event")
    text = out.getvalue()
    assert "debug-event" not in text
    assert "info-event" in text and "warn-event" in text
    if fmt == "json":
        assert [e["level"] for e in json_lines(text)] == ["info", "warn"]
    else:
        assert "[t#info] info-event" in text


@pytest.mark.parametrize(
    ("level", "kept"),
    [
        ("debug", ["debug", "info", "warn", "error", "critical"]),
        ("info", ["info", "warn", "error", "critical"]),
        ("warn", ["warn", "error", "critical"]),
        ("warning", ["warn", "error", "critical"]),
        ("error", ["error", "critical"]),
        ("critical", ["critical"]),
    ],
)
def test_every_level(level: str, kept: list[str]) -> None:
    out = io.StringIO()
    log = Logger(namespace="t", observer=logsetup.observer_for("json", level, out))
    for name in ("debug", "info", "warn", "error", "critical"):
        getattr(log, name)(name)
    assert [e["level"] for e in json_lines(out.getvalue())] == kept


def test_bad_format_and_level_are_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        logsetup.observer_for("xml", "info", io.StringIO())
    with pytest.raises(ValueError, match="log level"):
        logsetup.level_predicate("verbose")


# --------------------------------------------------------------------------- unhandled errors


def unhandled(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("teltonika_unhandled_errors_total") or 0.0


def test_unhandled_deferred_failure_is_counted() -> None:
    metrics = Metrics()
    counter = metrics.unhandled_errors
    publisher = LogPublisher()
    stop = logsetup.count_unhandled_errors(counter, publisher)
    log = Logger(namespace="t", observer=publisher)
    try:
        log.critical("critical but no failure: not counted")
        try:
            raise KeyError("handled")
        except KeyError:
            log.failure("logged at error: not counted", level=logsetup.LEVELS["error"])
        assert unhandled(metrics) == 0

        try:
            raise RuntimeError("no handler")
        except RuntimeError:
            log.failure("log.failure with no handler")
        assert unhandled(metrics) == 1
    finally:
        stop()
    assert unhandled(metrics) == 1
    log.failure("after stop", failure=Failure(OSError()))
    assert unhandled(metrics) == 1


def test_garbage_collected_deferred_failure_is_counted_once() -> None:
    metrics = Metrics()
    counter = metrics.unhandled_errors
    events: list[dict[str, Any]] = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(events.append)
    stop = logsetup.count_unhandled_errors(counter)  # the global publisher, as in the service
    try:
        d: defer.Deferred[None] = defer.Deferred()
        d.errback(RuntimeError("nobody handles this"))
        del d
        gc.collect()
    finally:
        stop()
        globalLogPublisher.removeObserver(events.append)
    assert unhandled(metrics) == 1
    from_defer = [e for e in events if e.get("log_namespace") == "twisted.internet.defer"]
    assert len(from_defer) == 2  # "Unhandled error in Deferred:" + the failure
    assert all(e["log_level"] is logsetup.LEVELS["critical"] for e in from_defer)


# --------------------------------------------------------------------------- twistd hook


def test_offer_to_application() -> None:
    application = Application("x")
    observer = logsetup.observer_for("json", "info", io.StringIO())
    assert logsetup.offer_to_application(application, observer)
    assert application.getComponent(ILogObserver) is observer
    other = logsetup.observer_for("text", "info", io.StringIO())
    assert not logsetup.offer_to_application(application, other)  # first one wins
    assert not logsetup.offer_to_application(object(), other)


PLUGIN = """
from twisted.application.service import ServiceMaker
logtest = ServiceMaker("logtest", "logtest_tap", "logsetup test plugin", "logtest")
"""

# The same hook as tap.py's IngestService (docs/hardening.md): setServiceParent offers the
# observer built in makeService from our options and twistd's (options.parent).
TAP = """
from twisted.application import service
from twisted.internet import defer, reactor
from twisted.logger import Logger
from twisted.python import usage

from teltonika_ingest import logsetup
from teltonika_ingest.server.metrics import Metrics

log = Logger()


class Options(usage.Options):
    optParameters = [["log-format", None, "text"], ["log-level", None, "info"]]


class Svc(service.Service):
    def __init__(self, observer):
        self.observer = observer
        self.metrics = Metrics()

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        logsetup.offer_to_application(parent, self.observer)

    def startService(self):
        super().startService()
        self.stop_counting = logsetup.count_unhandled_errors(self.metrics.unhandled_errors)
        log.debug("debug event")
        log.info("device {imei} connected from {peer}", imei="356307042441013", peer="p:1")
        d = defer.Deferred()
        d.errback(RuntimeError("unhandled"))
        del d
        reactor.callLater(0, self.ready)

    def ready(self):
        counted = int(
            self.metrics.registry.get_sample_value("teltonika_unhandled_errors_total")
        )
        log.warn("ready, {counted} unhandled", counted=counted)
        open("READY", "w").close()


def makeService(options):
    log.info("makeService ran before logging started")
    observer = logsetup.twistd_observer(
        options["log-format"], options["log-level"], getattr(options, "parent", None)
    )
    return Svc(observer)
"""


def run_twistd(tmp_path: Path, *args: str) -> tuple[int, str]:
    """twistd -n with the test plugin; SIGTERM once it is ready; (returncode, stdout)."""
    (tmp_path / "twisted" / "plugins").mkdir(parents=True, exist_ok=True)
    (tmp_path / "twisted" / "plugins" / "logtest_plugin.py").write_text(PLUGIN)
    (tmp_path / "logtest_tap.py").write_text(textwrap.dedent(TAP))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    with subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            deadline = time.monotonic() + 30
            while not (tmp_path / "READY").exists():
                assert proc.poll() is None, f"twistd exited early: {proc.communicate()[0]}"
                assert time.monotonic() < deadline, "twistd not ready within 30 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, out


@pytest.mark.integration
def test_twistd_logs_json_at_the_chosen_level(tmp_path: Path) -> None:
    code, out = run_twistd(tmp_path, "logtest", "--log-format", "json", "--log-level", "info")
    events = json_lines(out)  # every line of stdout is one JSON object
    messages = [e["message"] for e in events]
    assert "makeService ran before logging started" in messages  # buffered, then replayed
    assert any(m.startswith("twistd ") and "starting up" in m for m in messages)
    assert "debug event" not in messages
    [connected] = [e for e in events if e.get("imei") == "356307042441013"]
    assert connected["peer"] == "p:1" and connected["namespace"] == "logtest_tap"
    crit = [e for e in events if e.get("level") == "critical"]
    assert any("RuntimeError: unhandled" in e.get("error", "") for e in crit)
    [ready] = [e for e in events if e["message"].startswith("ready")]
    assert ready["counted"] == 1
    assert "Received SIGTERM, shutting down." in messages
    # twistd re-raises SIGTERM after a clean shutdown: killed by the signal (shell: 143)
    assert code == -signal.SIGTERM


@pytest.mark.integration
def test_twistd_text_with_level_warn(tmp_path: Path) -> None:
    code, out = run_twistd(tmp_path, "logtest", "--log-format", "text", "--log-level", "warn")
    assert "[logtest_tap#warn] ready, 1 unhandled" in out
    assert "device 356307042441013" not in out  # info dropped
    assert "starting up" not in out  # twistd's own info lines too
    assert "Unhandled error in Deferred" in out
    assert code == -signal.SIGTERM


@pytest.mark.integration
def test_twistd_logfile_option_still_honoured(tmp_path: Path) -> None:
    logfile = tmp_path / "service.log"
    code, out = run_twistd(
        tmp_path, f"--logfile={logfile}", "logtest", "--log-format", "json", "--log-level", "warn"
    )
    assert out == ""  # nothing on stdout
    events = json_lines(logfile.read_text())
    assert any(e["message"].startswith("ready") for e in events)
    assert {e["level"] for e in events} <= {"warn", "error", "critical"}
    assert code == -signal.SIGTERM
