"""Kafka sink: predictions and dead letters, with every delivery checked before a checkpoint.

A dead letter can never stop the daemon: a payload too large to re-send whole (near
``kafka.max_message_bytes``) keeps its first ``DEAD_LETTER_PREFIX`` bytes, at most half that limit (headers
``truncated`` and ``original_bytes`` say so), and one that still cannot be delivered is logged with its
source offset and counted (``dead_letter_failures``), not retried.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.partitioner.default import DefaultPartitioner, murmur2

from lifelong.config import Config
from lifelong.errors import LifelongError
from lifelong.kafka.options import client_options

log = logging.getLogger(__name__)
DEAD_LETTER_PREFIX = 64 * 1024  # bytes of an oversized payload kept in its dead letter
MAX_KEY = 1024  # a longer key is not kept in the dead letter (the payload prefix and headers are)


class SinkError(LifelongError):
    """A record could not be delivered: the daemon must not checkpoint past it."""


class FlushTimeout(SinkError):
    """Deliveries still pending (the broker is slow or unreachable): nothing failed, try again later."""


class Sink:
    """What the daemon sends: predictions, KB members, changelog records and dead letters. A client implements
    ``_send``, ``flush`` and ``close`` (``KafkaSink``; ``confluent.ConfluentSink``)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dead_letter_failures = 0
        self.sent = 0

    def _send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        where: str | None = None,
    ) -> None:
        """Send one record; a dead letter (``where`` names its source) that fails is logged, never raised."""
        raise NotImplementedError

    def flush(self, timeout: float) -> int:
        """Wait for every pending send; raise ``SinkError`` naming the first failure (``FlushTimeout`` when
        some are still pending: they stay pending). Returns the records delivered."""
        raise NotImplementedError

    def close(self, timeout: float) -> None:
        """Close the producer, waiting at most ``timeout`` seconds for what is still pending."""
        raise NotImplementedError

    def predictions(self, records: list[tuple[int, dict[str, Any]]]) -> None:
        """Send a batch's prediction records (``BatchResult.records``; JSON: orjson writes a non-finite number
        as null), each keyed by its task."""
        send, topic, dumps = self._send, self.cfg.kafka.predictions_topic, orjson.dumps
        for _, rec in records:
            send(topic, dumps(rec), rec["task"].encode())

    def knowledge(self, member: str, value: bytes) -> None:
        """A KB member record (``wire`` format), keyed by its source task: compaction keeps its newest one."""
        self._send(self.cfg.kafka.knowledge_topic, value, member.encode())

    def changelog(self, task: str, partition: int, value: bytes, position: int) -> None:
        """A task's state when its events partition was at ``position``, in the matching changelog partition."""
        headers = [("position", str(position).encode())]
        self._send(self.cfg.kafka.changelog_topic, value, task.encode(), partition=partition, headers=headers)

    def dead_letter(
        self, raw: bytes | None, key: bytes | None, error: str, topic: str, partition: int, offset: int
    ) -> None:
        """Send an invalid event's bytes with why and where it came from (never raises for size)."""
        raw = raw or b""
        headers = [
            ("error", error.encode()[:1000]),
            ("source_topic", topic.encode()),
            ("source_partition", str(partition).encode()),
            ("source_offset", str(offset).encode()),
        ]
        limit = self.cfg.kafka.max_message_bytes
        if len(raw) + MAX_KEY + 4096 > limit:  # would not fit in one record next to its key and headers
            headers += [("truncated", b"1"), ("original_bytes", str(len(raw)).encode())]
            raw = raw[: min(DEAD_LETTER_PREFIX, limit // 2)]
        key = key if key is None or len(key) <= MAX_KEY else None
        self._send(self.cfg.kafka.dead_letter_topic, raw, key, headers=headers, where=f"{topic}-{partition}@{offset}")

    def _dead_letter_failed(self, where: str, exc: object) -> None:
        self.dead_letter_failures += 1
        log.error("dead letter for %s not delivered (the event is skipped): %r", where, exc, extra={"source": where})


HASHES_KEPT = 1 << 16  # task keys whose partition hash a kafka-python producer remembers


class KeyHashes(DefaultPartitioner):  # type: ignore[misc]  # kafka-python has no types
    """kafka-python's default partitioner (murmur2 of the key, as every Kafka client) with the hash of each
    recent key remembered: its pure-Python murmur2 took 4-5% of a replica's busy time (py-spy, 9,500 events/s),
    and the prediction records of a task all carry its name as the key. A topic of one partition needs no hash
    (with 200,000 tasks the remembered hashes were mostly misses: 3.5 us per record)."""

    def __init__(self) -> None:
        self.hashes: dict[bytes, int] = {}

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):  # type: ignore[no-untyped-def]
        """The partition of ``serialized_key``'s murmur2 hash among ``topic``'s; any one for no key."""
        parts = cluster.partitions_for_topic(topic)
        if serialized_key is None or not parts:
            return super().partition(topic, key, serialized_key, value, serialized_value, cluster)
        if len(parts) == 1:  # the predictions topic as the daemon creates it: with a task per key, nothing to hash
            return next(iter(parts))
        h = self.hashes.get(serialized_key)
        if h is None:
            if len(self.hashes) >= HASHES_KEPT:
                self.hashes.clear()
            h = self.hashes[serialized_key] = murmur2(serialized_key) & 0x7FFFFFFF
        return sorted(parts)[h % len(parts)]


class KafkaSink(Sink):
    """The kafka-python producer (``kafka.client: kafka-python``). Each record's future reports only a failure
    (kept until ``flush``): futures held until a checkpoint would live long enough to reach the collector's
    oldest generation, whose full passes were the largest part of the daemon's p99 latency."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.producer = KafkaProducer(
            acks="all",
            linger_ms=5,
            # a loop batch's predictions (hundreds of records) go in one request, not one per 16 KB
            batch_size=256 * 1024,
            retries=5,
            max_in_flight_requests_per_connection=1,
            partitioner=KeyHashes(),
            max_request_size=max(1024 * 1024, cfg.kafka.max_message_bytes + 4096),
            client_id="lifelong",
            **client_options(cfg),
        )
        self.produced = 0
        self.failed: list[Any] = []  # errors of records other than dead letters since the last flush

    def _send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        where: str | None = None,
    ) -> None:
        try:
            future = self.producer.send(topic, key=key, value=value, partition=partition, headers=headers)
        except KafkaError as exc:
            if where is None:
                raise
            self._dead_letter_failed(where, exc)
            return
        if where is None:
            future.add_errback(self._failed)
        else:
            future.add_errback(self._dead_letter_failed, where)
        self.produced += 1

    def _failed(self, exc: Exception) -> None:
        self.failed.append(exc)

    def flush(self, timeout: float) -> int:
        """Wait for every pending send; raise ``SinkError`` naming the first failure (``FlushTimeout`` when
        some are still pending: they stay pending). Returns the records sent since the last flush."""
        try:
            self.producer.flush(timeout=timeout)
        except KafkaTimeoutError:
            raise FlushTimeout(f"deliveries still pending after {timeout:.1f}s") from None
        (n, self.produced), (failed, self.failed) = (self.produced, 0), (self.failed, [])
        if failed:
            raise SinkError(f"a record was not delivered: {failed[0]!r}")
        self.sent += n
        return n

    def close(self, timeout: float) -> None:
        """Close the producer, waiting at most ``timeout`` seconds for what is still pending."""
        self.producer.close(timeout=timeout)
