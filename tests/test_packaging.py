"""Plugin discovery traps (pitfalls.md): the wheel carries twisted/plugins without an
__init__.py, and twistd in this editable install (a .pth naming the project root) lists it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).parent.parent


def test_wheel_ships_the_plugin_without_package_init(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("teltonika_ingest-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/teltonika_ingest_plugin.py" in names
    assert "twisted/plugins/teltonika_processor_plugin.py" in names
    assert "teltonika_ingest/processor/migrations/0001_positions.sql" in names
    # an __init__.py here would shadow Twisted's own twisted.plugins package
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert "teltonika_ingest/codec/framing.py" in names


def test_twistd_lists_the_plugin() -> None:
    twistd = Path(sys.executable).parent / "twistd"
    out = subprocess.run(
        [str(twistd), "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "teltonika-ingest" in out
    help_text = subprocess.run(
        [str(twistd), "teltonika-ingest", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "--listen" in help_text and "--redis-url" in help_text
    assert "teltonika-processor" in out
    help_text = subprocess.run(
        [str(twistd), "teltonika-processor", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "--database-url" in help_text and "--live-tokens" in help_text
