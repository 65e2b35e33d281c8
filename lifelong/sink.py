"""Kafka sink: predictions and dead letters, with every delivery checked before a checkpoint."""

from __future__ import annotations

import json
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError

from .config import Config
from .errors import LifelongError
from .source import client_options


class SinkError(LifelongError):
    """A record could not be delivered: the daemon must not checkpoint past it."""


class FlushTimeout(SinkError):
    """Deliveries still pending (the broker is slow or unreachable): nothing failed, try again later."""


class KafkaSink:
    """An idempotent-where-possible producer; ``flush`` raises if any send since the last flush failed."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.producer = KafkaProducer(acks="all", linger_ms=5, retries=5, max_in_flight_requests_per_connection=1,
                                      max_request_size=max(1024 * 1024, cfg.kafka.max_message_bytes + 4096),
                                      client_id="lifelong", **client_options(cfg))
        self.futures: list[Any] = []
        self.sent = 0

    def prediction(self, task: str, record: dict[str, Any]) -> None:
        value = json.dumps(record, separators=(",", ":")).encode()
        self.futures.append(self.producer.send(self.cfg.kafka.predictions_topic, key=task.encode(), value=value))

    def knowledge(self, member: str, value: bytes) -> None:
        """A KB member record (``wire`` format), keyed by its source task: compaction keeps its newest one."""
        self.futures.append(self.producer.send(self.cfg.kafka.knowledge_topic, key=member.encode(), value=value))

    def changelog(self, task: str, partition: int, value: bytes, position: int) -> None:
        """A task's state when its events partition was at ``position``, in the matching changelog partition."""
        self.futures.append(self.producer.send(self.cfg.kafka.changelog_topic, key=task.encode(), value=value,
                                               partition=partition, headers=[("position", str(position).encode())]))

    def dead_letter(self, raw: bytes | None, key: bytes | None, error: str, topic: str, partition: int,
                    offset: int) -> None:
        headers = [("error", error.encode()[:1000]), ("source_topic", topic.encode()),
                   ("source_partition", str(partition).encode()), ("source_offset", str(offset).encode())]
        self.futures.append(self.producer.send(self.cfg.kafka.dead_letter_topic, key=key, value=raw or b"",
                                               headers=headers))

    def flush(self, timeout: float) -> int:
        """Wait for every pending send; raise ``SinkError`` naming the first failure (``FlushTimeout`` when
        some are still pending: they stay pending). Returns the records delivered."""
        try:
            self.producer.flush(timeout=timeout)
        except KafkaTimeoutError:
            raise FlushTimeout(f"deliveries still pending after {timeout:.1f}s") from None
        if any(not f.is_done for f in self.futures):
            raise FlushTimeout(f"deliveries still pending after {timeout:.1f}s")
        futures, self.futures = self.futures, []
        for f in futures:
            if f.failed():
                raise SinkError(f"a record was not delivered: {f.exception!r}")
        self.sent += len(futures)
        return len(futures)

    def close(self, timeout: float) -> None:
        self.producer.close(timeout=timeout)
