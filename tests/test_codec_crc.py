"""CRC-16/IBM: the native implementation and the pure-Python fallback agree."""

from __future__ import annotations

import importlib
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teltonika_ingest.codec import crc as crc_module
from teltonika_ingest.codec import crc16_ibm
from teltonika_ingest.codec.crc import crc16_ibm_py


@pytest.mark.parametrize("crc", [crc16_ibm, crc16_ibm_py], ids=["native", "python"])
def test_check_value(crc):
    assert crc(b"123456789") == 0xBB3D
    assert crc(b"") == 0


def test_native_is_used_when_available():
    from fastcrc import crc16

    assert crc16_ibm is crc16.arc


def test_vendor_example_frame_crc():
    # Codec 8 example from the vendor documentation: CRC field 0000C7CF.
    frame = bytes.fromhex(
        "000000000000003608010000016b40d8ea30010000000000000000000000000000000105021503010101"
        "425e0f01f10000601a014e0000000000000000010000c7cf"
    )
    assert crc16_ibm(frame[8:-4]) == crc16_ibm_py(frame[8:-4]) == 0xC7CF


@given(st.binary(max_size=2048))
def test_native_and_python_agree(data):
    assert crc16_ibm(data) == crc16_ibm_py(data)


def test_fallback_without_fastcrc(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastcrc", None)  # makes "import fastcrc" fail
    try:
        reloaded = importlib.reload(crc_module)
        assert reloaded.crc16_ibm is reloaded.crc16_ibm_py
        assert reloaded.crc16_ibm(b"123456789") == 0xBB3D
    finally:
        monkeypatch.undo()
        importlib.reload(crc_module)
    assert crc_module.crc16_ibm is not crc_module.crc16_ibm_py
