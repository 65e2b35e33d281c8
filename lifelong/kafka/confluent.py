"""The confluent-kafka transport (``kafka.client: confluent``): librdkafka behind the same source and sink
interfaces as kafka-python, with the same commit protocol, rebalance and take-over semantics.

librdkafka fetches, heartbeats and sends in its own threads; what Python sees are whole message batches, so
one replica moves several times the events kafka-python does (README "Choosing a Kafka client"). Rebalance
callbacks run inside ``consume`` in the poll thread, where blocking is allowed: a gained partition is taken
over there (the daemon restores its state) and assigned at the position that state stands for.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import orjson
from kafka import TopicPartition

from lifelong.config import Config
from lifelong.errors import ConfigError
from lifelong.kafka.options import confluent_options
from lifelong.kafka.sink import FlushTimeout, Sink, SinkError
from lifelong.kafka.source import Source

try:
    import confluent_kafka as ck
except ImportError:  # pragma: no cover - the optional extra
    ck = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
STATS_MS = 1000  # librdkafka statistics (group state, for broker health) every second
BUFFER_WAIT_S = 30.0  # a full producer queue (the broker is down) waits this long, then the daemon stops


def _module() -> Any:
    if ck is None:
        raise ConfigError("kafka.client: confluent needs confluent-kafka: pip install 'lifelong[confluent]'")
    return ck


class Record:
    """A consumed record with kafka-python's attribute names (what the daemon reads)."""

    __slots__ = ("topic", "partition", "offset", "key", "value", "timestamp")

    def __init__(self, m: Any):
        self.topic, self.partition, self.offset = m.topic(), m.partition(), m.offset()
        self.key, self.value, self.timestamp = m.key(), m.value(), m.timestamp()[1]


