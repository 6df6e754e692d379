"""The IO catalogue: what each AVL IO id means on each device model (data + lookup).

The data is ``avl_io.json`` beside this module, generated from the vendor's per-model AVL ID
tables by ``generate.py`` (licence notice: ``avl_io.LICENSE``); it is read once, on first use,
never from the network. The vendor reuses ids: 389 is "OBD OEM Total Mileage" on an FMB920,
"Manual CAN 19" on an FMB640 and "Button Click" on a TAT100. Such an id has one
:class:`Element` per meaning, each with the models it applies to, and a lookup always goes
through a model (:meth:`Catalogue.for_model`). A device of unknown model is named with the
ids every family documents with one meaning (``common``) only; every other id stays raw.

``io_object(view, record)`` turns a decoded record's IO elements into the payload's ``io``
object (OPERATIONS.md, "IO catalogue"): ``{"external_voltage": {"id": 66, "value": 24.079,
"unit": "V"}, "ignition": {"id": 239, "value": 1, "text": "Ignition On"}, ...}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import attrs

from teltonika_ingest.codec.model import AvlRecord

__all__ = [
    "Catalogue",
    "Element",
    "ModelView",
    "catalogue",
    "io_entry",
    "io_object",
    "io_value",
    "unknown_ids",
]

DATA = Path(__file__).parent / "avl_io.json"
_MAX_SAFE_INT = 2**53 - 1


@attrs.frozen(slots=True)
class Element:
    """One meaning of one IO id, as the vendor documents it for ``models``."""

    id: int
    name: str
    key: str  # the name in snake case: the key in the payload's ``io`` object
    size: int | None  # bytes; None: variable length
    type: str  # unsigned | signed | hex | ascii
    min: int | float
    max: int | float
    multiplier: int | float | None  # None: the value is used as sent
    unit: str | None
    values: Mapping[str, str]  # raw value (decimal string) -> meaning
    description: str
    group: str
    models: tuple[str, ...]

    def meaning(self, raw: int) -> str | None:
        return self.values.get(str(raw))


#: how io_object reads a value: as sent, x multiplier, or through io_value (the rest)
_AS_SENT, _SCALED, _GENERAL = 0, 1, 2

#: io_object's precomputed view of one element (the per-record loop stays small)
_Plan = tuple[str, int, "str | None", "dict[int, str] | None", int, float, int, Element]


def _plan(element: Element) -> _Plan:
    values = {int(raw): text for raw, text in element.values.items()} or None
    mode, multiplier, decimals = _GENERAL, 1.0, 0
    if element.type == "unsigned":
        if element.multiplier is None:
            mode = _AS_SENT
        elif not float(element.multiplier).is_integer():
            mode, multiplier = _SCALED, float(element.multiplier)
            decimals = _decimals(multiplier)
    return (element.key, element.id, element.unit, values, mode, multiplier, decimals, element)


@attrs.frozen(slots=True)
class ModelView:
    """The catalogue as one model sees it: IO id -> its element. ``model`` None: unknown
    model, the ids common to all families only."""

    model: str | None
    elements: Mapping[int, Element]
    plans: Mapping[int, _Plan] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        plans = {io_id: _plan(element) for io_id, element in self.elements.items()}
        object.__setattr__(self, "plans", plans)

    def get(self, io_id: int) -> Element | None:
        return self.elements.get(io_id)


class Catalogue:
    """The loaded catalogue. Use :func:`catalogue` (loaded once, cached)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        sets = [tuple(s) for s in data["model_sets"]]
        self.models: tuple[str, ...] = tuple(data["models"])
        self.families: dict[str, tuple[str, ...]] = {
            family: tuple(models) for family, models in data["families"].items()
        }
        self.common: frozenset[int] = frozenset(data["common"])
        self.elements: dict[int, tuple[Element, ...]] = {}
        for entry in data["elements"]:
            io_id = entry["id"]
            self.elements[io_id] = tuple(
                Element(
                    id=io_id,
                    name=v["name"],
                    key=v["key"],
                    size=v["size"],
                    type=v["type"],
                    min=v["min"],
                    max=v["max"],
                    multiplier=v["multiplier"],
                    unit=v["unit"],
                    values=v["values"],
                    description=v["description"],
                    group=v["group"],
                    models=sets[v["models"]],
                )
                for v in entry["variants"]
            )
        self._by_model: dict[str | None, ModelView] = {}
        self._known = {m.upper(): m for m in self.models}

    def variants(self, io_id: int) -> tuple[Element, ...]:
        """Every documented meaning of ``io_id`` (empty if the vendor documents none)."""
        return self.elements.get(io_id, ())

    def resolve(self, model: str | None) -> str | None:
        """The catalogue's spelling of ``model`` (case-insensitive), None if unknown."""
        if not model:
            return None
        return self._known.get(model.strip().upper())

    def for_model(self, model: str | None) -> ModelView:
        """The view for ``model``; an unknown (or no) model gets the common ids only."""
        name = self.resolve(model)
        view = self._by_model.get(name)
        if view is None:
            view = self._by_model[name] = self._view(name)
        return view

    def _view(self, model: str | None) -> ModelView:
        elements: dict[int, Element] = {}
        if model is None:
            for io_id in sorted(self.common):
                elements[io_id] = self.elements[io_id][0]
        else:
            for io_id, variants in self.elements.items():
                for element in variants:
                    if model in element.models:
                        elements[io_id] = element
                        break
        return ModelView(model, elements)

    def search(self, text: str) -> list[Element]:
        """Elements whose key or name matches ``text``: exact key first, else substring."""
        needle = text.strip().lower()
        key = re.sub(r"[^a-z0-9]+", "_", needle).strip("_")
        exact = [e for e in self._all() if e.key == key or e.name.lower() == needle]
        if exact:
            return exact
        return [e for e in self._all() if needle in e.name.lower() or (key and key in e.key)]

    def _all(self) -> Iterator[Element]:
        for variants in self.elements.values():
            yield from variants


