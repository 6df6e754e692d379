"""The processor (``twistd -n teltonika-processor``): the telemetry stream into PostgreSQL.

decode (pure: entry -> row), pg (a psycopg connection on its own thread), migrate (versioned
SQL under an advisory lock), writer (COPY into a staging table, INSERT ... ON CONFLICT DO
NOTHING), state (per-device LRU), consumer (read, write, acknowledge, claim, dead-letter),
embedded (the development PostgreSQL), metrics, http, tap (the service tree), live (the
WebSocket feed and page, ``--live``).
"""
