"""The device simulator (load generator, replay) and the ACK-log invariant checker."""
