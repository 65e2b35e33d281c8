"""The source and sink of ``kafka.client``: kafka-python's or librdkafka's (confluent-kafka), one interface."""

from __future__ import annotations

from collections.abc import Callable

from kafka import TopicPartition

from lifelong.config import Config
from lifelong.kafka.confluent import ConfluentSink, ConfluentSource
from lifelong.kafka.sink import KafkaSink, Sink
from lifelong.kafka.source import KafkaSource, Source


def open_source(
    cfg: Config,
    on_assign: Callable[[list[TopicPartition]], dict[TopicPartition, int]],
    on_revoke: Callable[[list[TopicPartition]], None],
    on_lost: Callable[[list[TopicPartition]], None],
) -> Source:
    """The consumer of ``kafka.client``, not started."""
    if cfg.kafka.client == "confluent":
        return ConfluentSource(cfg, on_assign, on_revoke, on_lost)
    return KafkaSource(cfg, on_assign, on_revoke, on_lost)


def open_sink(cfg: Config) -> Sink:
    """The producer of ``kafka.client``."""
    if cfg.kafka.client == "confluent":
        return ConfluentSink(cfg)
    return KafkaSink(cfg)
