"""The IO catalogue (teltonika_ingest/catalog): facts about the devices, per model.

Samples are checked against the vendor's own published AVL ID pages (Teltonika wiki):
* "FMB AVL ID" (Template:FMB_AVL_ID_FMM_FMC, firmware FMB.Ver.03.18.18.Rev.50): 239 Ignition
  1 B, 240 Movement 1 B, 80 Data Mode 0..5, 69 GNSS Status 0..3, 181/182 GNSS PDOP/HDOP
  2 B x0.1, 66 External Voltage 2 B x0.001 V, 24 Speed 2 B km/h, 67 Battery Voltage
  2 B x0.001 V, 68 Battery Current 2 B x0.001 A, 241 Active GSM Operator 4 B;
* "FMB630 AVL ID" / "FMX640 AVL ID" (the heavy-truck tables): 66 External Voltage and 67
  Battery Voltage in mV as sent, 68 Battery Current in mA;
* "TST100 AVL ID List" (the e-mobility "Parameters ID" table that TAT100/TAT140/TMT250/...
  share in the vendor data): 239/240 as above, 67 x0.001 V, 68 x0.001 A, 113 Battery Level
  1 B %, 181 x0.1.
"""

from __future__ import annotations

import csv
import json
import random
import re

import pytest

from teltonika_ingest.catalog import (
    Catalogue,
    catalogue,
    generate,
    io_object,
    io_value,
    unknown_ids,
)
from teltonika_ingest.codec import decode_avl_data

from support import make_record

VENDOR_EXAMPLE = bytes.fromhex(
    "000000000000003608010000016b40d8ea30010000000000000000000000000000000105021503010101425e0f"
    "01f10000601a014e0000000000000000010000c7cf"
)[8:-4]


def test_the_committed_catalogue_is_what_the_generator_makes_of_the_vendor_csv() -> None:
    with generate.SOURCE.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2446
    assert generate.render(generate.build(rows)) == generate.OUTPUT.read_text(encoding="utf-8")
    # the licence notice travels with the generated file (and with its source copy)
    notice = (generate.OUTPUT.parent / "avl_io.LICENSE").read_text()
    assert "MIT License" in notice and "Alim Zanibekov" in notice
    assert (generate.SOURCE.parent / "teltonika-avl-io-elements.LICENSE").exists()


def test_sizes_of_the_catalogue() -> None:
    cat = catalogue()
    assert len(cat.elements) == 1963
    assert sum(map(len, cat.elements.values())) == 2446
    assert len(cat.models) == 75
    for family in ("FMB", "FMC", "FMM", "FMU", "FMP", "FMT", "TAT", "TFT", "TMT", "TST"):
        assert cat.families[family], family


KEY = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")


def test_every_entry_is_well_formed() -> None:
    cat = catalogue()
    known = set(cat.models)
    for io_id, variants in cat.elements.items():
        assert 0 <= io_id <= 0xFFFF
        assert variants
        seen_models: set[str] = set()
        for e in variants:
            assert e.id == io_id
            assert e.name and e.name == e.name.strip()
            assert KEY.match(e.key), e.key
            assert e.size is None or e.size >= 1
            assert e.type in ("unsigned", "signed", "hex", "ascii")
            assert e.min <= e.max
            assert e.multiplier is None or (e.multiplier > 0 and e.multiplier != 1)
            assert e.unit is None or (e.unit and e.unit == e.unit.strip())
            for raw, text in e.values.items():
                assert str(int(raw)) == raw and text and "\n" not in text
            assert e.models and set(e.models) <= known
            # a model never has two meanings for one id: conflicts are between models only
            assert not seen_models & set(e.models), (io_id, seen_models & set(e.models))
            seen_models |= set(e.models)


def test_a_key_names_one_id_on_every_model() -> None:
    cat = catalogue()
    for model in (*cat.models, None):
        view = cat.for_model(model)
        keys = [e.key for e in view.elements.values()]
        assert len(keys) == len(set(keys)), model
    # FMB920 has two "Battery Voltage" ids: the lower keeps the plain key
    fmb920 = cat.for_model("FMB920")
    assert fmb920.get(67).key == "battery_voltage"
    assert fmb920.get(168).key == "battery_voltage_168"


