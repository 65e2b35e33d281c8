"""Kafka I/O: client options, topic administration, the source and sinks for both clients, and the readers
of the topics replicas share."""
