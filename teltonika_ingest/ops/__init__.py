"""What both services share for operations, service-independent (``server/`` and
``processor/`` both import it; it imports neither): ``http`` (the /metrics, /healthz and
/readyz resources; /readyz answers a cached check), ``startup`` (start-up failures as one
line: what, why, fix; exit 1), ``sdnotify`` (systemd's notify protocol) and ``loophealth``
(reactor lag and GC pause metrics)."""
