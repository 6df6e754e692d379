"""GPRS commands (Codec 12/14): entry validation (``entries``) and the router (``router``)."""
