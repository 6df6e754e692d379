"""The invariant checker (teltonika_ingest/sim/invariant.py) and ``teltonika-ingest verify``."""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import orjson
import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st

from teltonika_ingest.cli import verify as verify_cmd
from teltonika_ingest.codec import MAX_TIMESTAMP_MS, format_timestamp
from teltonika_ingest.config import RedisTarget
from teltonika_ingest.sim.invariant import (
    AckLog,
    AckLogWriter,
    StreamIndex,
    SyncRedis,
    SyncRedisError,
    compare,
    iso_to_ms,
    parse_ts,
    read_ack_log,
    read_stream,
    verify,
)

from redisproc import RedisProcess

IMEI_A = "356307042441013"
IMEI_B = "352093081452251"
T0 = 1_700_000_000_000
STREAM = "telemetry:teltonika"


# --------------------------------------------------------------------------- timestamps


@given(st.integers(min_value=-62_135_596_800_000, max_value=MAX_TIMESTAMP_MS))
def test_iso_round_trip_with_the_service_format(ms: int) -> None:
    try:
        text = format_timestamp(ms)
    except ValueError:
        return  # outside years 0001..9999: the service cannot write it either
    assert iso_to_ms(text) == ms


def test_parse_ts_forms() -> None:
    assert parse_ts(T0) == T0
    assert parse_ts(str(T0)) == T0
    assert parse_ts("2023-11-14T22:13:20.000Z") == T0
    assert parse_ts("2023-11-14T22:13:20Z") == T0
    assert parse_ts("2023-11-15T00:13:20.000+02:00") == T0
    assert parse_ts(float(T0)) == T0
    for bad in (True, None, "yesterday", 1.5, [T0]):
        with pytest.raises(ValueError):
            parse_ts(bad)


# --------------------------------------------------------------------------- the ACK log


def test_ack_log_formats(tmp_path: Path) -> None:
    path = tmp_path / "acks.log"
    path.write_text(
        "\n".join(
            [
                "# a comment",
                "",
                json.dumps({"imei": IMEI_A, "ts": T0}),
                json.dumps({"imei": IMEI_A, "ts": [T0 + 1, "2023-11-14T22:13:20.002Z"]}),
                json.dumps({"imei": IMEI_B, "ts": T0, "at": T0 + 5, "extra": "ignored"}),
                "imei,ts",
                f"{IMEI_B},{T0 + 1},2023-11-14T22:13:20.002Z",
                f"{IMEI_A},{T0}",  # logged twice: counted twice, one distinct record
            ]
        )
        + "\n"
    )
    log = read_ack_log([path])
    assert log.lines == 5
    assert log.records == 7
    assert log.keys() == {(IMEI_A, T0 + i) for i in range(3)} | {(IMEI_B, T0 + i) for i in range(3)}


def test_ack_log_since_filters_on_ack_time() -> None:
    lines = io.StringIO(
        json.dumps({"imei": IMEI_A, "ts": T0, "at": 100})
        + "\n"
        + json.dumps({"imei": IMEI_A, "ts": T0 + 1, "at": 200})
        + "\n"
        + json.dumps({"imei": IMEI_A, "ts": T0 + 2})  # no 'at': kept
        + "\n"
    )
    log = read_ack_log([lines], since_ms=150)
    assert log.keys() == {(IMEI_A, T0 + 1), (IMEI_A, T0 + 2)}
    assert log.skipped == 1


@pytest.mark.parametrize(
    "line",
    [
        '{"imei": "1"}',
        '{"ts": 1}',
        "{not json",
        "onlyimei",
        f"{IMEI_A},soon",
        '{"imei":1,"ts":[true]}',
    ],
)
def test_ack_log_bad_lines_are_errors_naming_the_line(line: str) -> None:
    with pytest.raises(ValueError, match=r"<log>:2: bad ACK log line"):
        read_ack_log([io.StringIO(f"{IMEI_A},{T0}\n{line}\n")])


def test_writer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    with AckLogWriter(path, clock=lambda: 12.5) as w:
        w.write(IMEI_A, T0)
        w.write(IMEI_B, [T0, T0 + 1])
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"imei": IMEI_A, "ts": T0, "at": 12500}
    log = read_ack_log([path])
    assert log.keys() == {(IMEI_A, T0), (IMEI_B, T0), (IMEI_B, T0 + 1)}
    assert read_ack_log([path], since_ms=12501).records == 0


# --------------------------------------------------------------------------- comparison


def _index(pairs: list[tuple[str, int]]) -> StreamIndex:
    index = StreamIndex()
    for imei, ts in pairs:
        index.add(imei, ts)
    index.entries = len(pairs)
    return index


