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
    assert isinstance(out.pop("gps_valid"), bool) and isinstance(out.pop("time_valid"), bool)
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


# --------------------------------------------------------------------------- --names, table


def test_names_on_the_vendor_example():
    result = run("--names", "--model", "FMB920", CODEC8)
    assert result.returncode == 0, result.stderr
    (line,) = lines(result)
    # attributes unchanged, raw; io beside them, named and scaled for the model
    assert line["attributes"] == {"21": 3, "1": 1, "66": 24079, "241": 24602,
                                  "78": {"__bigint": "0"}}  # fmt: skip
    assert line["io"]["external_voltage"] == {"id": 66, "value": 24.079, "unit": "V"}
    assert line["io"]["gsm_signal"] == {"id": 21, "value": 3}
    assert run(CODEC8).stdout.count('"io"') == 0  # opt-in


def test_names_depend_on_the_model():
    fmb640 = lines(run("--model", "fmb640", CODEC8))[0]["io"]  # --model implies --names
    assert fmb640["external_voltage"] == {"id": 66, "value": 24079, "unit": "mV"}
    unknown = run("--names", CODEC8)
    assert unknown.returncode == 0 and unknown.stderr == ""
    assert "external_voltage" not in lines(unknown)[0]["io"]  # not common to all families
    bad = run("--model", "FMX999", CODEC8)
    assert bad.returncode == 0
    assert bad.stderr.startswith("warning: model 'FMX999' is not in the IO catalogue")
    assert lines(bad)[0]["io"] == lines(unknown)[0]["io"]


def test_table_format():
    result = run("--format", "table", "--model", "FMB920", HANDSHAKE + CODEC8)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == "handshake  imei 356307042441013"
    assert out[1].startswith("2019-06-10T10:04:46.000Z  device 356307042441013  codec 8")
    assert out[1].endswith("(FMB920)")
    rows = {row.split()[0]: row for row in out[3:]}
    assert "External Voltage" in rows["66"] and "24079" in rows["66"] and "24.079 V" in rows["66"]
    assert len(rows) == 5


def test_unknown_ids_stay_raw_in_both_formats():
    from teltonika_ingest.codec import AvlPacket, encode_avl_frame

    from support import make_record

    record = make_record(0, io1={239: 1}, io2={65000: 7}, io4={}, io8={})
    frame = encode_avl_frame(AvlPacket("8E", (record,))).hex()
    (line,) = lines(run("--model", "FMB920", frame))
    assert line["attributes"] == {"239": 1, "65000": 7}
    assert line["io"] == {"ignition": {"id": 239, "value": 1, "text": "Ignition On"}}
    table = run("--format", "table", "--model", "FMB920", frame).stdout.splitlines()
    assert table[-1].split() == ["65000", "?", "7"]


# --------------------------------------------------------------------------- commands


def command_frame(codec: str, msg_type: int, payload: bytes, **kw: Any) -> str:
    from teltonika_ingest.codec import CommandMessage, encode_command_message

    return encode_command_message(CommandMessage(codec, msg_type, payload, **kw)).hex()


def test_binary_command_payloads_are_shown_losslessly():
    binary = bytes([0x00, 0xFF, 0x41, 0x0D, 0x80])
    (line,) = lines(run(command_frame("12", 6, binary)))
    assert line["text"] is None  # not printable: no lossy text
    assert line["hex"] == "00ff410d80"
    assert line["b64"] == "AP9BDYA="
    (text,) = lines(run(command_frame("14", 6, b"DI1:1 AIN1:0\r\n", imei="352093081452251")))
    assert text["text"] == "DI1:1 AIN1:0\r\n" and text["imei"] == "352093081452251"
    assert bytes.fromhex(text["hex"]) == b"DI1:1 AIN1:0\r\n"


def test_codec13_type_06_device_capture():
    capture = "000000000000001d0d01060000001564e8328168656c6c6f206c65747320746573740d0a0100003548"
    result = run(capture)
    assert result.returncode == 0, result.stderr
    (line,) = lines(result)
    assert (line["codec"], line["type"], line["text"]) == ("13", 6, "hello lets test\r\n")
    assert line["timestamp"] == "2023-08-25T04:48:01.000Z"


# --------------------------------------------------------------------------- --scan


def test_scan_finds_frames_in_log_lines(tmp_path):
    spaced = " ".join(CODEC8[i : i + 2] for i in range(0, len(CODEC8), 2))
    coloned = ":".join(CODEC8[i : i + 2] for i in range(0, len(CODEC8), 2)).upper()
    log = tmp_path / "device.log"
    log.write_text(
        "2026-12-01 10:00:00,123 INFO nothing here 0123 deadbeef\n"
        f"2026-12-01 10:00:01 [conn 7] rx {HANDSHAKE} then {CODEC8}\n"
        f"Dec  1 10:00:02 gw: rx={spaced} ; again x{coloned}\n"
        f"udp 127.0.0.1:5027 <- {UDP}\n"
    )
    result = run("--scan", str(log))
    assert result.returncode == 0, result.stderr
    out = lines(result)
    assert [o["found"]["kind"] for o in out] == ["handshake", "frame", "frame", "frame", "udp"]
    assert [o["found"]["line"] for o in out] == [2, 2, 3, 3, 4]
    line2 = log.read_text().splitlines()[1]
    assert out[0]["found"]["column"] == line2.index(HANDSHAKE) + 1
    assert out[1]["found"]["column"] == line2.index(CODEC8) + 1
    assert out[0]["imei"] == "356307042441013"
    assert out[1]["device_id"] == "356307042441013"  # the handshake earlier on its line
    assert out[2]["device_id"] is None and out[2]["attributes"] == out[1]["attributes"]
    assert out[3]["attributes"] == out[1]["attributes"]
    assert out[4]["device_id"] == "352093086403655"


def test_scan_stdin_an_odd_digit_before_a_frame_and_a_damaged_frame():
    damaged = CODEC8[:40] + ("0" if CODEC8[40] != "0" else "1") + CODEC8[41:]  # CRC now fails
    stdin = f"id=7{CODEC8}\nbad {damaged}\n"
    result = run("--scan", "-", stdin=stdin)
    assert result.returncode == 0, result.stderr
    (line,) = lines(result)  # the damaged frame is not a frame (CRC): nothing is guessed
    assert line["found"] == {"line": 1, "column": 5, "kind": "frame"}


def test_scan_with_nothing_found_and_a_missing_file(tmp_path):
    empty = run("--scan", "-", stdin="no frames here\n12:00:00 0000\n")
    assert empty.returncode == 1
    assert empty.stderr == "error: no Teltonika frame, handshake or datagram found\n"
    missing = run("--scan", str(tmp_path / "nope.log"))
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")
    assert run("--scan", "-", CODEC8).returncode == 1  # --scan takes no HEX arguments


def test_scan_reports_a_crc_valid_frame_that_does_not_decode():
    from teltonika_ingest.codec import wrap_frame

    data = bytearray(bytes.fromhex(CODEC8)[8:-4])
    data[-1] = 2  # number of data 2 disagrees; the CRC is made to match
    result = run("--scan", "-", stdin=f"x {wrap_frame(bytes(data)).hex()} and {CODEC8}\n")
    assert result.returncode == 1
    assert len(lines(result)) == 1  # the good frame after it is still decoded
    assert result.stderr.startswith("error: line 1, column 3: frame: number of data 1")
