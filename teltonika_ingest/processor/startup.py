"""The processor's start-up failures, explained (what, why, fix): the machinery is the
shared ``teltonika_ingest/ops/startup.py``; here are the causes only the processor has (no
PostgreSQL for the embedded default, the live feed's token file and hook).

OPERATIONS.md, "The processor", "What is fatal" lists them; tests/test_processor_startup.py
runs each through a real ``twistd -n teltonika-processor``.
"""

from __future__ import annotations

from teltonika_ingest.ops.startup import StartupError

__all__ = [
    "LISTENERS",
    "PROG",
    "embedded_postgres",
    "embedded_redis",
    "no_postgres",
    "no_redis_server",
]

PROG = "twistd teltonika-processor"

#: service name -> (what it is, the option that sets its endpoint)
LISTENERS = {
    "http": ("operations HTTP listener", "--metrics"),
    "live": ("live feed", "--live"),
}


def no_redis_server(why: str) -> StartupError:
    return StartupError(
        "no Redis URL is configured (--redis-url, REDIS_URL, the config file)",
        why,
        "set --redis-url / REDIS_URL to your Redis, or install redis-server "
        "(Debian: apt-get install redis-server) for development",
    )


def no_postgres(why: str) -> StartupError:
    return StartupError(
        "no database URL is configured (--database-url, DATABASE_URL, the config file)",
        why,
        "set --database-url / DATABASE_URL to your PostgreSQL, or install PostgreSQL "
        "(Debian: apt-get install postgresql; or pip install 'teltonika-ingest[embedded]') "
        "for the embedded development database",
    )


def embedded_redis(why: str) -> StartupError:
    return StartupError(
        "cannot start the embedded development Redis",
        why,
        "set --redis-url / REDIS_URL to a Redis server, or fix the cause above",
    )


def embedded_postgres(why: str) -> StartupError:
    return StartupError(
        "cannot start the embedded development PostgreSQL",
        why,
        "set --database-url / DATABASE_URL to a PostgreSQL server, or fix the cause above "
        "(--data-dir must be a writable directory)",
    )
