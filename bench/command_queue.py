"""The command queue at fleet scale: ``python -m bench.command_queue [--devices N]``.

Against a fresh ``redis-server`` on loopback (no persistence), with the service's own Lua
scripts (``teltonika_ingest.server.commands.queue``), pipelined:

1. store ``devices x per_device`` commands (``ACCEPT``, 3 per device by default for 100,000
   devices) and report Redis memory per queued command (``used_memory`` before/after);
2. the cost of one sweep when nothing is due (what every instance pays every 5 s), and of one
   claim (what a handshake pays), as median latencies of single calls;
3. expire them all through ``SWEEP`` pages of 200 and report the rate.

Bounded: at most a few hundred thousand commands, one Redis, one process; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import hiredis

from bench.e2e import redis_server
from teltonika_ingest.redis.resp import encode_command
from teltonika_ingest.server.commands.queue import ACCEPT, CLAIM, EXPIRY_KEY, SWEEP


class Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.reader = hiredis.Reader()

    def pipeline(self, commands: list[list[Any]]) -> list[Any]:
        self.sock.sendall(b"".join(encode_command(cmd) for cmd in commands))
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = self.reader.gets()
            if reply is False:
                self.reader.feed(self.sock.recv(1 << 20))
                continue
            replies.append(reply)
        return replies

    def cmd(self, *args: Any) -> Any:
        return self.pipeline([list(args)])[0]


def used_memory(conn: Conn) -> int:
    info = conn.cmd("INFO", "memory").decode()
    line = next(line for line in info.splitlines() if line.startswith("used_memory:"))
    return int(line.split(":")[1])


def timed(conn: Conn, command: list[Any], n: int) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        conn.cmd(*command)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run(devices: int, per_device: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as (_proc, port):
        conn = Conn(port)
        for script in (ACCEPT, CLAIM, SWEEP):
            conn.cmd("SCRIPT", "LOAD", script.source)
        before = used_memory(conn)
        base = int(time.time() * 1000)
        total = devices * per_device
        start = time.perf_counter()
        batch: list[list[Any]] = []
        n = 0
        for d in range(devices):
            imei = f"{350000000000000 + d:015d}"
            for k in range(per_device):
                n += 1
                entry = f"{base + n // 1000}-{n % 1000}"
                args = ["teltonika-ingest", entry, 100000, "2026-12-01T00:00:00.000Z", "bench",
                        f"cmd-{d}-{k}", imei, "", 32, 10_000_000, "text", "setdigout 1", "12",
                        30000, 600_000, 3]  # fmt: skip
                batch.append(["EVALSHA", ACCEPT.sha1, 1, "commands:queue", *args])
                if len(batch) == 1000:
                    assert all(r[0] == b"queued" for r in conn.pipeline(batch))
                    batch = []
        if batch:
            conn.pipeline(batch)
        store_s = time.perf_counter() - start
        after = used_memory(conn)
        assert conn.cmd("ZCARD", EXPIRY_KEY) == total
        sweep_args = ["EVALSHA", SWEEP.sha1, 0, 100000, "2026-12-01T00:00:00.000Z", 200, "bench"]
        idle_sweep = timed(conn, sweep_args, 200)
        claim = timed(
            conn,
            ["EVALSHA", CLAIM.sha1, 0, "359999999999999", "bench", 100000, "x", 30000, ""],
            200,
        )
        # expire everything: move the deadlines into the past, then sweep page by page
        ids = [f"cmd-{d}-{k}" for d in range(devices) for k in range(per_device)]
        conn.pipeline([["ZADD", EXPIRY_KEY, "XX", 1, cid] for cid in ids])
        conn.cmd("EVAL", "for _, k in ipairs(redis.call('KEYS', 'commands:queued:*')) do "
                 "redis.call('HSET', k, 'expires', 1) end", 0)  # fmt: skip
        start = time.perf_counter()
        expired = 0
        while True:
            due, n_expired, *_rest = conn.cmd(*sweep_args)
            expired += n_expired
            if due < 200:
                break
        expire_s = time.perf_counter() - start
        assert expired == total, (expired, total)
        return {
            "devices": devices,
            "queued": total,
            "bytes_per_command": round((after - before) / total),
            "store_per_s": round(total / store_s),
            "idle_sweep_ms": round(idle_sweep * 1000, 3),
            "claim_empty_ms": round(claim * 1000, 3),
            "expire_per_s": round(total / expire_s),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--per-device", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = [run(args.devices, args.per_device) for _ in range(args.repeat)]
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(json.dumps({"runs": runs, "median": medians}, indent=1))


if __name__ == "__main__":
    main()
