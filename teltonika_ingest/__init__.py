"""teltonika-ingest: Teltonika GPS tracker ingestion service."""

__version__ = "0.1.0"
