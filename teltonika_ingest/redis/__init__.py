"""Redis plumbing shared by the services and the tools.

``client``: the asynchronous client the services use (txredisapi with fail-fast, timeouts,
scripts and reconnects); ``embedded``: the development ``redis-server`` child; ``blocking``:
the small synchronous client of the command-line tools; ``resp``: the one RESP encoder.
"""
