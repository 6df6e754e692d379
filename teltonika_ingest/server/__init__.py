"""The ingest service: the device-facing TCP/UDP server and its Redis-side services.

``session`` (sans-IO state machine) and ``protocol`` (the thin Twisted adapter) handle one
device; ``publisher`` writes records to the stream and says when to ACK; ``registry`` keeps
IMEI -> instance; ``commands`` routes GPRS commands; ``authority`` decides which IMEIs may
connect; ``udp`` is the UDP listener; ``metrics`` and ``readiness`` the operations face (the
shared resources are in ``teltonika_ingest/ops/``); ``tap``
wires them into one ``MultiService`` (``twistd -n teltonika-ingest``).
"""