class ConfluentSource(Source):
    """The librdkafka consumer; see the module docstring."""

    consumer: Any = None
    healthy_at = 0.0  # when the statistics last showed the group joined and steady

    def _open(self) -> None:
        kafka_cfg = self.cfg.kafka
        self.healthy_at = time.monotonic()
        self.consumer = _module().Consumer(
            {
                **confluent_options(self.cfg),
                "group.id": kafka_cfg.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": kafka_cfg.session_timeout_ms,
                "heartbeat.interval.ms": max(100, kafka_cfg.session_timeout_ms // 3),
                "max.poll.interval.ms": kafka_cfg.max_poll_interval_ms,
                "fetch.wait.max.ms": self.cfg.batching.max_ms,  # a broker holding fetches adds to every latency
                "fetch.max.bytes": max(50 * 1024 * 1024, kafka_cfg.max_message_bytes),
                "max.partition.fetch.bytes": max(1024 * 1024, kafka_cfg.max_message_bytes),
                "message.max.bytes": max(1024 * 1024, kafka_cfg.max_message_bytes + 4096),
                "statistics.interval.ms": STATS_MS,
                "stats_cb": self._stats,
            }
        )
        self.consumer.subscribe(
            [kafka_cfg.events_topic],
            on_assign=lambda _, parts: self._gain(_tps(parts), now=True),
            on_revoke=lambda _, parts: self._leave(_tps(parts), self.on_revoke, "revoked"),
            on_lost=lambda _, parts: self._leave(_tps(parts), self.on_lost, "lost (evicted from the group)"),
        )

    def _stats(self, raw: str) -> None:
        group = json.loads(raw).get("cgrp", {})
        if group.get("state") == "up" and group.get("join_state") == "steady":
            self.healthy_at = time.monotonic()

    def _poll(self, timeout_s: float, max_records: int) -> list[Any]:
        # wait for the first record only, then take what is there: waiting for a full batch adds to latency
        first = self.consumer.consume(1, timeout_s)
        out = []
        for m in first + (self.consumer.consume(max_records - 1, 0) if first else []):
            if m.error() is None:
                out.append(Record(m))
            elif m.error().code() != ck.KafkaError._PARTITION_EOF:
                log.warning("consume: %s", m.error())
        return out

    def _assignment(self) -> list[TopicPartition]:
        return _tps(self.consumer.assignment())

    def _pause(self, parts: list[TopicPartition]) -> None:
        self.consumer.pause(_ctps(parts))

    def _resume(self, parts: list[TopicPartition]) -> None:
        if parts:
            self.consumer.resume(_ctps(parts))

    def _place(self, positions: dict[TopicPartition, int | None]) -> None:
        at = [
            ck.TopicPartition(tp.topic, tp.partition, ck.OFFSET_STORED if o is None else o)
            for tp, o in positions.items()
        ]
        self.consumer.assign(at)
        self.consumer.resume(at)  # librdkafka keeps a partition's pause (back-pressure) across assignments

    def _commit(self, offsets: dict[TopicPartition, int], wait: bool) -> None:
        parts = [ck.TopicPartition(tp.topic, tp.partition, o) for tp, o in offsets.items()]
        got = self.consumer.commit(offsets=parts, asynchronous=not wait)
        for p in got or []:
            if p.error is not None:
                raise SinkError(f"commit of {p.topic}-{p.partition} failed: {p.error}")

    def _committed(self, tp: TopicPartition) -> int | None:
        (got,) = self.consumer.committed([ck.TopicPartition(tp.topic, tp.partition)], timeout=10.0)
        return None if got.offset < 0 else int(got.offset)

    def _observe(self) -> None:
        for tp in self.assigned:
            _, high = self.consumer.get_watermark_offsets(ck.TopicPartition(tp.topic, tp.partition), cached=True)
            if high >= 0:
                self.highwater[tp] = high
        self.heartbeat_age = time.monotonic() - self.healthy_at

    def _close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()


def _tps(parts: list[Any]) -> list[TopicPartition]:
    return [TopicPartition(p.topic, p.partition) for p in parts]


def _ctps(parts: list[TopicPartition]) -> list[Any]:
    return [ck.TopicPartition(tp.topic, tp.partition) for tp in parts]


class ConfluentSink(Sink):
    """The librdkafka producer. Only failed deliveries are reported back (one callback per failure, not per
    record); ``flush`` raises for any since the last one."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.producer = _module().Producer(
            {
                **confluent_options(cfg),
                "acks": "all",
                "linger.ms": 5,
                "max.in.flight.requests.per.connection": 1,
                "message.max.bytes": max(1024 * 1024, cfg.kafka.max_message_bytes + 4096),
                "queue.buffering.max.messages": 1_000_000,
                "delivery.report.only.error": True,
                "on_delivery": self._delivered,
            }
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
        kw: dict[str, Any] = {} if partition is None else {"partition": partition}
        if headers is not None:
            kw["headers"] = headers
        deadline = time.monotonic() + BUFFER_WAIT_S
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, **kw)
                break
            except BufferError:
                if time.monotonic() > deadline:
                    raise SinkError(f"the producer's queue stayed full for {BUFFER_WAIT_S:.0f}s") from None
                self.producer.poll(0.05)
            except ck.KafkaException as exc:
                if where is None:
                    raise SinkError(f"a record was not sent: {exc}") from None
                self._dead_letter_failed(where, exc)
                return
        self.produced += 1
        if self.produced % 1024 == 0:
            self.producer.poll(0)

    def predictions(self, records: list[tuple[int, dict[str, Any]]]) -> None:
        """Send a batch's prediction records straight to the producer (``_send`` when its queue is full)."""
        produce, topic, n = self.producer.produce, self.cfg.kafka.predictions_topic, 0
        for _, rec in records:
            value, key = orjson.dumps(rec), rec["task"].encode()
            try:
                produce(topic, value, key)
                n += 1
            except (BufferError, ck.KafkaException):
                self._send(topic, value, key)  # waits for room, or says why the record was not sent
        self.produced += n
        self.producer.poll(0)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is None:
            return
        if msg.topic() == self.cfg.kafka.dead_letter_topic:
            h = dict(msg.headers() or [])
            where = f"{h.get('source_topic', b'?').decode()}-{h.get('source_partition', b'?').decode()}"
            self._dead_letter_failed(f"{where}@{h.get('source_offset', b'?').decode()}", err)
        else:
            self.failed.append(err)

    def flush(self, timeout: float) -> int:
        """Wait for every pending send; raise ``SinkError`` naming the first failure (``FlushTimeout`` when
        some are still pending: they stay pending). Returns the records sent since the last flush."""
        if self.producer.flush(timeout) > 0:
            raise FlushTimeout(f"deliveries still pending after {timeout:.1f}s")
        failed, self.failed = self.failed, []
        if failed:
            raise SinkError(f"a record was not delivered: {failed[0]}")
        n, self.produced = self.produced, 0
        self.sent += n
        return n

    def close(self, timeout: float) -> None:
        """Send what is still pending, waiting at most ``timeout`` seconds."""
        self.producer.flush(timeout)
