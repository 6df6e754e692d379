"""``python -m teltonika_ingest.cli.healthcheck [ENV]``: the container image's HEALTHCHECK.

Asks ``/readyz`` on 127.0.0.1 at the port of the operations endpoint named by the environment
variable ``ENV`` (default ``TELTONIKA_METRICS``; the processor's is ``PROCESSOR_METRICS``), so
moving the port with that variable moves the health check too. Exit status 0 when ready, 1
otherwise, with the reason on one line. Standard library only: it runs every few seconds.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

DEFAULTS = {"TELTONIKA_METRICS": "tcp:9090", "PROCESSOR_METRICS": "tcp:9092"}


def endpoint_port(description: str) -> int:
    """The port of a Twisted ``tcp:``/``tcp6:`` server endpoint string (``tcp:9090``,
    ``tcp:port=9090:interface=127.0.0.1``)."""
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"not a tcp endpoint: {description!r}")
    for i, part in enumerate(rest.split(":")):
        key, eq, value = part.partition("=")
        if eq and key == "port":
            return int(value)
        if not eq and i == 0:
            return int(part)
    raise ValueError(f"no port in {description!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    name = args[0] if args else "TELTONIKA_METRICS"
    description = os.environ.get(name) or DEFAULTS.get(name, "tcp:9090")
    try:
        port = endpoint_port(description)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=4) as reply:
            if reply.status == 200:
                return 0
            print(f"not ready: HTTP {reply.status}")
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read()).get("reason", "")
        except ValueError:
            reason = ""
        print(f"not ready: HTTP {e.code} {reason}".rstrip())
    except (OSError, ValueError) as e:
        print(f"not ready: {e}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
