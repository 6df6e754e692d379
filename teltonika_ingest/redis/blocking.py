"""What the Redis-talking subcommands (``command``, ``dlq``) share: finding Redis, connecting,
running one coroutine on the reactor and turning its outcome into an exit status."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

#: how long to wait for Redis to accept the connection
CONNECT_TIMEOUT = 5.0

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A one-line error for stderr (exit status 1)."""


def add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help="Redis to use (default: $REDIS_URL, else redis-url from the service's config file)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the service's config file to read redis-url from (default ./tap.conf if present)",
    )


def redis_target(args: argparse.Namespace) -> Any:
    """The Redis named by --redis-url, $REDIS_URL or the service's config file."""
    from twisted.python import usage

    from teltonika_ingest.config import Config, RedisTarget

    url = args.redis_url or os.environ.get("REDIS_URL")
    if url:
        try:
            return RedisTarget.parse(url)
        except ValueError as e:
            raise CliError(f"--redis-url: {e}") from None
    argv = ["--config", args.config] if args.config is not None else []
    try:
        config = Config.from_args(argv)
    except usage.UsageError as e:
        raise CliError(str(e)) from None
    if config.redis is None:
        raise CliError(
            "no Redis URL: pass --redis-url, set REDIS_URL, or set redis-url in the service's "
            "config file (for the embedded development Redis, its unix socket in the data "
            "directory, e.g. --redis-url unix://$PWD/var/redis.sock)"
        )
    return config.redis


async def connected(client: Any, reactor: Any, timeout: float = CONNECT_TIMEOUT) -> None:
    """Wait until ``client`` (a started RedisClient) is connected, at most ``timeout`` s."""
    from twisted.internet import defer

    if client.connected:
        return
    d: defer.Deferred[None] = defer.Deferred()

    def made() -> None:
        if not d.called:
            d.callback(None)

    client.connection_made_hooks.append(made)
    d.addTimeout(timeout, reactor)
    try:
        await d
    except defer.TimeoutError:
        raise CliError(
            f"cannot connect to Redis at {client.target.describe()} within {timeout:g} s "
            f"({client.redis_state()})"
        ) from None
    finally:
        client.connection_made_hooks.remove(made)


def as_dict(flat: list[Any] | None) -> dict[str, str]:
    """A stream entry's flat field list as a dict of text."""
    if not flat:
        return {}
    items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return dict(zip(items[0::2], items[1::2], strict=False))


def run_on_reactor(
    prog: str,
    target: Any,
    body: Callable[[Any, Any, dict[str, Any]], Coroutine[Any, Any, int]],
    on_interrupt: Callable[[dict[str, Any]], str] = lambda state: "",
) -> int:
    """Connect a RedisClient to ``target``, run ``body(client, reactor, state)``, return its
    exit status (1 with a one-line message on failure, 130 if interrupted)."""
    from twisted.internet import defer
    from twisted.internet import reactor as global_reactor

    from teltonika_ingest.redis.client import RedisClient

    reactor: Any = global_reactor
    state: dict[str, Any] = {}

    async def main() -> int:
        client = RedisClient(
            target, reactor=reactor, command_timeout=10.0, poolsize=1, name="redis-cli"
        )
        client.startService()
        try:
            await connected(client, reactor)
            return await body(client, reactor, state)
        finally:
            await client.stopService()

    def start() -> None:
        d = defer.ensureDeferred(main())

        def done(code: int) -> None:
            state["code"] = code

        def failed(failure: Any) -> None:
            exc = failure.value
            message = str(exc) if isinstance(exc, CliError) else f"{type(exc).__name__}: {exc}"
            print(f"{prog}: {message}", file=sys.stderr)
            state["code"] = EXIT_ERROR

        def stop(_: Any) -> None:
            if reactor.running:
                reactor.stop()

        d.addCallbacks(done, failed)
        d.addBoth(stop)

    reactor.callWhenRunning(start)
    reactor.run()
    if "code" in state:
        return int(state["code"])
    print(f"{prog}: interrupted{on_interrupt(state)}", file=sys.stderr)
    return EXIT_INTERRUPTED
