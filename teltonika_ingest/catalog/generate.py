"""Generate the IO catalogue (``avl_io.json``) from the vendor's per-model AVL ID tables.

    python -m teltonika_ingest.catalog.generate            # rewrite avl_io.json
    python -m teltonika_ingest.catalog.generate --check    # exit 1 if it is out of date

Input: ``vendor/teltonika-avl-io-elements.csv`` (a copy, kept in the repository with its
licence notice beside it): the vendor's published AVL ID tables (Teltonika wiki, "FMB AVL
ID", "FMX640 AVL ID", "... Parameters ID"), one row per (id, meaning), collected by the
open-source project alim-zanibekov/teltonika (``tools/io_elements_dump.csv``, MIT licence).
The vendor reuses ids with other meanings on other models: such an id has several
*variants* here, each with the models it applies to; no model has two variants of one id.

What the script decides (everything else is copied as the vendor wrote it):

* ``key``: the name in snake case, the key of the payload's ``io`` object. Where one model
  has two ids whose names give the same key (``Battery Voltage`` 67 and 168 on FMB920), every
  id but the lowest takes an ``_<id>`` suffix, so a key names one id on every model.
* ``multiplier``: ``null`` where the value is used as sent: the table's 1, and its 0 or
  nothing (how the source renders the vendor's "-"); otherwise the number.
* ``size``: ``null`` for the variable-length elements (the table's -1).
* ``min``/``max``: in order where the table has them backwards (LTE RSRQ: -3 .. -20).
* ``values``: the value meanings the description lists one a line (``0 - Ignition Off``,
  ``if 850 - Sensor not ready``, with a hyphen or an en or em dash), keyed by the raw
  value as a decimal string; lines that run several meanings together (a lost line break
  in the source) are left out rather than guessed at.
* ``common``: the ids documented for every family (model prefix: FMB, FMC, TAT ...) with one
  and the same meaning everywhere (name, size, type, multiplier, unit, value meanings): what
  a device of unknown model is named with.

Runs at development time only: nothing reads the CSV at run or test time except the test
that checks the committed ``avl_io.json`` is what this script makes of it.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
SOURCE = HERE / "vendor" / "teltonika-avl-io-elements.csv"
OUTPUT = HERE / "avl_io.json"

TYPES = {"Unsigned": "unsigned", "Signed": "signed", "Hex": "hex", "ASCII": "ascii"}
_DASH = "[\u2013\u2014-]"  # en dash, em dash, hyphen: the vendor uses all three
_VALUE_LINE = re.compile(rf"^\s*(?:if\s+)?(-?\d+)\s*{_DASH}\s*(\S.*?)\s*$", re.IGNORECASE)
_RUN_TOGETHER = re.compile(rf"\S\d+\s*{_DASH}\s*\S")
_FAMILY = re.compile(r"[A-Z]+")


def family_of(model: str) -> str:
    """The model's family: its letter prefix (``FMB920`` -> ``FMB``, ``GH5200`` -> ``GH``)."""
    match = _FAMILY.match(model)
    return match.group() if match else model


def snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def value_meanings(description: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in description.splitlines():
        match = _VALUE_LINE.match(line)
        if match is None:
            continue
        raw, text = match.groups()
        if _RUN_TOGETHER.search(text) or raw in values:
            continue
        values[str(int(raw))] = text
    return values


def multiplier(text: str) -> int | float | None:
    value = number(text) if text.strip() else 0
    return None if value in (0, 1) else value


def build(rows: list[dict[str, str]]) -> dict[str, Any]:
    model_sets: list[tuple[str, ...]] = []
    set_index: dict[tuple[str, ...], int] = {}
    variants_by_id: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        models = tuple(sorted({m.strip() for m in row["SupportedModels"].split(",") if m.strip()}))
        if models not in set_index:
            set_index[models] = len(model_sets)
            model_sets.append(models)
        size = int(row["NumBytes"])
        low, high = sorted((number(row["Min"]), number(row["Max"])))
        unit = row["Units"].strip() or None
        variants_by_id[int(row["Id"])].append(
            {
                "name": row["Name"].strip(),
                "key": snake(row["Name"]),
                "size": None if size < 0 else size,
                "type": TYPES[row["Type"]],
                "min": low,
                "max": high,
                "multiplier": multiplier(row["Multiplier"]),
                "unit": unit,
                "values": value_meanings(row["Description"]),
                "description": row["Description"].strip(),
                "group": row["Groups"].strip(),
                "models": set_index[models],
            }
        )
    _disambiguate_keys(variants_by_id, model_sets)
    all_models = sorted({m for s in model_sets for m in s})
    families: dict[str, list[str]] = defaultdict(list)
    for model in all_models:
        families[family_of(model)].append(model)
    common = _common_ids(variants_by_id, model_sets, set(families))
    return {
        "source": (
            "Teltonika's published per-model AVL ID tables (wiki.teltonika-gps.com), as "
            "collected by alim-zanibekov/teltonika tools/io_elements_dump.csv (MIT licence, "
            "avl_io.LICENSE); generated by teltonika_ingest/catalog/generate.py"
        ),
        "models": all_models,
        "families": dict(sorted(families.items())),
        "model_sets": [list(s) for s in model_sets],
        "common": common,
        "elements": [
            {"id": io_id, "variants": variants}
            for io_id, variants in sorted(variants_by_id.items())
        ],
    }


def _disambiguate_keys(
    variants_by_id: dict[int, list[dict[str, Any]]], model_sets: list[tuple[str, ...]]
) -> None:
    # (model, key) -> ids with that key on that model
    ids_of: dict[tuple[str, str], set[int]] = defaultdict(set)
    for io_id, variants in variants_by_id.items():
        for v in variants:
            for model in model_sets[v["models"]]:
                ids_of[(model, v["key"])].add(io_id)
    for io_id, variants in variants_by_id.items():
        for v in variants:
            if any(min(ids_of[(model, v["key"])]) < io_id for model in model_sets[v["models"]]):
                v["key"] = f"{v['key']}_{io_id}"


_MEANING = ("name", "size", "type", "multiplier", "unit", "values")


def _common_ids(
    variants_by_id: dict[int, list[dict[str, Any]]],
    model_sets: list[tuple[str, ...]],
    families: set[str],
) -> list[int]:
    common = []
    for io_id, variants in sorted(variants_by_id.items()):
        meanings = {
            json.dumps([v[k] if k != "name" else v[k].lower() for k in _MEANING], sort_keys=True)
            for v in variants
        }
        covered = {family_of(m) for v in variants for m in model_sets[v["models"]]}
        if len(meanings) == 1 and covered == families and len({v["key"] for v in variants}) == 1:
            common.append(io_id)
    return common


def render(catalogue: dict[str, Any]) -> str:
    return json.dumps(catalogue, ensure_ascii=False, indent=0, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if avl_io.json is stale")
    args = parser.parse_args(argv)
    with SOURCE.open(newline="", encoding="utf-8") as f:
        text = render(build(list(csv.DictReader(f))))
    if args.check:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is out of date: run python -m teltonika_ingest.catalog.generate")
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