def test_compare_counts_missing_duplicates_extra() -> None:
    log = AckLog()
    log.add(IMEI_A, [T0, T0 + 1, T0 + 2, T0 + 2])  # T0+2 ACKed twice (logged twice)
    log.add(IMEI_B, [T0, T0 + 5])
    stream = _index(
        [
            (IMEI_A, T0), (IMEI_A, T0), (IMEI_A, T0),  # 2 extra copies
            (IMEI_A, T0 + 2),
            (IMEI_A, T0 + 9), (IMEI_A, T0 + 9),  # never ACKed, twice
            (IMEI_B, T0 + 5),
            ("999999999999999", T0),  # another device
        ]
    )  # fmt: skip
    report = compare(log, stream)
    assert report.acked_records == 6
    assert report.acked_unique == 5
    assert report.acked_imeis == 2
    assert report.missing == 2  # A T0+1, B T0
    assert set(report.missing_sample) == {
        (IMEI_A, format_timestamp(T0 + 1)),
        (IMEI_B, format_timestamp(T0)),
    }
    assert report.duplicates == 3
    assert report.duplicated_records == 2
    assert report.extra == 1
    assert report.other_imeis_entries == 1
    assert report.stream_entries_logged == 7
    assert not report.ok
    assert "FAIL" in report.summary()
    assert report.as_dict()["ok"] is False


@given(
    acked=st.sets(st.integers(0, 50)),
    stored=st.lists(st.integers(0, 50)),
)
def test_compare_matches_set_arithmetic(acked: set[int], stored: list[int]) -> None:
    log = AckLog()
    log.add(IMEI_A, sorted(acked))
    report = compare(log, _index([(IMEI_A, t) for t in stored]))
    assert report.missing == len(acked - set(stored))
    assert report.extra == len(set(stored) - acked)
    assert report.duplicates == len(stored) - len(set(stored))
    assert report.ok == (acked <= set(stored))


def test_compare_empty_log_and_stream() -> None:
    report = compare(AckLog(), StreamIndex())
    assert report.ok and report.missing == 0 and report.acked_records == 0


# --------------------------------------------------------------------------- the stream


def _xadd(redis: RedisProcess, imei: str, ts: int, key: str = STREAM) -> None:
    payload = orjson.dumps({"device_id": imei, "timestamp": format_timestamp(ts)})
    redis.cmd("XADD", key, "*", "imei", imei, "codec", "8E", "ts", format_timestamp(ts),
              "payload", payload)  # fmt: skip


def _target(redis: RedisProcess, db: int = 0) -> RedisTarget:
    return RedisTarget.parse(f"redis://127.0.0.1:{redis.port}/{db}")


@pytest.mark.integration
def test_read_stream_in_batches(redis_session: RedisProcess) -> None:
    for i in range(25):
        _xadd(redis_session, IMEI_A if i % 2 else IMEI_B, T0 + i)
    # an entry in another field order, one with only a payload, one with neither
    redis_session.cmd("XADD", STREAM, "*", "ts", format_timestamp(T0 + 100), "imei", IMEI_A)
    only_payload = {"device_id": IMEI_A, "timestamp": format_timestamp(T0 + 101)}
    redis_session.cmd("XADD", STREAM, "*", "payload", orjson.dumps(only_payload))
    redis_session.cmd("XADD", STREAM, "*", "junk", "x")
    with SyncRedis(_target(redis_session)) as client:
        index = read_stream(client, STREAM, batch=4)
    assert index.entries == 28
    assert index.unreadable == 1
    assert sorted(index.by_imei[IMEI_A]) == [T0 + i for i in range(1, 25, 2)] + [T0 + 100, T0 + 101]
    assert index.length == 28
    assert index.trimmed == 0
    assert index.first_id is not None and index.last_id is not None


@pytest.mark.integration
def test_trimming_is_reported_not_hidden(redis_session: RedisProcess) -> None:
    log = AckLog()
    for i in range(10):
        _xadd(redis_session, IMEI_A, T0 + i)
        log.add(IMEI_A, T0 + i)
    redis_session.cmd("XTRIM", STREAM, "MAXLEN", "5")
    report = verify(_target(redis_session), log)
    assert report.missing == 5
    assert report.trimmed == 5
    assert "trimmed" in report.summary()


@pytest.mark.integration
def test_missing_stream_and_database_number(redis_session: RedisProcess) -> None:
    log = AckLog()
    log.add(IMEI_A, T0)
    redis_session.cmd("SELECT", "0")
    # the record is in db 3 only
    with SyncRedis(_target(redis_session, 3)) as client:
        client.execute("XADD", STREAM, "*", "imei", IMEI_A, "ts", format_timestamp(T0))
    assert verify(_target(redis_session, 3), log).ok
    report = verify(_target(redis_session, 0), log)  # db 0 has no stream at all
    assert report.missing == 1 and report.stream_entries == 0 and report.trimmed is None
    with SyncRedis(_target(redis_session)) as client, pytest.raises(SyncRedisError):
        client.execute("NOSUCHCOMMAND")