@pytest.mark.parametrize(
    ("model", "io_id", "name", "size", "multiplier", "unit"),
    [
        ("FMB920", 239, "Ignition", 1, None, None),
        ("FMB920", 240, "Movement", 1, None, None),
        ("FMB920", 66, "External Voltage", 2, 0.001, "V"),
        ("FMB920", 67, "Battery Voltage", 2, 0.001, "V"),
        ("FMB920", 68, "Battery Current", 2, 0.001, "A"),
        ("FMB920", 181, "GNSS PDOP", 2, 0.1, None),
        ("FMB920", 182, "GNSS HDOP", 2, 0.1, None),
        ("FMB920", 24, "Speed", 2, None, "km/h"),
        ("FMB920", 241, "Active GSM Operator", 4, None, None),
        ("FMC130", 66, "External Voltage", 2, 0.001, "V"),
        ("FMM130", 239, "Ignition", 1, None, None),
        ("FMB640", 66, "External Voltage", 2, None, "mV"),
        ("FMB640", 67, "Battery Voltage", 2, None, "mV"),
        ("FMB640", 68, "Battery Current", 2, None, "mA"),
        ("TST100", 67, "Battery Voltage", 2, 0.001, "V"),
        ("TST100", 68, "Battery Current", 2, 0.001, "A"),
        ("TST100", 113, "Battery Level", 1, None, "%"),
        ("TAT100", 239, "Ignition", 1, None, None),
        ("TAT100", 181, "GNSS PDOP", 2, 0.1, None),
    ],
)  # fmt: skip
def test_samples_match_the_vendor_pages(model, io_id, name, size, multiplier, unit) -> None:
    element = catalogue().for_model(model).get(io_id)
    assert element is not None
    assert (element.name, element.size, element.multiplier, element.unit) == (
        name, size, multiplier, unit,
    )  # fmt: skip


def test_documented_value_meanings() -> None:
    fmb = catalogue().for_model("FMB920")
    assert dict(fmb.get(239).values) == {"0": "Ignition Off", "1": "Ignition On"}
    assert fmb.get(80).values["5"] == "Unknown On Moving"
    assert fmb.get(69).values == {
        "0": "GNSS OFF", "1": "GNSS ON with fix", "2": "GNSS ON without fix", "3": "GNSS sleep",
    }  # fmt: skip
    # error sentinels: a Dallas sensor not ready reports 850 (85.0 degrees)
    assert fmb.get(72).values["850"] == "Sensor not ready"
    assert fmb.get(72).values["3000"] == "Not connected"


@pytest.mark.parametrize(
    ("io_id", "meanings"),
    [
        # id: {model: name} - the vendor reuses these ids with other meanings
        (389, {"FMB920": "OBD OEM Total Mileage", "FMB640": "Manual CAN 19",
               "TAT100": "Button Click"}),
        (113, {"FMB920": "Battery Level", "FMB640": "Service Distance", "TST100": "Battery Level"}),
        (17, {"FMB920": "Axis X", "FMB640": "Fuel Consumed (counted)", "TAT100": "Axis X"}),
        (80, {"FMB920": "Data Mode", "FMB640": "Wheel Based Speed"}),
        (69, {"FMB920": "GNSS Status", "FMB640": "Driver 1 Cumulative Driving Time"}),
    ],
)  # fmt: skip
def test_ids_whose_meaning_differs_between_families(io_id, meanings) -> None:
    cat = catalogue()
    for model, name in meanings.items():
        assert cat.for_model(model).get(io_id).name == name, model
    assert len(cat.variants(io_id)) >= 2
    assert io_id not in cat.common


def test_same_name_other_scale_is_a_conflict_too() -> None:
    # Axis X: mG as sent on an FMB920, 0.001 G on a TAT100; 66: V x0.001 vs mV as sent
    cat = catalogue()
    raw = (1 << 16) - 981  # -981 as a 2-byte signed value
    assert io_value(cat.for_model("FMB920").get(17), raw, 2) == -981
    assert io_value(cat.for_model("TAT100").get(17), raw, 2) == -0.981
    assert io_value(cat.for_model("FMB920").get(66), 12520, 2) == 12.52
    assert io_value(cat.for_model("FMB640").get(66), 12520, 2) == 12520


def test_unknown_model_names_only_the_ids_common_to_all_families() -> None:
    cat = catalogue()
    unknown = cat.for_model("NOT-A-MODEL")
    assert unknown.model is None and cat.for_model(None) is unknown
    assert set(unknown.elements) == set(cat.common)
    assert {239, 240, 21, 1, 181} <= cat.common
    assert 66 not in cat.common  # V x0.001 on FMB, mV on FMX640: not one meaning
    assert 389 not in cat.common
    for io_id in cat.common:
        (_meaning,) = {(e.name.lower(), e.size, e.multiplier, e.unit) for e in cat.variants(io_id)}
        families = {f for f, ms in cat.families.items() for e in cat.variants(io_id)
                    if set(ms) & set(e.models)}  # fmt: skip
        assert families == set(cat.families), io_id


def test_model_names_are_case_insensitive() -> None:
    cat = catalogue()
    assert cat.resolve("fmb920") == "FMB920"
    assert cat.for_model(" tat100 ").get(389).name == "Button Click"
    assert cat.resolve("") is None and cat.resolve("FMB9") is None


