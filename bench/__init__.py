"""Benchmarks of teltonika-ingest (``python -m bench.<name>``); results go in BENCHMARKS.md."""
