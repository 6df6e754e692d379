"""OPERATIONS.md is true to the code: every metric the service registers is documented, and
every metric the document names exists."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from teltonika_ingest.server.authority import AuthorityMetrics
from teltonika_ingest.server.metrics import Metrics
from teltonika_ingest.server.workers import SupervisorMetrics

DOC = (Path(__file__).parent.parent / "OPERATIONS.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = DOC.index(f"\n## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else None]


def code_metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    AuthorityMetrics.create(registry)
    SupervisorMetrics(registry)
    names = set()
    for family in registry.collect():
        if not family.name.startswith("teltonika_"):
            continue
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    table = section("Metrics")
    documented = set(re.findall(r"^\| `(teltonika_\w+)` \|", table, re.M))
    assert documented == code_metric_names()


def test_metric_names_used_anywhere_in_the_document_exist() -> None:
    known = code_metric_names()
    used = set(re.findall(r"\b(teltonika_[a-z_]+?)(?:_bucket|_count|_sum)?\b", DOC))
    used.discard("teltonika_ingest")  # the package name, not a metric
    assert used - known == set()


def test_contract_metrics_are_registered() -> None:
    contract = {
        "teltonika_connections_active", "teltonika_handshakes_total", "teltonika_frames_total",
        "teltonika_records_total", "teltonika_unknown_codec_total",
        "teltonika_publish_duration_seconds", "teltonika_publish_failures_total",
        "teltonika_publish_overflow_total", "teltonika_ack_latency_seconds",
        "teltonika_registry_failures_total", "teltonika_heartbeat_failures_total",
        "teltonika_commands_total",
    }  # fmt: skip
    assert contract <= code_metric_names()


def test_runbook_entries_present() -> None:
    runbook = section("Runbook")
    for title in (
        "Devices not connecting",
        "Records not in Redis",
        "High CRC failures from one IMEI",
        "Drain the DLQ",
        "See which instance holds a device",
        "Send a command",
    ):
        assert f"### {title}" in runbook


def test_alert_rules_cover_the_required_conditions() -> None:
    alerts = section("Alert rules")
    for expr in (
        "teltonika_unknown_codec_total",
        "teltonika_publish_overflow_total",
        'teltonika_frames_total{result="crc_fail"}',
        "teltonika_connections_active == 0",
        "teltonika_redis_up == 0",
    ):
        assert expr in alerts


def processor_metric_names() -> set[str]:
    """The processor's metrics, its live feed's (``processor_live_*``) included."""
    from teltonika_ingest.processor.live.metrics import LiveMetrics
    from teltonika_ingest.processor.metrics import ProcessorMetrics

    registry = ProcessorMetrics().registry
    LiveMetrics.create(registry)
    names = set()
    for family in registry.collect():
        if family.name.startswith("processor_"):
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_processor_metrics_documented_both_ways() -> None:
    # the live feed's metrics are in its own section
    tables = section("The processor") + section("Live feed (processor)")
    documented = set(re.findall(r"^\| `(processor_\w+)` \|", tables, re.M))
    assert documented == processor_metric_names()
    used = set(re.findall(r"\b(processor_[a-z_]+?)(?:_bucket|_count|_sum)?\b", DOC))
    assert used - processor_metric_names() == set()


def test_processor_contract_metrics_and_runbook() -> None:
    contract = {
        "processor_consumer_reads_total", "processor_consumer_records_total",
        "processor_consumer_lag", "processor_decode_errors_total",
        "processor_position_writes_total", "processor_write_duration_seconds",
        "processor_acks_total", "processor_device_state_size",
        "processor_device_state_evictions_total", "processor_claims_total",
        "processor_dead_letters_total",
    }  # fmt: skip
    assert contract <= processor_metric_names()
    processor = section("The processor")
    for title in (
        "Consumer lag growing",
        "Claim stuck entries from a dead instance",
        "Drain the processor DLQ",
        "Postgres down",
        "Force-rehydrate one device",
        "Add a second instance",
    ):
        assert f"#### {title}" in processor
