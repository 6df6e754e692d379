"""OPERATIONS.md's live feed section is true to the code: its metrics table lists exactly the
metrics the feed registers, and its close-code table the codes the feed uses."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from teltonika_ingest.processor.live import messages
from teltonika_ingest.processor.live.metrics import CLOSE_CODES, LiveMetrics

DOC = (Path(__file__).parent.parent / "OPERATIONS.md").read_text(encoding="utf-8")


def live_section() -> str:
    start = DOC.index("\n## Live feed (processor)\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end]


def registered() -> set[str]:
    registry = CollectorRegistry()
    LiveMetrics.create(registry)
    return {
        f.name + "_total" if f.type == "counter" else f.name
        for f in registry.collect()
        if f.name.startswith("processor_live_")
    }


def test_metrics_table_matches_the_code() -> None:
    documented = set(re.findall(r"^\| `(processor_live_\w+)` \|", live_section(), re.M))
    assert documented == registered()


def test_every_processor_live_name_in_the_document_exists() -> None:
    used = set(re.findall(r"\b(processor_live_[a-z_]+?)(?:_bucket|_count|_sum)?\b", DOC))
    assert used - registered() == set()


def test_close_codes_table_matches_the_code() -> None:
    table = live_section().split("### Close codes", 1)[1].split("###", 1)[0]
    documented = set(re.findall(r"^\| (\d{4}) \|", table, re.M))
    sent = {str(getattr(messages, n)) for n in dir(messages) if n.startswith("CLOSE_")}
    assert sent <= documented
    assert documented == set(CLOSE_CODES)
