"""``teltonika-ingest simulate``: simulated devices against a running service.

Load: ``--devices N`` devices (each its own IMEI) connect over ``--ramp-up`` seconds,
handshake, and send packets of ``--records K`` records (``--codec``, ``--ios`` IO elements
per record) back-to-back (``--rate 0``) or at ``--rate`` packets/s per device, for
``--duration`` seconds and/or ``--packets`` packets per device. Progress once a second
on stderr; a summary at the end (``--json``: one JSON object on stdout).

Replay: ``--replay FILE`` plays hex frames captured from a device log as one device and
reports, line by line, what the server answered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from typing import Any, TextIO

DESCRIPTION = """\
Simulated Teltonika devices against a running service (TCP, or UDP with --udp).

Each device connects, sends its IMEI handshake, waits for 01, then sends AVL packets
one at a time, each after the ACK of the previous one, like a real tracker; a packet not
ACKed within --ack-timeout (or ACKed with a wrong count, or whose connection dropped) is
sent again, byte for byte, after reconnecting. With --answer-commands, Codec 12/14 GPRS
commands from the server are answered (canned FMB-like texts; Codec 14 with the wrong
IMEI gets a nACK).

Timeline: device i of N connects at ramp-up * i / N. Back-to-back devices (--rate 0)
send as soon as their handshake is accepted; paced devices send their first packet at
ramp-up + (i / N) / rate and then every 1 / rate seconds. Sending stops at ramp-up +
duration (--duration) or after --packets ACKed packets per device; records/s and the
"steady" latency percentiles count only the window after the ramp-up.

Summary: packets and records sent and ACKed, records/s, ACK latency p50/p95/p99/max
(measured from the write of a packet to the arrival of its ACK), reconnects, errors.
Exit status: 0, or 1 if the run did not complete or saw errors.

Replay (--replay FILE, - for stdin): one hex input per line, sent as one write; blank
lines and # comments skipped; whitespace, colons, commas and 0x are ignored inside the
hex. A line may be an IMEI handshake (000F + 15 digits), one or more frames, or anything
else (sent as is, to reproduce a field problem). Log lines are accepted too: the hex is
then the last word, and lines whose prefix has ">" without "<" (Traccar style:
"teltonika > peer", written by the server) are skipped. Without a handshake line first,
the handshake for --imei is sent. After each line the replay waits for what the server
owes (01, the ACK of each AVL frame) and prints what came; it stops when the server
closes the connection. Exit status 0 only if every answer was the expected one.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="simulated devices: load generator and replay of captured frames",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    parser.set_defaults(handler=run)
    return parser


