"""twistd plugin: `twistd -n teltonika-processor [options]` (no __init__.py in this folder)."""

from twisted.application.service import ServiceMaker

teltonika_processor = ServiceMaker(
    "teltonika-processor",
    "teltonika_ingest.processor.tap",
    "The telemetry stream into PostgreSQL: consumer group, idempotent writes, claims, DLQ",
    "teltonika-processor",
)
