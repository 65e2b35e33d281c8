"""The daemon: its main loop, the commit protocol, what replicas do for their partitions, metrics and the
health endpoints."""
