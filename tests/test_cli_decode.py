"""``teltonika-ingest decode`` through the real console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

VECTORS_PATH = Path(__file__).parent / "data" / "teltonika-spec-vectors.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())["vectors"]
SCRIPT = Path(sys.executable).parent / "teltonika-ingest"
CODEC8 = next(v for v in VECTORS if v["name"] == "codec8-one-record")["hex"]
UDP = next(v for v in VECTORS if v["kind"] == "udp")["hex"]
HANDSHAKE = "000f333536333037303432343431303133"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.exists(), f"console script missing: {SCRIPT} (pip install -e .)"
    return subprocess.run(
        [str(SCRIPT), "decode", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def strip_record(line: dict[str, Any]) -> dict[str, Any]:
    out = dict(line)
    for key in ("device_id", "received_at", "codec"):
        del out[key]
    if line["codec"] != "16":
        assert out.pop("generation_type") is None
    return out


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_every_vector(vector):
    result = run(vector["hex"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = lines(result)
    expect = vector["expect"]
    if vector["kind"] == "imei":
        assert out == [{"imei": expect["imei"]}]
    elif vector["kind"] in ("avl", "udp"):
        assert [strip_record(line) for line in out] == expect["records"]
        assert {line["codec"] for line in out} == {expect["codec"]}
        device = expect.get("imei")  # the datagram's IMEI; none for a bare TCP frame
        assert {line["device_id"] for line in out} == {device}
        for line in out:
            assert line["received_at"].endswith("Z") and len(line["received_at"]) == 24
    else:
        (line,) = out
        assert line["codec"] == expect["codec"]
        assert line["type"] == expect["type"]
        assert line["text"] == expect["text"]
        assert line["imei"] == expect.get("imei")
        assert line["timestamp"] == expect.get("timestamp")


def test_handshake_then_frames_sets_device_id_and_tolerates_formatting():
    spaced = " ".join(CODEC8[i : i + 2] for i in range(0, len(CODEC8), 2))
    result = run(f"0x{HANDSHAKE}", spaced.replace(" ", ":", 10))
    assert result.returncode == 0, result.stderr
    out = lines(result)
    assert out[0] == {"imei": "356307042441013"}
    assert out[1]["device_id"] is None  # a separate input: no handshake of its own
    combined = run(HANDSHAKE + CODEC8 + "ff" + CODEC8)
    assert [line.get("device_id") for line in lines(combined)[1:]] == ["356307042441013"] * 2


def test_imei_option_and_stdin():
    result = run("--imei", "352093081452251", "-", stdin=f"{CODEC8}\n\n0x{CODEC8.upper()}\n")
    assert result.returncode == 0, result.stderr
    out = lines(result)
    assert len(out) == 2
    assert {line["device_id"] for line in out} == {"352093081452251"}


def test_udp_flag_forces_datagram():
    result = run("--udp", UDP)
    assert result.returncode == 0
    assert lines(result)[0]["device_id"] == "352093086403655"
    forced = run("--udp", CODEC8)
    assert forced.returncode == 1
    assert forced.stderr.startswith("error: UDP datagram: ")


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


def test_truncated_frame():
    line = error_line(run(CODEC8[:-2]))
    assert line == (
        "error: frame 1: frame declares 54 data bytes and needs 66 bytes in all, got 65 "
        "(field crc, offset 65)"
    )


def test_truncated_handshake():
    line = error_line(run(HANDSHAKE[:-2]))
    assert "handshake" in line and "(field imei, offset 16)" in line


def test_oversized_declared_length():
    line = error_line(run("00000000" + "00010001" + "08" * 20))
    assert "exceeds the maximum of 65536" in line
    assert "(field data_length, offset 4)" in line
    assert error_line(run("--max-frame-size", "10", CODEC8)).endswith(
        "(field data_length, offset 4)"
    )


def test_bytes_after_the_frame():
    line = error_line(run(CODEC8 + "0102"))
    assert line.startswith("error: frame 2: preamble must be 00000000")


def test_corrupted_crc():
    corrupted = CODEC8[:-4] + "1234"
    line = error_line(run(corrupted))
    assert line == (
        "error: frame 1: CRC mismatch: frame says 0x1234, computed 0xc7cf (field crc, offset 62)"
    )


def test_corrupted_body_with_valid_crc_names_field_and_offset():
    from teltonika_ingest.codec import wrap_frame

    data = bytearray(bytes.fromhex(CODEC8)[8:-4])
    data[-1] = 2
    line = error_line(run(wrap_frame(bytes(data)).hex()))
    assert "number of data 1 (1) != number of data 2 (2)" in line
    assert "(field number_of_data_2, offset 61)" in line


@pytest.mark.parametrize("bad", ["0g", "abc", "0x", ":::"])
def test_bad_hex(bad):
    line = error_line(run(bad))
    assert "bad hex" in line


def test_good_output_before_a_bad_input_and_numbered_inputs():
    result = run(CODEC8, "zz")
    assert result.returncode == 1
    assert len(lines(result)) == 1
    assert result.stderr == "error: input 2: bad hex: 'z' is not a hex digit\n"


def test_usage_errors_and_help():
    assert subprocess.run([str(SCRIPT)], capture_output=True, check=False).returncode == 2
    helped = subprocess.run(
        [str(SCRIPT), "decode", "--help"], capture_output=True, text=True, check=False
    )
    assert helped.returncode == 0
    assert "--udp" in helped.stdout and "--imei" in helped.stdout


def test_main_is_importable_and_returns_status(capsys):
    from teltonika_ingest.cli.main import main

    assert main(["decode", HANDSHAKE]) == 0
    assert json.loads(capsys.readouterr().out) == {"imei": "356307042441013"}
    assert main(["decode", "00"]) == 1