# --------------------------------------------------------------------------- the CLI


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    verify_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["verify", *argv])
    return int(args.handler(args))


@pytest.mark.integration
def test_cli_ok_missing_and_errors(
    redis_session: RedisProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://127.0.0.1:{redis_session.port}/0"
    for i in range(3):
        _xadd(redis_session, IMEI_A, T0 + i)
    _xadd(redis_session, IMEI_A, T0)  # a resend
    good = tmp_path / "good.log"
    good.write_text("".join(f'{{"imei":"{IMEI_A}","ts":{T0 + i},"at":{i}}}\n' for i in range(3)))
    assert _run_cli(str(good), "--redis-url", url) == 0
    out = capsys.readouterr().out
    assert "missing:         0  OK" in out and "duplicates:      1" in out

    bad = tmp_path / "bad.log"
    bad.write_text(f"{IMEI_A},{T0}\n{IMEI_A},{T0 + 7}\n")
    assert _run_cli(str(good), str(bad), "--redis-url", url, "--json") == 2
    report = json.loads(capsys.readouterr().out)
    assert report["missing"] == 1 and report["ok"] is False
    assert report["missing_sample"] == [{"imei": IMEI_A, "ts": format_timestamp(T0 + 7)}]

    # --since keeps only ACKs received from then on (the CSV lines have no 'at': kept)
    assert _run_cli(str(good), "--since", "2", "--redis-url", url, "--json") == 0
    assert json.loads(capsys.readouterr().out)["acked_records"] == 1

    # another stream name
    assert _run_cli(str(good), "--redis-url", url, "--stream", "other") == 2
    capsys.readouterr()

    assert _run_cli(str(tmp_path / "absent.log"), "--redis-url", url) == 1
    assert "No such file" in capsys.readouterr().err
    (tmp_path / "garbage.log").write_text("???\n")
    assert _run_cli(str(tmp_path / "garbage.log"), "--redis-url", url) == 1
    assert "bad ACK log line" in capsys.readouterr().err
    assert _run_cli(str(good), "--redis-url", "http://x") == 1
    assert "--redis-url" in capsys.readouterr().err
    assert _run_cli(str(good), "--redis-url", url, "--batch", "0") == 1
    assert _run_cli(str(good), "--redis-url", url, "--since", "whenever") == 1
    capsys.readouterr()
    dead = RedisProcess().start()
    dead_url = f"redis://127.0.0.1:{dead.port}/0"
    dead.close()
    assert _run_cli(str(good), "--redis-url", dead_url) == 1
    assert "ConnectionRefusedError" in capsys.readouterr().err


def test_writers_of_several_processes_share_one_log(tmp_path: Path) -> None:
    """Whole lines per write(2) on O_APPEND: interleaved writers never mix their lines."""
    path = tmp_path / "shared.log"
    writers = [AckLogWriter(path) for _ in range(3)]
    for w in writers:
        w.FLUSH_AT = 200  # flush often, so that the writers interleave
    for i in range(300):
        writers[i % 3].write(f"35630704244{i % 3:04d}", [T0 + i, T0 + i + 1000])
    for w in writers:
        w.close()
    log = read_ack_log([path])
    assert log.records == 600 and log.lines == 300


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_simulator_ack_log_verifies_end_to_end(
    redis_session: RedisProcess, tmp_path: Path
) -> None:
    """``simulate --ack-log`` (two processes sharing the file) against the service, then
    ``verify``: every ACKed record is in the stream."""
    import sys

    from twisted.internet import utils

    from test_service_integration import start

    running = await start(redis_session, tmp_path)
    try:
        log_path = tmp_path / "acks.log"
        argv = [
            "-m", "teltonika_ingest.cli.simulate", "--port", str(running.device_port),
            "--devices", "6", "--packets", "5", "--records", "3", "--processes", "2",
            "--ack-log", str(log_path), "--json", "--quiet",
        ]  # fmt: skip
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable,
            argv,
            env=dict(os.environ),
            path=str(tmp_path),
        )
        assert code == 0, err.decode()
        summary = json.loads(out.decode().strip().splitlines()[-1])
        assert summary["records_acked"] == 90
        report = verify(_target(redis_session), [log_path])
        assert report.ok and report.acked_records == 90 and report.acked_imeis == 6
        assert report.acked_unique == 90 and report.stream_entries == 90
    finally:
        await running.svc.stopService()
