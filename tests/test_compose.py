"""compose.yaml (Redis, PostgreSQL, the ingest and the processor) is valid
(``docker-compose config``, Debian's ``docker-compose``, installed by the Makefile's test path)
and agrees with the services: one image, every environment variable one the service reads,
the operations ports on loopback, a stop grace above the shutdown budget."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from test_deploy import tool

from teltonika_ingest.config import OPTIONS, PROCESSOR_OPTIONS, Config

ROOT = Path(__file__).resolve().parent.parent


def config() -> dict[str, Any]:
    compose = tool("docker-compose", "apt-get install -y docker-compose")
    result = subprocess.run(
        [compose, "-f", "compose.yaml", "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = yaml.safe_load(result.stdout)
    return parsed


def seconds(text: str) -> float:
    return float(text.removesuffix("s"))


def test_compose_config_is_valid_and_agrees_with_the_services() -> None:
    services = config()["services"]
    assert set(services) == {"redis", "db", "ingest", "processor"}
    ingest, processor = services["ingest"], services["processor"]
    assert Path(ingest["build"]["context"]) == ROOT  # built from this Dockerfile
    assert ingest["image"] == processor["image"]  # one image, two services
    assert processor["command"][-1] == "teltonika-processor"
    assert ingest.get("command") is None  # the image's CMD: the ingest

    known = {spec.env for spec in OPTIONS}
    assert set(ingest["environment"]) <= known, set(ingest["environment"]) - known
    known_p = {spec.env for spec in PROCESSOR_OPTIONS} | {"TELTONIKA_LOG_FORMAT"}
    assert set(processor["environment"]) <= known_p, set(processor["environment"]) - known_p
    assert ingest["environment"]["REDIS_URL"] == processor["environment"]["REDIS_URL"]
    assert ingest["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert "@db/" in processor["environment"]["DATABASE_URL"]

    budget = Config().shutdown_timeout
    for svc in (ingest, processor):
        assert seconds(svc["stop_grace_period"]) > budget
        assert svc["init"] is True and svc["read_only"] is True
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert processor["depends_on"]["db"]["condition"] == "service_healthy"
    # operations listeners only on the host's loopback; devices on every address
    published = {
        (p["target"] if isinstance(p, dict) else p)
        for svc in (ingest, processor)
        for p in svc["ports"]
    }
    assert "127.0.0.1:9090:9090/tcp" in published and "127.0.0.1:9092:9092/tcp" in published
    assert 5027 in published
    assert processor["healthcheck"]["test"][-2:] == [
        "teltonika_ingest.cli.healthcheck",
        "PROCESSOR_METRICS",
    ]