def test_io_object_on_the_vendor_example() -> None:
    (record,) = decode_avl_data(VENDOR_EXAMPLE).records
    io = io_object(catalogue().for_model("FMB920"), record)
    assert io == {
        "gsm_signal": {"id": 21, "value": 3},
        "digital_input_1": {"id": 1, "value": 1},
        "external_voltage": {"id": 66, "value": 24.079, "unit": "V"},
        "active_gsm_operator": {"id": 241, "value": 24602},
        "ibutton": {"id": 78, "value": "0"},
    }
    assert list(io) == ["gsm_signal", "digital_input_1", "external_voltage",
                        "active_gsm_operator", "ibutton"]  # fmt: skip
    unknown = io_object(catalogue().for_model(None), record)
    assert "external_voltage" not in unknown and unknown["gsm_signal"] == {"id": 21, "value": 3}


def test_unknown_ids_pass_through_raw() -> None:
    record = make_record(0, io1={239: 1, 250: 3}, io2={65000: 7}, io4={}, io8={})
    view = catalogue().for_model("FMB920")
    io = io_object(view, record)
    assert io["ignition"] == {"id": 239, "value": 1, "text": "Ignition On"}
    assert 65000 not in {entry["id"] for entry in io.values()}
    assert unknown_ids(view, record) == [65000]


def test_values_signed_scaled_hex_text_and_sentinels() -> None:
    fmb = catalogue().for_model("FMB920")
    dallas = fmb.get(72)  # 4-byte signed x0.1 degC
    assert io_value(dallas, 2**32 - 105, 4) == -10.5
    assert io_value(dallas, 850, 4) == 85.0
    vin = fmb.get(256)  # VIN, 17 ASCII
    assert vin.type == "ascii"
    assert io_value(vin, b"WVWZZZ1JZXW000001", 17) == "WVWZZZ1JZXW000001"
    assert io_value(vin, b"\x00\xff", 2) == "00ff"  # not text: hex, never lost
    iccid = fmb.get(11)  # 8-byte unsigned: exact, as a decimal string
    assert io_value(iccid, 2**64 - 1, 8) == str(2**64 - 1)
    button = catalogue().for_model("TAT100").get(389)
    assert io_value(button, b"\x01\x21", 2) == "0121"


def test_io_entry_carries_value_meaning_only_for_documented_values() -> None:
    record = make_record(0, io1={239: 7}, io2={}, io4={}, io8={})
    assert io_object(catalogue().for_model("FMB920"), record) == {
        "ignition": {"id": 239, "value": 7}
    }


def test_catalogue_loads_from_its_own_data_only(tmp_path) -> None:
    data = json.loads(generate.OUTPUT.read_text(encoding="utf-8"))
    data["elements"] = [e for e in data["elements"] if e["id"] == 239]
    small = Catalogue(data)
    assert set(small.elements) == {239}
    assert small.for_model("FMB920").get(66) is None


def test_search_by_name() -> None:
    cat = catalogue()
    assert {e.id for e in cat.search("external voltage")} == {66}
    assert {e.id for e in cat.search("ignition")} >= {239}
    assert 66 in {e.id for e in cat.search("voltage")}
    assert cat.search("no such thing at all") == []


@pytest.mark.parametrize("model", [None, "FMB920", "FMB640", "TAT100", "FMC650", "TFT100"])
def test_io_object_fast_path_equals_io_entry_for_every_element(model) -> None:
    """io_object inlines the common cases; it must give what io_entry gives, element by
    element, at every wire size (signed, scaled, hex, ascii, 8-byte, value meanings)."""
    from teltonika_ingest.catalog import io_entry
    from teltonika_ingest.codec import AvlRecord

    rnd = random.Random(model)
    view = catalogue().for_model(model)
    for io_id, element in view.elements.items():
        for size in (1, 2, 4, 8):
            raw = rnd.choice([0, 1, 850, rnd.randrange(1 << (8 * size))]) % (1 << (8 * size))
            groups: dict[int, dict[int, int]] = {1: {}, 2: {}, 4: {}, 8: {}}
            groups[size] = {io_id: raw}
            record = AvlRecord(0, 0, 0, 0, 0, 0, 0, 0, 0, io1=groups[1], io2=groups[2],
                               io4=groups[4], io8=groups[8])  # fmt: skip
            assert io_object(view, record) == {element.key: io_entry(element, raw, size)}
        buffer = rnd.randbytes(rnd.randrange(0, 20))
        record = AvlRecord(0, 0, 0, 0, 0, 0, 0, 0, 0, iox={io_id: buffer})
        assert io_object(view, record) == {element.key: io_entry(element, buffer, len(buffer))}