@cache
def catalogue() -> Catalogue:
    """The package's catalogue, read from ``avl_io.json`` on first use."""
    return Catalogue(json.loads(DATA.read_text(encoding="utf-8")))


def _decimals(multiplier: float) -> int:
    text = repr(float(multiplier))
    if "e" in text:  # pragma: no cover - the vendor's multipliers are plain decimals
        return 12
    _, _, fraction = text.partition(".")
    return 0 if fraction == "0" else len(fraction)


def _printable(raw: bytes) -> str | None:
    text = raw.rstrip(b"\x00")
    if text and all(0x20 <= b < 0x7F for b in text):
        return text.decode("ascii")
    return None


def io_value(element: Element, raw: int | bytes, wire_size: int) -> Any:
    """``raw`` (as received: an unsigned integer of ``wire_size`` bytes, or the bytes of a
    variable-length element) as ``element`` says to read it: signed, scaled by the
    multiplier, as hex or text. 8-byte integers (beyond JSON's exact range in most readers)
    come back as decimal strings."""
    kind = element.type
    if isinstance(raw, bytes):
        if kind == "ascii":
            return _printable(raw) or raw.hex()
        if kind == "hex" or len(raw) > 8 or not raw:
            return raw.hex()
        wire_size = len(raw)
        raw = int.from_bytes(raw, "big")
    if kind == "hex":
        return f"{raw:0{2 * wire_size}x}"
    if kind == "ascii":
        data = raw.to_bytes(wire_size, "big")
        return _printable(data) or data.hex()
    value: int | float = raw
    if kind == "signed" and raw >= 1 << (8 * wire_size - 1):
        value = raw - (1 << (8 * wire_size))
    multiplier = element.multiplier
    if multiplier is not None:
        scaled = value * multiplier
        value = (
            round(scaled)
            if float(multiplier).is_integer()
            else round(scaled, _decimals(multiplier))
        )
    elif wire_size == 8 or value > _MAX_SAFE_INT:
        return str(value)
    return value


def _elements(record: AvlRecord) -> Iterable[tuple[int, int | bytes, int]]:
    for group, size in ((record.io1, 1), (record.io2, 2), (record.io4, 4), (record.io8, 8)):
        for io_id, value in group.items():
            yield io_id, value, size
    for io_id, raw in record.iox.items():
        yield io_id, raw, len(raw)


def io_entry(element: Element, raw: int | bytes, wire_size: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": element.id, "value": io_value(element, raw, wire_size)}
    if element.unit:
        entry["unit"] = element.unit
    if isinstance(raw, int):
        text = element.meaning(raw)
        if text is not None:
            entry["text"] = text
    return entry


def io_object(view: ModelView, record: AvlRecord) -> dict[str, Any]:
    """The payload's ``io`` object: the record's IO elements the model's catalogue names,
    in wire order, keyed by element key. Ids it does not know are left out (they stay in
    ``attributes``, raw). Equal to :func:`io_entry` per element, with the common cases
    (unsigned, as sent or scaled) inline: this runs per record with ``--io-names``."""
    out: dict[str, Any] = {}
    lookup = view.plans.get
    for group, size in ((record.io1, 1), (record.io2, 2), (record.io4, 4)):
        for io_id, raw in group.items():
            plan = lookup(io_id)
            if plan is None:
                continue
            key, eid, unit, values, mode, multiplier, decimals, element = plan
            if mode == _AS_SENT:
                entry: dict[str, Any] = {"id": eid, "value": raw}
            elif mode == _SCALED:
                entry = {"id": eid, "value": round(raw * multiplier, decimals)}
            else:
                entry = {"id": eid, "value": io_value(element, raw, size)}
            if unit:
                entry["unit"] = unit
            if values is not None:
                text = values.get(raw)
                if text is not None:
                    entry["text"] = text
            out[key] = entry
    for io_id, raw8 in record.io8.items():
        plan = lookup(io_id)
        if plan is not None:
            out[plan[0]] = io_entry(plan[7], raw8, 8)
    for io_id, rawx in record.iox.items():
        plan = lookup(io_id)
        if plan is not None:
            out[plan[0]] = io_entry(plan[7], rawx, len(rawx))
    return out


def unknown_ids(view: ModelView, record: AvlRecord) -> list[int]:
    """The record's IO ids the model's catalogue does not name."""
    return [io_id for io_id, _, _ in _elements(record) if io_id not in view.elements]
