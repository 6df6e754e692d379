"""``teltonika-ingest io [ID|NAME] [--model M]``: look the IO catalogue up."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import orjson

from teltonika_ingest.catalog import Catalogue, Element, catalogue

DESCRIPTION = """\
What an AVL IO id means, from the vendor's per-model AVL ID tables (the package's IO
catalogue). The vendor reuses ids: without --model every documented meaning of an id is
shown, each with the models it applies to; with --model only that model's.

  io 66                 every meaning of id 66
  io 389 --model TAT100 id 389 on a TAT100
  io voltage            elements whose name contains "voltage"
  io --model FMB920     every id an FMB920 documents
  io                    the families and models the catalogue knows

An unknown model gets the ids common to all families only (as the stream's --io-names).
Exit status 1 when nothing matches.
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "io",
        help="look up what an AVL IO id (or name) means, per device model",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("query", nargs="?", metavar="ID|NAME", help="an IO id or (part of) a name")
    parser.add_argument("--model", help="device model, e.g. FMB920 (case-insensitive)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.set_defaults(handler=run)


def _as_dict(element: Element) -> dict[str, Any]:
    return {
        "id": element.id,
        "name": element.name,
        "key": element.key,
        "size": element.size,
        "type": element.type,
        "min": element.min,
        "max": element.max,
        "multiplier": element.multiplier,
        "unit": element.unit,
        "values": dict(element.values),
        "description": element.description,
        "group": element.group,
        "models": list(element.models),
    }


def _select(cat: Catalogue, query: str | None, model: str | None) -> list[Element]:
    view = cat.for_model(model) if model else None
    if query is None:
        assert view is not None
        return list(view.elements.values())
    if query.isdigit():
        io_id = int(query)
        if view is not None:
            element = view.get(io_id)
            return [] if element is None else [element]
        return list(cat.variants(io_id))
    found = cat.search(query)
    if view is not None:
        found = [e for e in found if view.get(e.id) is e]
    return found


def _models_line(element: Element, cat: Catalogue) -> str:
    families = sorted(
        {f for f, models in cat.families.items() if set(models) & set(element.models)}
    )
    return f"{', '.join(families)}: {', '.join(element.models)}"


def _range(element: Element) -> str:
    if element.min == element.max == 0:  # the vendor leaves the range blank
        return ""
    return f"  range {element.min}..{element.max}"


def _table(elements: list[Element], cat: Catalogue, out: TextIO) -> None:
    for element in elements:
        scale = f" x{element.multiplier}" if element.multiplier is not None else ""
        unit = f" {element.unit}" if element.unit else ""
        size = "variable" if element.size is None else f"{element.size} B"
        out.write(
            f"{element.id}  {element.name}  [{element.key}]  {size} {element.type}"
            f"{scale}{unit}{_range(element)}\n"
        )
        for raw, text in element.values.items():
            out.write(f"    {raw} = {text}\n")
        if element.description and not element.values:
            out.write(f"    {' '.join(element.description.split())[:200]}\n")
        out.write(f"    models ({element.group}) {_models_line(element, cat)}\n")


def run(
    args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    cat = catalogue()
    if args.model and cat.resolve(args.model) is None:
        stderr.write(
            f"warning: model {args.model!r} is not in the IO catalogue: only the ids common "
            "to all families\n"
        )
    if args.query is None and not args.model:
        if args.format == "json":
            line = {"families": {f: list(m) for f, m in cat.families.items()}}
            stdout.write(orjson.dumps(line).decode() + "\n")
        else:
            for family, models in cat.families.items():
                stdout.write(f"{family}: {', '.join(models)}\n")
            stdout.write(
                f"{sum(map(len, cat.elements.values()))} meanings of "
                f"{len(cat.elements)} ids; common to all families: {len(cat.common)}\n"
            )
        return 0
    elements = _select(cat, args.query, args.model)
    if not elements:
        where = f" on {args.model}" if args.model else ""
        stderr.write(f"error: no IO element {args.query!r}{where} in the catalogue\n")
        return 1
    if args.format == "json":
        for element in elements:
            stdout.write(orjson.dumps(_as_dict(element)).decode() + "\n")
    else:
        _table(elements, cat, stdout)
    return 0
