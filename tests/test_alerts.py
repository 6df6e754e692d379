"""deploy/alerts.yml: valid rules (``promtool check rules``), each with severity, summary,
description and a runbook link that exists in OPERATIONS.md; every alert fires on a synthetic
series and stays quiet on a healthy one (``promtool test rules``); every metric the rules and
the Grafana dashboard name is one the services export.

promtool comes from Debian's ``prometheus`` package; the Makefile's test path puts it in
.venv/bin (tests/test_deploy.py's ``tool`` says how when it is missing)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from test_deploy import tool

from teltonika_ingest.processor.metrics import ProcessorMetrics
from teltonika_ingest.server.authority import AuthorityMetrics
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.workers import SupervisorMetrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
OPERATIONS = (ROOT / "OPERATIONS.md").read_text(encoding="utf-8")

INGEST = {"instance": "ingest-1:9090", "job": "teltonika-ingest"}
PROC = {"instance": "processor-1:9092", "job": "teltonika-processor"}


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def bucket(name: str, le: str, values: str) -> dict[str, str]:
    return series(name + "_bucket", {**INGEST, "le": le}, values)


# alert -> (firing input, healthy input, eval time, labels of the firing alert besides
# alertname and severity). Samples every 15 s (evaluation_interval below).
CASES: dict[str, tuple[list[dict[str, str]], list[dict[str, str]], str, dict[str, str]]] = {
    "TeltonikaRedisNotReady": (
        [series("teltonika_redis_up", INGEST, "0x40")],
        [series("teltonika_redis_up", INGEST, "1x40")],
        "5m",
        INGEST,
    ),
    "TeltonikaPublishFailures": (
        [series("teltonika_publish_failures_total", {**INGEST, "reason": "unavailable"}, "0+3x80")],
        [series("teltonika_publish_failures_total", {**INGEST, "reason": "unavailable"}, "0x80")],
        "15m",
        {"instance": INGEST["instance"]},
    ),
    "TeltonikaPublishOverflow": (
        [series("teltonika_publish_overflow_total", INGEST, "0+5x40")],
        [series("teltonika_publish_overflow_total", INGEST, "7x40")],
        "5m",
        INGEST,
    ),
    "TeltonikaUnknownCodec": (
        [series("teltonika_unknown_codec_total", INGEST, "0+1x80")],
        [series("teltonika_unknown_codec_total", INGEST, "4x80")],
        "15m",
        INGEST,
    ),
    "TeltonikaHighCrcFailures": (
        [
            series(
                "teltonika_frames_total", {**INGEST, "codec": "8", "result": "crc_fail"}, "0+2x80"
            ),
            series("teltonika_frames_total", {**INGEST, "codec": "8", "result": "ok"}, "0+100x80"),
        ],
        [
            series(
                "teltonika_frames_total", {**INGEST, "codec": "8", "result": "crc_fail"}, "1x80"
            ),
            series("teltonika_frames_total", {**INGEST, "codec": "8", "result": "ok"}, "0+100x80"),
        ],
        "15m",
        {"instance": INGEST["instance"]},
    ),
    "TeltonikaInstanceIdle": (
        [
            series("teltonika_connections_active", INGEST, "0x80"),
            series("teltonika_connections_active", {**INGEST, "instance": "ingest-2:9090"}, "5x80"),
        ],
        [
            series("teltonika_connections_active", INGEST, "3x80"),
            series("teltonika_connections_active", {**INGEST, "instance": "ingest-2:9090"}, "5x80"),
        ],
        "15m",
        INGEST,
    ),
    "TeltonikaUnhandledErrors": (
        [series("teltonika_unhandled_errors_total", INGEST, "0x10 1x30")],
        [series("teltonika_unhandled_errors_total", INGEST, "0x40")],
        "5m",
        INGEST,
    ),
    "TeltonikaReactorLagSustained": (
        [
            bucket("teltonika_reactor_lag_seconds", "0.01", "0x80"),
            bucket("teltonika_reactor_lag_seconds", "0.1", "0+10x80"),
            bucket("teltonika_reactor_lag_seconds", "+Inf", "0+10x80"),
        ],
        [
            bucket("teltonika_reactor_lag_seconds", "0.01", "0+10x80"),
            bucket("teltonika_reactor_lag_seconds", "0.1", "0+10x80"),
            bucket("teltonika_reactor_lag_seconds", "+Inf", "0+10x80"),
        ],
        "15m",
        {"instance": INGEST["instance"]},
    ),
    "TeltonikaWorkerRestarting": (
        [series("teltonika_worker_restarts_total", INGEST, "0x10 1x30")],
        [series("teltonika_worker_restarts_total", INGEST, "2x40")],
        "5m",
        INGEST,
    ),
    "TeltonikaAckLatencyHigh": (
        [
            bucket("teltonika_ack_latency_seconds", "0.1", "0x80"),
            bucket("teltonika_ack_latency_seconds", "1", "0+10x80"),
            bucket("teltonika_ack_latency_seconds", "+Inf", "0+10x80"),
        ],
        [
            bucket("teltonika_ack_latency_seconds", "0.1", "0+10x80"),
            bucket("teltonika_ack_latency_seconds", "1", "0+10x80"),
            bucket("teltonika_ack_latency_seconds", "+Inf", "0+10x80"),
        ],
        "15m",
        {"instance": INGEST["instance"]},
    ),
    "ProcessorLagGrowing": (
        [series("processor_consumer_lag", PROC, "20000+100x120")],
        [series("processor_consumer_lag", PROC, "20000x120")],
        "25m",
        PROC,
    ),
    "ProcessorPostgresDown": (
        [series("processor_postgres_up", PROC, "0x40")],
        [series("processor_postgres_up", PROC, "1x40")],
        "5m",
        PROC,
    ),
    "ProcessorDeadLetters": (
        [series("processor_dead_letters_total", PROC, "0x10 1x30")],
        [series("processor_dead_letters_total", PROC, "0x40")],
        "5m",
        PROC,
    ),
    "ProcessorWritesRefused": (
        [series("processor_position_writes_total", {**PROC, "status": "failed"}, "0x10 3x30")],
        [series("processor_position_writes_total", {**PROC, "status": "inserted"}, "0+50x40")],
        "5m",
        {**PROC, "status": "failed"},
    ),
    "ProcessorUnhandledErrors": (
        [series("processor_unhandled_errors_total", PROC, "0x10 1x30")],
        [series("processor_unhandled_errors_total", PROC, "0x40")],
        "5m",
        PROC,
    ),
    "ProcessorDown": (
        [series("up", PROC, "0x40")],
        [series("up", PROC, "1x40")],
        "5m",
        PROC,
    ),
}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for title in re.findall(r"^#{1,6} (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_promtool_check_rules() -> None:
    promtool = tool("promtool", "make .venv/.test-tools (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_every_alert_is_complete_and_links_a_runbook_entry() -> None:
    known = anchors(OPERATIONS)
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        notes = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(notes), rule["alert"]
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "OPERATIONS.md" and anchor in known, (rule["alert"], anchor)


def test_the_rules_are_the_documented_ones() -> None:
    section = OPERATIONS[OPERATIONS.index("\n## Alert rules\n") :]
    section = section[: section.index("\n## ", 5)]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
    assert documented == {rule["alert"] for rule in rules()}


def test_promtool_unit_tests_one_firing_one_quiet_per_alert(tmp_path: Path) -> None:
    promtool = tool("promtool", "make .venv/.test-tools (Debian package prometheus)")
    by_name = {rule["alert"]: rule for rule in rules()}
    assert set(CASES) == set(by_name)  # every alert has its two cases
    tests = []
    for name, (firing, healthy, at, labels) in CASES.items():
        rule = by_name[name]
        expected = {
            key: value.replace("{{ $labels.instance }}", labels["instance"])
            for key, value in rule["annotations"].items()
        }
        tests.append(
            {
                "name": f"{name} fires",
                "interval": "15s",
                "input_series": firing,
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": name,
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "alertname": name,
                                    "severity": rule["labels"]["severity"],
                                    **labels,
                                },
                                "exp_annotations": expected,
                            }
                        ],
                    }
                ],
            }
        )
        tests.append(
            {
                "name": f"{name} stays quiet",
                "interval": "15s",
                "input_series": healthy,
                "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": []}],
            }
        )
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(json.dumps({"rule_files": [str(ALERTS)], "tests": tests}))
    result = subprocess.run(
        [promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --------------------------------------------------------------------------- metric names


def exported_metric_names() -> set[str]:
    """Every series name the ingest (with its supervisor) and the processor export."""
    registry = CollectorRegistry()
    Metrics(registry)
    AuthorityMetrics.create(registry)
    SupervisorMetrics(registry)
    processor = CollectorRegistry()
    ProcessorMetrics(processor)
    names = {"up"}  # Prometheus' own, per scrape target
    for family in [*registry.collect(), *processor.collect()]:
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def named_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (not functions, labels, or label values)."""
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    without_by = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_labels)
    words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()", without_by))
    return {w for w in words if "_" in w or w == "up"} - PROMQL_WORDS


PROMQL_WORDS = {"and", "or", "unless", "bool", "offset"}


def test_alert_rules_name_exported_metrics() -> None:
    exported = exported_metric_names()
    for rule in rules():
        assert named_metrics(rule["expr"]) <= exported, rule["alert"]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as Prometheus would see them once Grafana filled them in."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


def test_dashboard_queries_name_exported_metrics_and_parse(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    exported = exported_metric_names()
    assert exprs
    for expr in exprs:
        names = named_metrics(grafana_to_promql(expr))
        assert names, expr  # every query is about one of our metrics
        assert names <= exported, (expr, names - exported)
    # promtool parses PromQL in rule files: each query as a recording rule
    as_rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:q{i}", "expr": grafana_to_promql(e)}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(as_rules))
    promtool = tool("promtool", "make .venv/.test-tools (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "needed",
    [
        "teltonika_connections_active",
        "teltonika_records_total",
        "teltonika_ack_latency_seconds_bucket",
        "teltonika_publish_failures_total",
        "teltonika_publish_backpressure_total",
        "teltonika_redis_up",
        "teltonika_commands_total",
    ],
)
def test_dashboard_shows(needed: str) -> None:
    assert any(needed in expr for expr in dashboard_exprs())
