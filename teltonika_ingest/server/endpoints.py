"""Why a server endpoint string could not become an endpoint, as a one-line start-up error
(the ingest's ``--listen`` / ``--listen-udp``: ``systemd:`` socket activation, ``ssl:``)."""

from __future__ import annotations

import os

from teltonika_ingest.ops.startup import StartupError

__all__ = ["endpoint_error"]


def endpoint_error(exc: Exception, description: str, option: str) -> StartupError:
    """Why a server endpoint string could not be turned into an endpoint (``systemd:``
    without an inherited socket, ``ssl:`` with a bad key or certificate, a typo)."""
    kind = description.split(":", 1)[0].strip().lower()
    shown = f"{option} {description}"
    if kind == "systemd" and isinstance(exc, IndexError | KeyError | ValueError):
        count = os.environ.get("LISTEN_FDS")
        why = (
            "no inherited socket: this process was not started by systemd socket activation "
            "(LISTEN_FDS is not set)"
            if not count
            else f"no such inherited socket (systemd passed {count}: {exc})"
        )
        return StartupError(
            shown,
            why,
            "start it through its socket unit (systemctl start teltonika-ingest.socket "
            "teltonika-ingest.service), or use --listen tcp:5027 when running it by hand",
        )
    if kind == "ssl":
        if isinstance(exc, OSError):
            why = f"cannot read the key or certificate: {exc.strerror or exc}" + (
                f" ({exc.filename})" if exc.filename else ""
            )
        else:
            detail = str(exc) or type(exc).__name__
            why = f"the TLS key or certificate is not valid PEM or they do not match ({detail})"
        return StartupError(
            shown,
            why,
            "point privateKey= at the PEM private key and certKey= at its PEM certificate "
            "(openssl x509 -noout -in CERT; openssl pkey -noout -in KEY)",
        )
    return StartupError(
        shown,
        f"{type(exc).__name__}: {exc}",
        "check the endpoint string (OPERATIONS.md, TLS and PROXY protocol)",
    )
