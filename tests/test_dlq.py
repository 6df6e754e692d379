"""Dead letters: CRC-valid undecodable frames go whole to <stream>:dlq, are ACKed, and can be
replayed with `teltonika-ingest dlq replay` once the decoder handles them."""

from __future__ import annotations

import base64
import struct
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import pytest_twisted

from teltonika_ingest.codec import unwrap_frame, wrap_frame

from redisproc import RedisProcess
from support import avl_frame
from test_service_integration import IMEI, start, stream_entries

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "teltonika-ingest")


def malformed_8e_frame() -> bytes:
    """A CRC-valid Codec 8E frame whose first record's total IO count is off by one."""
    data = bytearray(unwrap_frame(avl_frame(2)))
    # codec(1) n1(1) | timestamp(8) priority(1) gps(15) event id(2) total(2)
    total_at = 2 + 24 + 2
    (total,) = struct.unpack_from(">H", data, total_at)
    struct.pack_into(">H", data, total_at, total + 1)
    return wrap_frame(bytes(data))


@pytest_twisted.ensureDeferred
async def test_undecodable_frame_dead_lettered_and_acked(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    running = await start(redis_proc, tmp_path)
    try:
        dev = await running.device()
        frame = malformed_8e_frame()
        dev.send(frame)
        assert await dev.expect(4) == b"\x00\x00\x00\x02"  # declared count: the device moves on
        dev.send(avl_frame(1, start=50))  # and the session goes on normally
        assert await dev.expect(4) == b"\x00\x00\x00\x01"
        assert len(stream_entries(redis_proc)) == 1
        (dead,) = stream_entries(redis_proc, "telemetry:teltonika:dlq")
        assert set(dead) == {"imei", "codec", "reason", "raw_b64", "received_at", "instance_id"}
        assert base64.b64decode(dead["raw_b64"]) == frame
        assert (dead["imei"], dead["codec"], dead["instance_id"]) == (IMEI, "8E", "test-a")
        assert dead["reason"].startswith("malformed")
        assert running.sample("teltonika_frames_total", codec="8E", result="dead_lettered") == 1
        assert running.sample("teltonika_dead_letters_total", reason="malformed") == 1
        await dev.close()
    finally:
        await running.svc.stopService()


def test_dlq_list_and_replay_through_the_console_script(redis_proc: RedisProcess) -> None:
    good = avl_frame(3, start=7)  # decodes now: as if the decoder had been fixed since
    bad = malformed_8e_frame()
    for raw in (good, bad):
        redis_proc.cmd(
            "XADD", "telemetry:teltonika:dlq", "*", "imei", IMEI, "codec", "8E",
            "reason", "malformed: test", "raw_b64", base64.b64encode(raw).decode(),
            "received_at", "2026-11-01T10:00:00.123Z", "instance_id", "old",
        )  # fmt: skip
    url = f"redis://127.0.0.1:{redis_proc.port}/0"
    env = {"PATH": "/usr/bin:/bin"}

    listed = subprocess.run(
        [CLI, "dlq", "list", "--redis-url", url], capture_output=True, text=True, env=env,
        timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    lines = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [line["bytes"] for line in lines] == [str(len(good)), str(len(bad))]

    dry = subprocess.run(
        [CLI, "dlq", "replay", "--dry-run", "--redis-url", url], capture_output=True, text=True,
        env=env, timeout=60,
    )  # fmt: skip
    assert dry.returncode == 2  # one entry still fails
    assert redis_proc.cmd("XLEN", "telemetry:teltonika") == 0
    assert redis_proc.cmd("XLEN", "telemetry:teltonika:dlq") == 2

    replay = subprocess.run(
        [CLI, "dlq", "replay", "--redis-url", url], capture_output=True, text=True, env=env,
        timeout=60,
    )  # fmt: skip
    assert replay.returncode == 2, replay.stderr
    assert "replayed 1, still failing 1" in replay.stderr
    results = [orjson.loads(line)["result"] for line in replay.stdout.splitlines()]
    assert results == ["replayed", "still_failing"]
    entries = stream_entries(redis_proc)
    assert len(entries) == 3
    for entry in entries:
        payload = orjson.loads(entry["payload"])
        assert payload["received_at"] == "2026-11-01T10:00:00.123Z"
        assert (entry["imei"], entry["codec"], payload["device_id"]) == (IMEI, "8E", IMEI)
    (left,) = stream_entries(redis_proc, "telemetry:teltonika:dlq")
    assert base64.b64decode(left["raw_b64"]) == bad
