"""The image's HEALTHCHECK (``python -m teltonika_ingest.cli.healthcheck``): /readyz at the
port the operations endpoint variable names; 0 when ready, 1 with the reason otherwise."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from teltonika_ingest.cli.healthcheck import endpoint_port


def test_endpoint_port() -> None:
    assert endpoint_port("tcp:9090") == 9090
    assert endpoint_port("tcp:9092:interface=127.0.0.1") == 9092
    assert endpoint_port("tcp6:port=9091:interface=\\:\\:1") == 9091
    with pytest.raises(ValueError):
        endpoint_port("unix:/run/ops.sock")


class Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        ready = self.path == "/readyz" and Readyz.status == 200
        body = b'{"status":"ready"}' if ready else b'{"status":"not ready","reason":"redis x"}'
        self.send_response(200 if ready else 503)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    srv = http.server.HTTPServer(("127.0.0.1", 0), Readyz)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def check(env_name: str, value: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_METRICS")}
    env[env_name] = value
    return subprocess.run(
        [sys.executable, "-m", "teltonika_ingest.cli.healthcheck", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_ready_and_not_ready(server: int) -> None:
    Readyz.status = 200
    ok = check("TELTONIKA_METRICS", f"tcp:{server}:interface=127.0.0.1")
    assert (ok.returncode, ok.stdout) == (0, "")
    Readyz.status = 503
    bad = check("TELTONIKA_METRICS", f"tcp:{server}")
    assert (bad.returncode, bad.stdout) == (1, "not ready: HTTP 503 redis x\n")
    # the processor's variable, named on the command line
    Readyz.status = 200
    proc = check("PROCESSOR_METRICS", f"tcp:{server}", "PROCESSOR_METRICS")
    assert proc.returncode == 0


def test_nothing_listening() -> None:
    sock_port = 1  # nothing listens on port 1
    result = check("TELTONIKA_METRICS", f"tcp:{sock_port}")
    assert result.returncode == 1 and result.stdout.startswith("not ready: ")
