"""The learning core: events, the engine and its parts, learners, the knowledge base and exponential weights.
No Kafka and no threads here: the daemon, ``lifelong evaluate`` and the benchmarks all run this same code."""
