"""Replay the fuzz target's saved inputs (tests/fuzz_regressions/*.bin): none may raise.

The fuzzer itself (``python -m bench.fuzz``) is a bounded benchmark-like run, not a test;
what it finds is kept here as files so that every test run checks them again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench.fuzz import check_input, seeds  # noqa: E402

INPUTS = sorted((Path(__file__).parent / "fuzz_regressions").glob("*.bin"))


def test_there_are_regression_inputs() -> None:
    assert len(INPUTS) >= 10


@pytest.mark.parametrize("path", INPUTS, ids=[p.stem for p in INPUTS])
def test_saved_input(path: Path) -> None:
    check_input(path.read_bytes())


def test_fuzzer_seed_corpus() -> None:
    """The valid inputs the fuzzer starts from pass every property (vectors, every codec)."""
    corpus = seeds()
    assert len(corpus) > 50
    for data in corpus:
        check_input(data)


def test_the_target_catches_broken_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    """A target that never fails would prove nothing: break the encoder, it must notice."""
    import teltonika_ingest.codec as codec
    from bench.fuzz import PropertyBroken

    frame = next(s for s in seeds() if s[0] == 4 and s[9] == 0x08)
    monkeypatch.setattr(codec, "encode_avl_frame", lambda packet: b"")
    with pytest.raises(PropertyBroken):
        check_input(frame)