#: ``cli.py`` convention: ``register(subparsers)`` adds the parser with its handler.
register = add_parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--host", default="127.0.0.1", help="service host (default %(default)s)")
    target.add_argument(
        "--port", type=int, default=5027, help="service TCP port (default %(default)s)"
    )
    target.add_argument("--udp", action="store_true", help="send UDP datagrams instead of TCP")
    target.add_argument("--udp-port", type=int, default=None, help="service UDP port")

    load = parser.add_argument_group("load")
    load.add_argument("--devices", type=int, default=1, metavar="N", help="devices (default 1)")
    load.add_argument(
        "--records", type=int, default=10, metavar="K", help="records per packet (default 10)"
    )
    load.add_argument(
        "--codec",
        choices=("8", "8E", "16", "mix"),
        default="8E",
        help="AVL codec; mix: devices take turns 8, 8E, 16 (default %(default)s)",
    )
    load.add_argument(
        "--ios",
        type=int,
        default=22,
        metavar="N",
        help="IO elements per record, as a typical FMB setup: 1/2/4/8-byte values (default 22)",
    )
    load.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="PKT_PER_S",
        help="packets per second per device; 0 = back-to-back (default 0)",
    )
    load.add_argument(
        "--duration", type=float, default=None, metavar="S", help="send for S s after ramp-up"
    )
    load.add_argument(
        "--packets",
        type=int,
        default=None,
        metavar="N",
        help="packets per device (0: handshake only, stay connected until --duration ends)",
    )
    load.add_argument(
        "--ramp-up", type=float, default=0.0, metavar="S", help="spread connects over S s"
    )
    load.add_argument(
        "--imei-base",
        default="35000000000000",
        metavar="DIGITS",
        help="device i's IMEI: the 14 digits base + i, then a Luhn check digit "
        "(a 15-digit value loses its last digit; default %(default)s)",
    )
    load.add_argument(
        "--answer-commands", action="store_true", help="answer Codec 12/14 GPRS commands"
    )
    load.add_argument(
        "--ack-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="no ACK within S s: reconnect and resend (default 10)",
    )
    load.add_argument(
        "--reconnect-delay",
        type=float,
        default=1.0,
        metavar="S",
        help="mean delay before reconnecting (default 1)",
    )
    load.add_argument(
        "--max-time",
        type=float,
        default=None,
        metavar="S",
        help="hard stop of the whole run (default: ramp-up + duration + ack timeout + 30 s; "
        "600 s with --packets alone)",
    )
    load.add_argument(
        "--source-addresses",
        type=int,
        default=0,
        metavar="N",
        help="bind device i to loopback address i %% N (127.0.1.1, 127.0.1.2, ...): each "
        "address has its own ephemeral ports, so one host can open more than ~28,000 "
        "connections to one service port (0: the kernel picks; default %(default)s)",
    )
    load.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="split the devices over N simulator processes and merge their summaries",
    )
    load.add_argument("--seed", type=int, default=1, help="random seed of the packet contents")

    replay = parser.add_argument_group("replay")
    replay.add_argument("--replay", metavar="FILE", help="play hex frames from FILE (- = stdin)")
    replay.add_argument("--imei", help="IMEI for the replay handshake (default: from --imei-base)")
    replay.add_argument(
        "--replay-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="pause between lines, after the answers (default 0)",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="summary as one JSON object on stdout")
    output.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    output.add_argument(
        "--ack-log",
        metavar="FILE",
        help="append every ACKed record to FILE (JSON lines: imei, record timestamps, ACK "
        "time), for teltonika-ingest verify",
    )
    output.add_argument(
        "--progress-interval", type=float, default=1.0, metavar="S", help=argparse.SUPPRESS
    )
    # Set by --processes for its children.
    output.add_argument("--progress-json", action="store_true", help=argparse.SUPPRESS)
    output.add_argument("--first-device", type=int, default=0, help=argparse.SUPPRESS)
    output.add_argument("--total-devices", type=int, default=None, help=argparse.SUPPRESS)


# --------------------------------------------------------------------------- helpers


def _imei_base(text: str) -> int:
    digits = text.strip()
    if not digits.isdigit() or len(digits) not in (14, 15):
        raise ValueError(f"--imei-base must be 14 (or 15) digits, got {text!r}")
    return int(digits[:14])


def _config(args: argparse.Namespace) -> Any:
    from teltonika_ingest.sim.traffic import SimConfig

    config = SimConfig(
        host=args.host,
        port=args.port,
        devices=args.devices,
        records=args.records,
        codec=args.codec,
        ios=args.ios,
        rate=args.rate,
        duration=args.duration,
        packets=args.packets,
        ramp_up=args.ramp_up,
        udp=args.udp,
        udp_port=args.udp_port,
        answer_commands=args.answer_commands,
        imei_base=_imei_base(args.imei_base),
        ack_timeout=args.ack_timeout,
        reconnect_delay=args.reconnect_delay,
        max_time=args.max_time,
        seed=args.seed,
        progress_interval=args.progress_interval,
        first_device=args.first_device,
        total_devices=args.total_devices,
        source_addresses=args.source_addresses,
    )
    config.validate()
    return config


def _raise_fd_limit(wanted: int) -> None:
    """Many devices need many sockets: lift the soft limit towards the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _fmt_progress(p: dict[str, Any]) -> str:
    return (
        f"[{p['t']:7.1f}s] connected {p['connected']:>6}/{p['devices']:<6} "
        f"acked {p['packets_acked']:>10,} pkts {p['records_acked']:>11,} rec  "
        f"{p['records_per_s']:>9,.0f} rec/s {p['packets_per_s']:>8,.0f} pkt/s  "
        f"p99 {p['p99_ms']:6.1f} ms  reconnects {p['reconnects']}  errors {p['errors']}"
    )


def format_summary(s: dict[str, Any]) -> str:
    lat = s["ack_latency_ms"]
    steady = s["steady_ack_latency_ms"]
    rate = s["rate_per_device"]
    lines = [
        f"{s['devices']} {s['mode'].upper()} devices ({s['processes']} process"
        f"{'es' if s['processes'] != 1 else ''}), Codec {s['codec']}, "
        f"{s['records_per_packet']} records x {s['ios_per_record']} IOs per packet "
        f"({'/'.join(str(b) for b in s['frame_bytes'])} bytes), "
        + (f"{rate:g} packets/s per device" if rate else "back-to-back"),
        f"  elapsed {s['elapsed_s']:.1f} s, measured window {s['window_s']:.1f} s"
        + (" (INCOMPLETE)" if s["incomplete"] else ""),
        f"  packets sent {s['packets_sent']:,} (resends {s['resends']:,}), "
        f"ACKed {s['packets_acked']:,}",
        f"  records sent {s['records_sent']:,}, ACKed {s['records_acked']:,}",
        f"  throughput   {s['records_per_s']:,.0f} records/s, {s['packets_per_s']:,.0f} packets/s",
        f"  ACK latency  p50 {lat['p50']:.2f} ms  p95 {lat['p95']:.2f} ms  "
        f"p99 {lat['p99']:.2f} ms  max {lat['max']:.2f} ms  (n={lat['count']:,})",
        f"  steady       p50 {steady['p50']:.2f} ms  p95 {steady['p95']:.2f} ms  "
        f"p99 {steady['p99']:.2f} ms  max {steady['max']:.2f} ms  (n={steady['count']:,})",
        f"  connects {s['connects']:,}, reconnects {s['reconnects']:,}, "
        f"late sends {s['late_sends']:,}, commands received {s['commands_received']:,} "
        f"answered {s['commands_answered']:,}",
        f"  errors {s['errors_total']:,}"
        + (": " + ", ".join(f"{k} {v:,}" for k, v in s["errors"].items()) if s["errors"] else ""),
    ]
    return "\n".join(lines)


def _public(summary: dict[str, Any], keep_histograms: bool) -> dict[str, Any]:
    if keep_histograms:
        return summary
    return {k: v for k, v in summary.items() if k not in ("histogram", "steady_histogram")}


def _exit_status(summary: dict[str, Any]) -> int:
    return 1 if summary["incomplete"] or summary["errors_total"] else 0


# --------------------------------------------------------------------------- load, one process


def _run_load(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    from teltonika_ingest.sim.simulation import Simulation

    config = _config(args)
    _raise_fd_limit(config.devices * 2 + 64)

    def progress(p: dict[str, Any]) -> None:
        if args.progress_json:
            err.write(json.dumps({"progress": p}) + "\n")
        else:
            err.write(_fmt_progress(p) + "\n")
        err.flush()

    ack_log: Any = None
    on_ack = None
    if getattr(args, "ack_log", None):
        from teltonika_ingest.sim.invariant import AckLogWriter

        ack_log = AckLogWriter(args.ack_log)

        def on_ack(imei: str, first_ts: int, count: int) -> None:
            ack_log.write(imei, range(first_ts, first_ts + count))

    sim = Simulation(
        config, reactor=reactor, progress=None if args.quiet else progress, on_ack=on_ack
    )
    result: dict[str, Any] = {}

    def done(summary: dict[str, Any]) -> None:
        result.update(summary)

    def failed(failure: Any) -> None:
        err.write(f"error: {failure.getErrorMessage()}\n")

    def start() -> None:
        d = sim.run()
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())

    interrupts = []

    def on_signal(signum: int, frame: Any) -> None:
        interrupts.append(signum)
        if len(interrupts) == 1:
            err.write("interrupted: stopping (again to abort)\n")
            reactor.callFromThread(sim.stop)
        else:
            reactor.callFromThread(reactor.stop)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        reactor.callWhenRunning(start)
        reactor.run(installSignalHandlers=False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ack_log is not None:
            ack_log.close()
    if not result:
        err.write("error: the simulation did not finish\n")
        return 1
    if args.json:
        out.write(json.dumps(_public(result, args.progress_json)) + "\n")
    else:
        out.write(format_summary(result) + "\n")
    out.flush()
    return _exit_status(result)


# --------------------------------------------------------------------------- load, N processes


def _child_argv(args: argparse.Namespace, first: int, count: int, total: int) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "teltonika_ingest.cli.simulate",
        "--host", args.host,
        "--port", str(args.port),
        "--devices", str(count),
        "--records", str(args.records),
        "--codec", args.codec,
        "--ios", str(args.ios),
        "--rate", repr(args.rate),
        "--ramp-up", repr(args.ramp_up),
        "--imei-base", args.imei_base,
        "--ack-timeout", repr(args.ack_timeout),
        "--reconnect-delay", repr(args.reconnect_delay),
        "--seed", str(args.seed),
        "--progress-interval", repr(args.progress_interval),
        "--first-device", str(first),
        "--source-addresses", str(args.source_addresses),
        "--total-devices", str(total),
        "--json",
        "--progress-json",
    ]  # fmt: skip
    if args.duration is not None:
        argv += ["--duration", repr(args.duration)]
    if args.packets is not None:
        argv += ["--packets", str(args.packets)]
    if args.max_time is not None:
        argv += ["--max-time", repr(args.max_time)]
    if args.udp:
        argv += ["--udp"]
    if args.udp_port is not None:
        argv += ["--udp-port", str(args.udp_port)]
    if args.answer_commands:
        argv += ["--answer-commands"]
    if args.quiet:
        argv += ["--quiet"]
    if args.ack_log:
        argv += ["--ack-log", args.ack_log]  # whole lines, O_APPEND: processes share it
    return argv


def _run_processes(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from teltonika_ingest.sim.stats import merge_summaries

    _config(args)  # validate before forking anything
    n = max(1, min(args.processes, args.devices or 1))
    total = args.devices
    bounds = [(total * i // n, total * (i + 1) // n) for i in range(n)]
    procs = [
        subprocess.Popen(
            _child_argv(args, first, end - first, total),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        for first, end in bounds
    ]
    selector = selectors.DefaultSelector()
    stdout_of: dict[int, bytes] = {i: b"" for i in range(n)}
    partial: dict[tuple[int, str], bytes] = {}
    latest: dict[int, dict[str, Any]] = {}
    for i, proc in enumerate(procs):
        assert proc.stdout is not None and proc.stderr is not None
        selector.register(proc.stdout, selectors.EVENT_READ, (i, "out"))
        selector.register(proc.stderr, selectors.EVENT_READ, (i, "err"))
    open_pipes = 2 * n
    last_print = time.monotonic()
    forwarded_signal: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        forwarded_signal.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if len(forwarded_signal) == 1 else signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while open_pipes:
            for key, _ in selector.select(timeout=0.5):
                i, kind = key.data
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    open_pipes -= 1
                    continue
                if kind == "out":
                    stdout_of[i] += chunk
                    continue
                data = partial.pop((i, kind), b"") + chunk
                *lines, rest = data.split(b"\n")
                if rest:
                    partial[(i, kind)] = rest
                for line in lines:
                    try:
                        latest[i] = json.loads(line)["progress"]
                    except (ValueError, KeyError, TypeError):
                        err.write(f"[process {i}] {line.decode(errors='replace')}\n")
            now = time.monotonic()
            if latest and now - last_print >= args.progress_interval and not args.quiet:
                last_print = now
                err.write(_fmt_progress(_merge_progress(list(latest.values()), total)) + "\n")
                err.flush()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    summaries = []
    for i, proc in enumerate(procs):
        text = stdout_of[i].decode(errors="replace").strip()
        try:
            summaries.append(json.loads(text.splitlines()[-1]))
        except (ValueError, IndexError):
            err.write(f"error: simulator process {i} gave no summary (exit {proc.returncode})\n")
            return 1
    merged = merge_summaries(summaries)
    if args.json:
        out.write(json.dumps(_public(merged, False)) + "\n")
    else:
        out.write(format_summary(merged) + "\n")
    out.flush()
    return _exit_status(merged)


def _merge_progress(parts: list[dict[str, Any]], total: int) -> dict[str, Any]:
    merged: dict[str, Any] = {"t": max(p["t"] for p in parts), "devices": total}
    for key in ("connected", "packets_acked", "records_acked", "reconnects", "errors"):
        merged[key] = sum(p[key] for p in parts)
    for key in ("packets_per_s", "records_per_s"):
        merged[key] = sum(p[key] for p in parts)
    merged["p99_ms"] = max(p["p99_ms"] for p in parts)  # an upper bound of the merged p99
    return merged


# --------------------------------------------------------------------------- replay


def _run_replay(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from twisted.internet import defer
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    from teltonika_ingest.sim.replay import parse_replay, replay
    from teltonika_ingest.sim.traffic import imei_for

    if args.replay == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.replay, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            err.write(f"error: --replay {args.replay}: {exc.strerror}\n")
            return 1
    try:
        items = parse_replay(text, udp=args.udp)
    except ValueError as exc:
        err.write(f"error: {args.replay}: {exc}\n")
        return 1
    if not items:
        err.write(f"error: {args.replay}: no hex lines\n")
        return 1
    imei = args.imei or imei_for(_imei_base(args.imei_base), 0)
    port = args.udp_port if args.udp else args.port
    if port is None:
        err.write("error: --udp needs --udp-port\n")
        return 1

    def report(r: dict[str, Any]) -> None:
        if args.json:
            return
        if r.get("line") is None:
            out.write(f"server: {r['got']}" + (" (answered)" if r.get("answered") else "") + "\n")
        else:
            status = "ok" if r["ok"] else "UNEXPECTED"
            ms = f"  {r['ms']:.1f} ms" if "ms" in r else ""
            out.write(f"line {r['line']:>4}: {r['what']} -> {r['got']}{ms}  {status}\n")
        out.flush()

    result: dict[str, Any] = {}

    def start() -> None:
        d = defer.ensureDeferred(
            replay(
                items,
                host=args.host,
                port=port,
                imei=imei,
                udp=args.udp,
                ack_timeout=args.ack_timeout,
                answer_commands=args.answer_commands,
                interval=args.replay_interval,
                reactor=reactor,
                report=report,
            )
        )
        d.addCallback(result.update)
        d.addErrback(lambda f: err.write(f"error: {f.getErrorMessage()}\n"))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not result:
        return 1
    if args.json:
        out.write(json.dumps(result) + "\n")
    elif result["closed_by_server"]:
        out.write(f"server closed the connection: {result['close_reason']}\n")
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------- entry points


def run(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        if args.replay:
            return _run_replay(args, out, err)
        if args.processes > 1:
            return _run_processes(args, out, err)
        return _run_load(args, out, err)
    except ValueError as exc:
        err.write(f"error: {exc}\n")
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="teltonika-ingest simulate",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
