"""``teltonika-ingest io [ID|NAME] [--model M]`` through the real console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "teltonika-ingest"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "io", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_an_id_shows_every_meaning_with_its_models():
    result = run("389")
    assert result.returncode == 0, result.stderr
    heads = [line for line in result.stdout.splitlines() if line.startswith("389 ")]
    assert [h.split("  ")[1] for h in heads] == [
        "OBD OEM Total Mileage", "Manual CAN 19", "Button Click",
    ]  # fmt: skip
    assert "TAT100" in result.stdout and "FMB640" in result.stdout


def test_an_id_on_one_model_as_json():
    result = run("389", "--model", "tat100", "--format", "json")
    assert result.returncode == 0, result.stderr
    (line,) = [json.loads(x) for x in result.stdout.splitlines()]
    assert line["name"] == "Button Click" and "TAT100" in line["models"]
    volts = json.loads(run("66", "--model", "FMB920", "--format", "json").stdout)
    assert (volts["multiplier"], volts["unit"], volts["size"]) == (0.001, "V", 2)


def test_value_meanings_in_the_table():
    out = run("239", "--model", "FMB920").stdout
    assert "    0 = Ignition Off" in out and "    1 = Ignition On" in out


def test_by_name_and_a_model_listing():
    out = run("external voltage", "--format", "json").stdout.splitlines()
    assert {json.loads(x)["id"] for x in out} == {66}
    listing = run("--model", "FMB920", "--format", "json").stdout.splitlines()
    ids = [json.loads(x)["id"] for x in listing]
    assert 66 in ids and 389 in ids and len(ids) == len(set(ids))


def test_nothing_found_and_unknown_model():
    missing = run("65000")
    assert missing.returncode == 1
    assert missing.stderr == "error: no IO element '65000' in the catalogue\n"
    unknown = run("66", "--model", "FMX999")
    assert unknown.returncode == 1  # 66 is not common to all families
    assert unknown.stderr.startswith("warning: model 'FMX999' is not in the IO catalogue")
    common = run("239", "--model", "FMX999")
    assert common.returncode == 0 and "Ignition" in common.stdout


def test_families_overview():
    out = run().stdout
    assert out.startswith("FM: FM3001")
    assert "TAT: TAT100, TAT140, TAT141, TAT240" in out
