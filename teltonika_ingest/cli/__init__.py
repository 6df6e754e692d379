"""The ``teltonika-ingest`` console script: ``main`` dispatches, one module per subcommand."""
