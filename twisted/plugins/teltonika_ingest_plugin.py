"""twistd plugin: `twistd -n teltonika-ingest [options]` (no __init__.py in this folder)."""

from twisted.application.service import ServiceMaker

teltonika_ingest = ServiceMaker(
    "teltonika-ingest",
    "teltonika_ingest.server.tap",
    "Teltonika GPS tracker ingestion: Codec 8/8E/16 to a Redis stream, Codec 12/14 commands",
    "teltonika-ingest",
)
