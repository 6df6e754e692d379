"""Coverage-guided fuzzing of the framing and codec entry points, for a bounded time.

    python -m bench.fuzz [--seconds 300] [--quick] [--engine auto|atheris|hypothesis]
                         [--save tests/fuzz_regressions] [--json]

Engine: atheris (libFuzzer, coverage-guided: ``pip install atheris``) when it imports,
otherwise Hypothesis generating binary inputs for the same target until the time is up
(not coverage-guided, so weaker; said so in the output). ``--quick`` runs 15 s (nothing
in CI uses it; CI replays the saved crash inputs: ``tests/test_fuzz_regressions.py``).

The target (:func:`check_input`) takes any bytes; the first byte picks an entry point and
how the rest is cut into reads, as the network would:

  0  ``Framer`` of a new connection (IMEI handshake first), the bytes in chunks
  1  ``Framer`` after the handshake (frames only), in chunks
  2  ``Session``, the sans-IO state machine the service runs per connection: every publish
     and authorisation succeeds at once, so the input drives it through every state
  3  ``decode_udp_datagram`` on the whole input
  4  ``decode_avl_frame`` / ``decode_command_frame`` on the whole input

A crash is any exception escaping an entry point other than the codec's own
``CodecError`` (whole-buffer decoders), and any broken property:

* the framer never reports an internal error (it turns unexpected exceptions into
  "internal framer error": that is a bug caught, still a bug);
* the same bytes give the same events whether they arrive at once or in pieces;
* a decoded AVL or command frame re-encodes to exactly its bytes (the decoder is strict:
  nothing is silently dropped or normalised); every decoded record renders its JSON
  payload;
* the session ACKs a packet with exactly its record count, a dead letter with the count
  its header declares, and nothing else.

Crash inputs found by atheris are written to ``--artifacts`` (default a temporary
directory) and, with ``--save DIR``, copied to DIR (``crash-<sha1>.bin``) to become
regression tests. Each crash is replayed here without instrumentation and its traceback
printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = ROOT / "tests" / "fuzz_regressions"
MAX_LEN = 4096
RECEIVED_AT = "2026-01-01T00:00:00.000Z"
TARGETS = 5


class PropertyBroken(AssertionError):
    """An input broke a property of the codec (not merely rejected as bad input)."""


# --------------------------------------------------------------------------- the target

_codec: Any = None
_session: Any = None


def _load() -> None:
    global _codec, _session
    if _codec is None:
        import teltonika_ingest.codec as codec
        import teltonika_ingest.server.session as session

        _codec, _session = codec, session


def _chunks(data: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    at = 0
    while at < len(data):
        size = rnd.choice((1, 1, 2, 3, 7, 16, 64, 1024))
        out.append(data[at : at + size])
        at += size
    return out


def _event_key(event: Any) -> Any:
    codec = _codec
    if type(event) is codec.FrameError:
        e = event.error
        return (
            "error", type(e).__name__, str(e), e.fatal, event.raw, event.codec_id,
            event.declared_count,
        )  # fmt: skip
    return event


def _framer_events(chunks: list[bytes], handshake: bool) -> list[Any]:
    framer = _codec.Framer(max_frame_size=MAX_LEN, expect_handshake=handshake)
    events = []
    for chunk in chunks:
        framer.feed(chunk)
        while True:
            event = framer.next_event()
            if event is None:
                break
            events.append(event)
    return events


def _check_event(event: Any) -> None:
    codec = _codec
    kind = type(event)
    if kind is codec.FrameError:
        if "internal framer error" in str(event.error):
            raise PropertyBroken(f"the framer caught an unexpected exception: {event.error}")
    elif kind is codec.AvlFrame:
        again = codec.encode_avl_frame(event.packet)
        if again != event.raw:
            raise PropertyBroken(f"AVL frame does not re-encode to its bytes: {event.raw.hex()}")
        for record in event.packet.records:
            payload = codec.record_payload(
                record, "356307042441013", event.packet.codec, RECEIVED_AT
            )
            json.loads(payload)
    elif kind is codec.CommandFrame:
        again = codec.encode_command_message(event.message)
        if again != event.raw:
            raise PropertyBroken(f"command frame does not re-encode: {event.raw.hex()}")
    elif kind is codec.Handshake and (len(event.imei) != 15 or not event.imei.isdigit()):
        raise PropertyBroken(f"handshake accepted a bad IMEI {event.imei!r}")


def _framer_target(data: bytes, seed: int, handshake: bool) -> None:
    whole = _framer_events([data], handshake)
    pieces = _framer_events(_chunks(data, seed), handshake)
    if [_event_key(e) for e in whole] != [_event_key(e) for e in pieces]:
        raise PropertyBroken("events differ between one read and many reads")
    for index, event in enumerate(whole):
        _check_event(event)
        fatal = type(event) is _codec.FrameError and event.error.fatal
        if fatal and index != len(whole) - 1:
            raise PropertyBroken("events after a fatal framing error")


def _session_target(data: bytes, seed: int) -> None:
    session_mod = _session
    codec = _codec
    s = session_mod.Session(max_frame_size=MAX_LEN, max_buffer=4 * MAX_LEN)
    queue: list[Any] = []
    for chunk in _chunks(data, seed):
        queue.extend(s.receive(chunk))
        while queue:
            action = queue.pop(0)
            kind = type(action)
            if kind is session_mod.Authorize:
                queue.extend(s.authorized(True))
            elif kind is session_mod.Publish:
                _check_event(action.frame)
                replies = s.published()
                expect = codec.ack_bytes(len(action.frame.packet.records))
                if not replies or replies[0] != session_mod.Send(expect):
                    raise PropertyBroken(f"packet ACKed with {replies[:1]!r}, not {expect!r}")
                queue.extend(replies[1:])
            elif kind is session_mod.DeadLetter:
                replies = s.published()
                if action.ack_count is None:
                    if any(type(r) is session_mod.Send for r in replies[:1]):
                        raise PropertyBroken("a command-codec dead letter was ACKed")
                    queue.extend(replies)
                else:
                    expect = codec.ack_bytes(action.ack_count)
                    if not replies or replies[0] != session_mod.Send(expect):
                        raise PropertyBroken(f"dead letter ACKed with {replies[:1]!r}")
                    queue.extend(replies[1:])
            elif kind is session_mod.Send and action.data not in (b"\x01", b"\x00"):
                raise PropertyBroken(f"unexpected bytes written: {action.data!r}")
    s.close("disconnected")


def check_input(data: bytes) -> None:
    """The fuzz target: raises on a crash or a broken property, returns otherwise."""
    _load()
    if not data:
        return
    selector, seed, rest = data[0] % TARGETS, data[0] // TARGETS, data[1:]
    codec = _codec
    if selector in (0, 1):
        _framer_target(rest, seed, handshake=selector == 0)
    elif selector == 2:
        _session_target(rest, seed)
    elif selector == 3:
        try:
            packet = codec.decode_udp_datagram(rest)
        except codec.CodecError:
            return
        for record in packet.packet.records:
            json.loads(codec.record_payload(record, packet.imei, packet.packet.codec, RECEIVED_AT))
    else:
        try:
            if len(rest) > 8 and rest[8] in (0x0C, 0x0D, 0x0E):
                message = codec.decode_command_frame(rest)
                if codec.encode_command_message(message) != rest:
                    raise PropertyBroken("command frame does not re-encode to its bytes")
            else:
                packet = codec.decode_avl_frame(rest)
                if codec.encode_avl_frame(packet) != rest:
                    raise PropertyBroken("AVL frame does not re-encode to its bytes")
        except codec.CodecError:
            return


# --------------------------------------------------------------------------- seeds


def seeds() -> list[bytes]:
    """Valid inputs for every entry point: the corpus the fuzzer starts from."""
    _load()
    codec = _codec
    vectors = json.loads((ROOT / "tests" / "data" / "teltonika-spec-vectors.json").read_text())
    out: list[bytes] = []
    handshake = codec.encode_imei("356307042441013")
    frames: list[bytes] = []
    for v in vectors["vectors"]:
        raw = bytes.fromhex(v["hex"])
        if v["kind"] == "udp":
            out.append(bytes([3]) + raw)
        elif v["kind"] == "imei":
            out.append(bytes([0]) + raw)
        else:
            frames.append(raw)
    rnd = random.Random(1)
    for codec_name in ("8", "8E", "16"):
        records = []
        for i in range(3):
            record = codec.AvlRecord(
                timestamp_ms=1_700_000_000_000 + i, priority=1, longitude=-252793217,
                latitude=546872135, altitude=-5, angle=270, satellites=9, speed=42,
                event_io_id=1, generation_type=5 if codec_name == "16" else None,
                io1={1: 1, 21: 3}, io2={66: 24079}, io4={241: 24602}, io8={78: 2**64 - 1},
                iox={385: rnd.randbytes(5)} if codec_name == "8E" else {},
            )  # fmt: skip
            records.append(record)
        packet = codec.AvlPacket(codec_name, tuple(records))
        frames.append(codec.encode_avl_frame(packet))
        datagram = codec.encode_udp_datagram(codec.UdpPacket(1, 2, "356307042441013", packet))
        out.append(bytes([3]) + datagram)
    frames.append(codec.encode_command("getver"))
    frames.append(codec.encode_command("getinfo", codec="14", imei="356307042441013"))
    for raw in frames:
        out.append(bytes([4]) + raw)
        out.append(bytes([1]) + raw + b"\xff" + raw)
        out.append(bytes([0]) + handshake + raw)
        out.append(bytes([2 + 5 * 7]) + handshake + raw + raw)
    return out


# --------------------------------------------------------------------------- engines


def _atheris_worker(args: argparse.Namespace) -> int:
    import atheris

    with atheris.instrument_imports():
        import teltonika_ingest.codec
        import teltonika_ingest.server.session  # noqa: F401
    _load()
    argv = [
        sys.argv[0], args.corpus,
        f"-max_total_time={int(args.seconds)}", f"-artifact_prefix={args.artifacts}/",
        f"-max_len={MAX_LEN}", "-print_final_stats=1", "-rss_limit_mb=2048",
        "-timeout=10",
    ]  # fmt: skip
    atheris.Setup(argv, check_input)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits


def run_atheris(seconds: float, artifacts: Path, log: Path) -> dict[str, Any]:
    corpus = Path(tempfile.mkdtemp(prefix="fuzz-corpus-"))
    for data in seeds() + [p.read_bytes() for p in sorted(REGRESSIONS.glob("*.bin"))]:
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.fuzz", "--worker", "--seconds", str(seconds),
             "--corpus", str(corpus), "--artifacts", str(artifacts)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 120,
        )  # fmt: skip
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", text))
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", text)
    shutil.rmtree(corpus, ignore_errors=True)
    return {
        "engine": "atheris (libFuzzer, coverage-guided)",
        "seconds": round(elapsed, 1),
        "executions": int(stats.get("number_of_executed_units", 0)),
        "coverage_edges": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "corpus_size": int(cov[-1][2]) if cov else None,
        "exit_status": proc.returncode,
    }


def run_hypothesis(seconds: float, artifacts: Path) -> dict[str, Any]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _load()
    failing: list[bytes] = []
    count = 0
    corpus = seeds()
    prefixed = st.one_of(
        st.binary(max_size=MAX_LEN),
        st.sampled_from(corpus),
        st.tuples(st.sampled_from(corpus), st.binary(max_size=64), st.integers(0, 4096)).map(
            lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
        ),
    )

    @settings(
        max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(prefixed)
    def target(data: bytes) -> None:
        nonlocal count
        count += 1
        try:
            check_input(data)
        except Exception:
            failing.append(data)
            raise

    started = time.monotonic()
    crashed = False
    while time.monotonic() - started < seconds:
        try:
            target()
        except Exception:
            crashed = True
            break
    if crashed and failing:
        data = failing[-1]  # Hypothesis replays the shrunk example last
        (artifacts / f"crash-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
    return {
        "engine": "hypothesis (random + seed splicing, not coverage-guided)",
        "seconds": round(time.monotonic() - started, 1),
        "executions": count,
        "coverage_edges": None,
        "exit_status": 1 if crashed else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget (default 300)")
    parser.add_argument("--quick", action="store_true", help="15 s (a smoke run)")
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    parser.add_argument("--artifacts", default=None, help="where crash inputs are written")
    parser.add_argument(
        "--save",
        default=None,
        metavar="DIR",
        help=f"copy crash inputs here as regression tests (e.g. {REGRESSIONS})",
    )
    parser.add_argument("--json", action="store_true", help="summary as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _atheris_worker(args)
    seconds = 15.0 if args.quick else args.seconds
    artifacts = Path(args.artifacts or tempfile.mkdtemp(prefix="fuzz-artifacts-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    if engine == "atheris":
        summary = run_atheris(seconds, artifacts, artifacts / "libfuzzer.log")
    else:
        summary = run_hypothesis(seconds, artifacts)
    kinds = ("crash-", "timeout-", "oom-", "leak-")
    crashes = sorted(p for p in artifacts.iterdir() if p.name.startswith(kinds))
    summary["crashes"] = []
    for path in crashes:
        data = path.read_bytes()
        entry: dict[str, Any] = {"file": str(path), "bytes": len(data), "hex": data[:64].hex()}
        try:
            check_input(data)
            entry["replay"] = "no longer fails (flaky, timeout or out of memory)"
        except Exception:
            entry["replay"] = traceback.format_exc(limit=6)
        if args.save:
            dest = Path(args.save)
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / f"crash-{hashlib.sha1(data).hexdigest()}.bin"
            target.write_bytes(data)
            entry["saved"] = str(target)
        summary["crashes"].append(entry)
    summary["artifacts"] = str(artifacts)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"engine      {summary['engine']}")
        print(f"time        {summary['seconds']} s")
        print(f"executions  {summary['executions']:,}")
        if summary.get("coverage_edges") is not None:
            print(
                f"coverage    {summary['coverage_edges']} edges, {summary['features']} "
                f"features, corpus {summary['corpus_size']}"
            )
        print(f"crashes     {len(summary['crashes'])}")
        for entry in summary["crashes"]:
            print(f"  {entry['file']} ({entry['bytes']} bytes)\n{entry['replay']}")
    return 1 if summary["crashes"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
