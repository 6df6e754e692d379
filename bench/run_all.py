"""Every benchmark, medians of several runs, tables into BENCHMARKS.md.

``python -m bench.run_all [--quick] [--repeat N] [--only NAME,...] [--output FILE]``

Runs ``bench.decode`` (codec throughput), the ceilings (Redis XADD with redis-benchmark;
the simulator against the ACK-only ``bench.sink``) and the end-to-end scenarios of
``bench.e2e`` (the service as a real ``twistd`` process with a real Redis on loopback),
each ``--repeat`` times (default 3; ``--quick``: 1 run of smaller, shorter scenarios,
about 3 minutes). Before each run it waits (up to ``--quiet-wait`` s) for the machine to
be nearly idle, and records what else was running.

BENCHMARKS.md is updated section by section, between ``<!-- bench:NAME:begin -->`` and
``<!-- bench:NAME:end -->`` markers; everything outside the markers (hand-written
sections, other engineers' tables) is kept. The Decode section is only written where
its markers already are, or when the file has no "Decode" heading yet.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import e2e

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "BENCHMARKS.md"

CEILINGS = ("redis-xadd", "sink10", "sink1")
SERVICE = ("b2b10", "b2b10-1000", "b2b1", "paced", "scale", "idle")
ALL = (*CEILINGS, *SERVICE)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    versions = {"python": platform.python_version()}
    for dist in ("twisted", "txredisapi", "orjson", "prometheus-client", "fastcrc"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "-"
    redis = shutil.which("redis-server")
    if redis:
        out = subprocess.run([redis, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"v=(\S+)", out)
        versions["redis-server"] = match.group(1) if match else out.strip()
    commit = "-"
    with_git = shutil.which("git")
    if with_git:
        rev = subprocess.run(
            [with_git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
        if rev.returncode == 0:
            commit = rev.stdout.strip()
            dirty = subprocess.run(
                [with_git, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                cwd=ROOT,
            ).stdout.strip()
            untracked = subprocess.run(
                [with_git, "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT
            ).stdout.strip()
            if dirty or untracked:
                commit += " + uncommitted changes"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "versions": versions,
        "commit": commit,
    }


# --------------------------------------------------------------------------- running


def run_decode(repeat: int, quick: bool) -> dict[str, Any] | None:
    argv = [sys.executable, "-m", "bench.decode", "--json", "--repeat", str(repeat)]
    if quick:
        argv += ["--seconds", "0.1"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        log(f"bench.decode failed: {proc.stderr[-500:]}")
        return None
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def run_scenarios(
    names: list[str], repeat: int, quick: bool, quiet_wait: float, processes: int
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        runs = []
        for index in range(repeat):
            busy = e2e.wait_for_quiet(quiet_wait, log=log)
            result = e2e.run_many(name, 1, quick=quick, processes=processes)["runs"][0]
            result["busy_before"] = busy
            runs.append(result)
            log(f"{name} {index + 1}/{repeat}: {e2e.one_line(name, result)}")
        scenario = e2e.SCENARIOS[name]
        results[name] = {
            "scenario": name,
            "title": scenario.title,
            "target": scenario.target,
            "sim": e2e._effective(scenario, quick, {}),
            "runs": runs,
        }
    return results


# --------------------------------------------------------------------------- tables


def med(result: dict[str, Any] | None, *path: str) -> float:
    if not result:
        return float("nan")
    return e2e.median_of(result["runs"], *path)


def spread(result: dict[str, Any] | None, *path: str, fmt: str = "{:,.0f}") -> str:
    if not result:
        return "-"
    values = []
    for run in result["runs"]:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(float(value))
    if len(values) < 2:
        return ""
    return f"{fmt.format(min(values))} - {fmt.format(max(values))}"


def _n(value: float, fmt: str = "{:,.0f}") -> str:
    return "-" if value != value else fmt.format(value)  # NaN -> "-"


def _ok(met: bool | None) -> str:
    return "-" if met is None else ("**met**" if met else "**not met**")


def _sim_command(result: dict[str, Any]) -> str:
    sim = result["sim"]
    parts = ["teltonika-ingest simulate --port PORT"]
    for key, value in sim.items():
        if key == "requests":
            continue
        parts.append(f"--{key} {value}")
    return " ".join(parts)


def e2e_section(
    env: dict[str, Any], results: dict[str, dict[str, Any]], args: argparse.Namespace
) -> str:
    r = results.get
    repeat = args.repeat
    lines = [
        "## End to end (service + Redis + simulator on one machine)",
        "",
        f"Generated by `python -m bench.run_all{' --quick' if args.quick else ''}"
        f"{f' --repeat {repeat}' if repeat != 3 else ''}` on {env['date']}. "
        f"Medians of {repeat} run{'s' if repeat != 1 else ''} (range min - max in the detail "
        "table); every run starts a fresh `redis-server` (loopback, no persistence) and the "
        "service as a real process (`twistd -n teltonika-ingest --redis-url ... --listen "
        "tcp:PORT:interface=127.0.0.1 --metrics tcp:PORT:interface=127.0.0.1`, every other "
        "option at its default), then runs the simulator as its own process.",
        "",
        *(
            ["Combined from separate runs of `bench.run_all` (same machine and options):", ""]
            + [f"* {source}" for source in args.sources]
            + [""]
            if len(getattr(args, "sources", [])) > 1
            else []
        ),
        f"Machine: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB, Linux "
        f"{env['kernel']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + f". Commit {env['commit']}.",
        "",
        "Service, Redis and simulator share the 2 cores. Packets: Codec 8E, 22 IO elements "
        "per record (9 x 1-byte, 7 x 2-byte, 4 x 4-byte, 2 x 8-byte: ignition, movement, GSM "
        "signal, speed, external/battery voltage, odometer, iButton, ICCID, ...), 1,385 bytes "
        "for 10 records. Latency = from the simulator's write of a packet to the arrival of its "
        "ACK (after Redis confirmed the records), steady window only (after the ramp-up).",
        "",
    ]
    b2b10, b2b1k, b2b1 = r("b2b10"), r("b2b10-1000"), r("b2b1")
    paced, scale, idle = r("paced"), r("scale"), r("idle")
    xadd, sink10, sink1 = r("redis-xadd"), r("sink10"), r("sink1")

    def met(value: float, ok: Any) -> bool | None:
        return None if value != value else bool(ok(value))

    rec10 = med(b2b10, "summary", "records_per_s")
    rec10k = med(b2b1k, "summary", "records_per_s")
    pkt1 = med(b2b1, "summary", "packets_per_s")
    p99_paced = med(paced, "summary", "steady_ack_latency_ms", "p99")
    p99_scale = med(scale, "summary", "steady_ack_latency_ms", "p99")
    rss_scale = med(scale, "service", "rss_peak_mib")
    lines += [
        "### Targets",
        "",
        "| target | measured (median) | result |",
        "|---|---:|---|",
        f"| >= 50,000 records/s, 10-record packets, 500 devices back-to-back | "
        f"{_n(rec10)} records/s | {_ok(met(rec10, lambda v: v >= 50_000))} |",
        f"| >= 50,000 records/s, 10-record packets, 1,000 devices back-to-back | "
        f"{_n(rec10k)} records/s | {_ok(met(rec10k, lambda v: v >= 50_000))} |",
        f"| >= 10,000 packets/s, 1-record packets, 500 devices back-to-back | "
        f"{_n(pkt1)} packets/s | {_ok(met(pkt1, lambda v: v >= 10_000))} |",
        f"| paced: {_devices(paced)} devices x "
        f"1 packet/s (10 records): p99 ACK latency <= 20 ms | {_n(p99_paced, '{:,.1f}')} ms | "
        f"{_ok(met(p99_paced, lambda v: v <= 20))} |",
        f"| scale: {_devices(scale)} devices x 1 packet / 10 s: p99 ACK latency <= 20 ms | "
        f"{_n(p99_scale, '{:,.1f}')} ms | {_ok(met(p99_scale, lambda v: v <= 20))} |",
        f"| scale: service RSS <= 128 MB | {_n(rss_scale, '{:,.0f}')} MiB (peak) | "
        f"{_ok(met(rss_scale, lambda v: v * 1.048576 <= 128))} |",
        "",
    ]
    results = [
        met(rec10, lambda v: v >= 50_000),
        met(rec10k, lambda v: v >= 50_000),
        met(pkt1, lambda v: v >= 10_000),
        met(p99_paced, lambda v: v <= 20),
        met(p99_scale, lambda v: v <= 20),
        met(rss_scale, lambda v: v * 1.048576 <= 128),
    ]
    if all(results):
        lines += [
            "Every target met in this run. Where the service's time goes, and what changed to "
            "get here: [docs/profile.md](docs/profile.md).",
            "",
        ]
    else:
        lines += [
            "Where the service's time goes, why a target was missed in this run and what would "
            'reach it: [docs/profile.md](docs/profile.md) (check "machine busy before" '
            "below first: the figures need a quiet machine).",
            "",
        ]
    if args.quick:
        lines += [
            "*Quick mode: shorter runs and fewer devices in the scale and idle scenarios; "
            "not the reference numbers.*",
            "",
        ]
    # ---- ceilings
    xadd_rate = med(xadd, "summary", "xadd_per_s")
    sink10_rec = med(sink10, "summary", "records_per_s")
    sink1_pkt = med(sink1, "summary", "packets_per_s")

    def frac(a: float, b: float) -> str:
        return "-" if a != a or b != b or not b else f"{100 * a / b:.1f} %"

    lines += [
        "### Ceilings measured in the same run, and the service as a fraction of them",
        "",
        "| ceiling | rate (median) | service (median) | service / ceiling |",
        "|---|---:|---:|---:|",
        f"| Redis XADD, one record entry (~{_n(med(xadd, 'summary', 'payload_bytes'))}-byte "
        f"payload), `redis-benchmark -P 16 -c 50` | {_n(xadd_rate)} XADD/s | "
        f"{_n(rec10)} records/s (b2b10) | {frac(rec10, xadd_rate)} |",
        f"| simulator vs ACK-only sink, 500 devices, 10-record packets | {_n(sink10_rec)} "
        f"records/s | {_n(rec10)} records/s | {frac(rec10, sink10_rec)} |",
        f"| simulator vs ACK-only sink, 500 devices, 1-record packets | {_n(sink1_pkt)} "
        f"packets/s | {_n(pkt1)} packets/s | {frac(pkt1, sink1_pkt)} |",
        "",
        "The sink (`bench/sink.py`) answers the handshake and each frame's record count without "
        "decoding: what the simulator and the loopback network can do on this machine with the "
        "sink taking a share of the CPU (the service takes that share in the real runs).",
        "",
    ]
    # ---- detail
    lines += [
        "### Detail (medians; range over the runs)",
        "",
        "| scenario | records/s | packets/s | ACK p50 / p95 / p99 / max (ms) | errors | "
        "service RSS peak | CPU: service / Redis / simulator / others (% of a core) |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for name in ("b2b10", "b2b10-1000", "b2b1", "paced", "scale", "sink10", "sink1"):
        res = r(name)
        if not res:
            continue
        lat = ("summary", "steady_ack_latency_ms")
        cpu = res["runs"][0]["cpu"]
        cpu_keys = (
            ("service", "redis", "simulator", "other")
            if "service" in cpu
            else ("sink", "simulator", "other")
        )
        cpu_text = " / ".join(_n(100 * med(res, "cpu", k), "{:.0f}") for k in cpu_keys)
        if "sink" in cpu:  # no service here: name the columns
            cpu_text = " / ".join(
                f"{k} {_n(100 * med(res, 'cpu', k), '{:.0f}')}" for k in cpu_keys
            ).replace("other ", "others ")
        rss = _n(med(res, "service", "rss_peak_mib"), "{:,.0f} MiB") if "service" in cpu else "-"
        rng = spread(res, "summary", "records_per_s")
        lines.append(
            f"| {name}: {res['title']} | {_n(med(res, 'summary', 'records_per_s'))}"
            + (f" ({rng})" if rng else "")
            + f" | {_n(med(res, 'summary', 'packets_per_s'))} | "
            + " / ".join(_n(med(res, *lat, q), "{:.2f}") for q in ("p50", "p95", "p99"))
            + f" / {_n(med(res, *lat, 'max'), '{:.1f}')} | "
            f"{_n(med(res, 'summary', 'errors_total'))} | {rss} | {cpu_text} |"
        )
    lines.append("")
    # ---- memory
    if idle or scale:
        lines += [
            "### Memory",
            "",
            "| measurement | value (median) |",
            "|---|---:|",
        ]
        if idle:
            lines += [
                f"| idle: service RSS before connections | "
                f"{_n(med(idle, 'idle', 'rss_idle_mib'), '{:,.1f}')} MiB |",
                f"| idle: service RSS with {_n(med(idle, 'idle', 'connections'))} idle "
                f"connections (handshake done, registered) | "
                f"{_n(med(idle, 'idle', 'rss_connected_mib'), '{:,.1f}')} MiB |",
                f"| **memory per idle connection** | "
                f"**{_n(med(idle, 'idle', 'bytes_per_connection'))} bytes** |",
            ]
        if scale:
            lines += [
                f"| scale ({_devices(scale)} devices, 1 packet / 10 s): RSS at start | "
                f"{_n(med(scale, 'service', 'rss_start_mib'), '{:,.1f}')} MiB |",
                f"| scale: RSS peak (VmHWM) | "
                f"{_n(med(scale, 'service', 'rss_peak_mib'), '{:,.1f}')} MiB |",
            ]
        lines.append("")
    # ---- runs
    lines += [
        "### Every run",
        "",
        "| scenario | run | result | machine busy before (cores) |",
        "|---|---:|---|---:|",
    ]
    for name in ALL:
        res = r(name)
        if not res:
            continue
        for index, run in enumerate(res["runs"], start=1):
            lines.append(
                f"| {name} | {index} | {e2e.one_line(name, run)} | "
                f"{run.get('busy_before', 0):.2f} |"
            )
    lines += ["", "### Reproduce", "", "```sh", ". .venv/bin/activate"]
    lines.append(
        "python -m bench.run_all            # everything, 3 runs each (~15 min); --quick: ~3 min"
    )
    lines.append("python -m bench.e2e --list         # the scenarios")
    lines.append("python -m bench.e2e b2b10 --repeat 3 --profile /tmp/prof   # one, with py-spy")
    lines.append("```")
    lines += ["", "Simulator command of each scenario (PORT = the service's device port):", ""]
    for name in ALL:
        res = r(name)
        if not res or name == "redis-xadd":
            continue
        lines.append(f"* {name}: `{_sim_command(res)}`")
    if xadd:
        lines.append(
            "* redis-xadd: `redis-benchmark -p PORT -n "
            f"{_n(med(xadd, 'summary', 'requests'), '{:.0f}')} -c 50 -P 16 XADD "
            "telemetry:teltonika MAXLEN ~ 1000000 * imei ... codec 8E ts ... payload <json>`"
        )
    lines.append("")
    return "\n".join(lines)


def _devices(result: dict[str, Any] | None) -> str:
    if not result:
        return "-"
    return f"{int(result['sim'].get('devices', 0)):,}"


def decode_section(report: dict[str, Any]) -> str:
    from bench.decode import table

    return "\n".join(
        [
            "## Decode",
            "",
            f"`python -m bench.decode --repeat {report['repeat']}`: Python {report['python']}, "
            f"{report['records_per_frame']} records per frame, {report['io_per_record']} IOs per "
            f"record; median of {report['repeat']} runs x {report['seconds_per_repeat']} s.",
            "",
            table(report),
            "",
        ]
    )


# --------------------------------------------------------------------------- BENCHMARKS.md


def begin(name: str) -> str:
    return f"<!-- bench:{name}:begin -->"


def end(name: str) -> str:
    return f"<!-- bench:{name}:end -->"


def replace_section(text: str, name: str, body: str) -> str:
    """Put ``body`` between the markers of ``name`` (appended at the end if absent)."""
    block = f"{begin(name)}\n{body.rstrip()}\n{end(name)}"
    pattern = re.compile(re.escape(begin(name)) + r".*?" + re.escape(end(name)), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    if text and not text.endswith("\n"):
        text += "\n"
    return f"{text}\n{block}\n" if text else f"# Benchmarks\n\n{block}\n"


def may_write_decode(text: str) -> bool:
    if begin("decode") in text:
        return True
    return not re.search(r"^#+\s*Decode", text, re.MULTILINE | re.IGNORECASE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_all",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1 run of short scenarios (~3 min)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per scenario (3)")
    parser.add_argument("--only", default="", help="comma-separated scenarios (and/or decode)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="BENCHMARKS.md")
    parser.add_argument("--json-out", type=Path, help="also save every result as JSON here")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        metavar="S",
        help="wait up to S s for an idle machine before each run (default 120)",
    )
    parser.add_argument("--processes", type=int, default=1, help="simulator processes")
    parser.add_argument(
        "--no-write", action="store_true", help="print the sections instead of writing"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        action="append",
        metavar="FILE",
        help="write the tables from --json-out files of earlier runs (runs nothing; repeat "
        "to combine: a scenario in a later file replaces the same one in an earlier file)",
    )
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in ALL and n != "decode"]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)} (choose from decode, {', '.join(ALL)})")
    names = [n for n in ALL if not only or n in only]

    args.sources = []
    if args.from_json:
        results = {}
        decode = None
        for path in args.from_json:
            saved = json.loads(path.read_text())
            env = saved["environment"]
            decode = saved.get("decode") or decode
            results.update(saved["e2e"])
            args.sources.append(f"{', '.join(saved['e2e'])}: {env['date']}, commit {env['commit']}")
            args.quick = saved.get("quick", args.quick)
            args.repeat = saved.get("repeat", args.repeat)
    else:
        env = environment()
        log(f"{env['cpu']}, {env['cores']} cores; commit {env['commit']}")
        decode = None
        if not only or "decode" in only:
            log("bench.decode")
            decode = run_decode(args.repeat if not args.quick else 1, args.quick)
        results = run_scenarios(names, args.repeat, args.quick, args.quiet_wait, args.processes)

    if args.json_out and not args.from_json:
        args.json_out.write_text(
            json.dumps(
                {
                    "environment": env,
                    "decode": decode,
                    "e2e": results,
                    "quick": args.quick,
                    "repeat": args.repeat,
                },
                indent=2,
            )
        )
    sections: list[tuple[str, str]] = []
    if decode is not None:
        sections.append(("decode", decode_section(decode)))
    if results:
        if only and args.output.exists():
            log("--only: the e2e section is rewritten from this run's scenarios alone")
        sections.append(("e2e", e2e_section(env, results, args)))
    if args.no_write:
        for _, body in sections:
            print(body)
        return 0
    text = args.output.read_text() if args.output.exists() else ""
    for name, body in sections:
        if name == "decode" and not may_write_decode(text):
            log("BENCHMARKS.md has a hand-written Decode section: left as is; table below")
            print(body)
            continue
        text = replace_section(text, name, body)
    args.output.write_text(text)
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
