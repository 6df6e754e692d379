"""The package's import rule: ``ops/`` imports neither service, ``processor/`` never imports
``server/`` and ``server/`` never ``processor/``, ``codec/`` nothing of the package
(README, layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import teltonika_ingest

ROOT = Path(teltonika_ingest.__file__).parent

#: package -> the subpackages of teltonika_ingest it must not import
FORBIDDEN = {
    "ops": ("server", "processor", "cli", "sim"),
    "processor": ("server", "cli", "sim"),
    "server": ("processor", "cli", "sim"),
    "codec": ("server", "processor", "ops", "redis", "cli", "sim"),
}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_what_it_must_not(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(imported(path))
        for other in FORBIDDEN[package]
        if name == f"teltonika_ingest.{other}" or name.startswith(f"teltonika_ingest.{other}.")
    ]
    assert not wrong, wrong
