"""What is running: the package version, Python, Twisted and whether the compiled decoder is on.

One source for ``teltonika-ingest --version``, ``twistd teltonika-ingest --version``, the
start-up log line and the ``teltonika_build_info`` gauge.
"""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["DIST_NAME", "build_info", "version", "version_line"]

DIST_NAME = "teltonika-ingest"


def version() -> str:
    """The installed distribution's version (``0+unknown`` when run from an uninstalled tree)."""
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_info() -> dict[str, str]:
    """``teltonika_build_info`` labels: version, python, twisted, compiled (on/off/not_built)."""
    import twisted
    from teltonika_ingest.codec.accel import compiled_path_status

    status = compiled_path_status()
    compiled = "on" if status == "on" else "off" if status.startswith("off") else "not_built"
    return {
        "version": version(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "compiled": compiled,
    }


def version_line(*, compiled: bool = True) -> str:
    """``teltonika-ingest 0.1.0 (Python 3.11.7, Twisted 24.10.0, compiled decoder on)``."""
    info = build_info()
    tail = f", compiled decoder {info['compiled']}" if compiled else ""
    return (
        f"{DIST_NAME} {info['version']} (Python {info['python']}, Twisted {info['twisted']}{tail})"
    )
