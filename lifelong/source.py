"""Kafka source: a consumer polled in its own thread, handing record batches over a bounded queue.

The poll loop never waits on learning: when the queue is full it pauses its partitions and keeps polling
(so the group never sees a missed ``max_poll_interval_ms``) and resumes them when there is room. The
kafka-python consumer is not thread-safe, so commits and seeks happen in this thread too: the daemon asks
for a commit and waits for the answer.

Rebalance callbacks run on kafka-python's IO thread, where nothing may block. Gained partitions are paused
there, and taken over in this thread right after ``poll`` returns: the daemon restores their state (it
may read the changelog and the committed offsets), then they are sought and resumed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from .config import Config
from .errors import LifelongError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Records of one poll, tagged with the assignment generation they were fetched under."""

    records: list[Any]
    generation: int
    polled_at: float = field(default_factory=time.time)


def client_options(cfg: Config) -> dict[str, Any]:
    """Connection and security settings shared by every client (SASL/SSL pass through)."""
    k = cfg.kafka
    opts: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers.split(","),
        "security_protocol": k.security_protocol,
    }
    for key in (
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
        "ssl_cafile",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
    ):
        value = getattr(k, key)
        if value is not None:
            opts[key] = value
    return opts


class KafkaSource:
    """Consumes ``kafka.events_topic`` in a consumer group; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        on_assign: Callable[[list[TopicPartition]], dict[TopicPartition, int]],
        on_revoke: Callable[[list[TopicPartition]], None],
        on_lost: Callable[[list[TopicPartition]], None],
    ):
        self.cfg = cfg
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.on_lost = on_lost
        self.batches: queue.Queue[Batch] = queue.Queue(maxsize=cfg.batching.queue_batches)
        self.commands: queue.Queue[tuple[dict[TopicPartition, int], Future[None]]] = queue.Queue()
        self.generation = 0
        self.assigned: list[TopicPartition] = []
        self.gained: list[TopicPartition] = []  # assigned, paused, not taken over yet
        self.highwater: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.last_poll = time.monotonic()
        self.poll_gaps: list[float] = []
        self.heartbeat_age = 0.0
        self.paused = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lifelong-poll", daemon=True)
        self.consumer: KafkaConsumer | None = None

    def start(self) -> None:
        """Start the poll thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling and close the consumer (waits at most ``timeout`` seconds)."""
        self._stop.set()
        self._thread.join(timeout)

    def get(self, timeout: float) -> Batch | None:
        """The next polled batch, or None after ``timeout`` seconds."""
        try:
            return self.batches.get(timeout=timeout)
        except queue.Empty:
            return None

    def commit(self, offsets: dict[TopicPartition, int], timeout: float) -> None:
        """Commit ``offsets`` (the next offset to read per partition) from the poll thread; raises on failure."""
        done: Future[None] = Future()
        self.commands.put((offsets, done))
        done.result(timeout)

    def commit_async(self, offsets: dict[TopicPartition, int]) -> None:
        """Send a commit without waiting (rebalance callbacks, which run where nothing may block)."""
        consumer = self.client
        mine = {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items() if tp in consumer.assignment()}
        if mine:
            consumer.commit_async(mine)

    def committed_offset(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of ``tp`` (in the poll thread: taking over gained partitions)."""
        if threading.current_thread() is not self._thread:
            raise LifelongError("the consumer is used outside the poll thread")
        got = self.client.committed(tp)
        return None if got is None else int(got)

    @property
    def client(self) -> KafkaConsumer:
        """The consumer, which the poll thread creates when it starts (using it earlier is a bug)."""
        if self.consumer is None:
            raise LifelongError("used before the Kafka clients were started")
        return self.consumer

    @property
    def broker_reachable(self) -> bool:
        """Heartbeats answered recently (a frozen or unreachable broker stops answering them)."""
        limit = 2 * self.cfg.kafka.session_timeout_ms / 3000 + 1
        return self.heartbeat_age < limit and time.monotonic() - self.last_poll < limit

    def _consumer(self) -> KafkaConsumer:
        k = self.cfg.kafka
        return KafkaConsumer(
            group_id=k.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=max(100, k.session_timeout_ms // 3),
            max_poll_interval_ms=k.max_poll_interval_ms,
            max_poll_records=self.cfg.batching.max_events,
            fetch_max_bytes=max(50 * 1024 * 1024, k.max_message_bytes),
            max_partition_fetch_bytes=max(1024 * 1024, k.max_message_bytes),
            client_id="lifelong",
            **client_options(self.cfg),
        )

    def _run(self) -> None:
        try:
            self.consumer = self._consumer()
            self.consumer.subscribe([self.cfg.kafka.events_topic], listener=_Listener(self))
            while not self._stop.is_set():
                self._serve_commands()
                self._backpressure()
                records = self.consumer.poll(timeout_ms=100, max_records=self.cfg.batching.max_events)
                now = time.monotonic()
                self.poll_gaps.append(now - self.last_poll)
                self.last_poll = now
                if self.gained:
                    self._take_over()
                self._observe()
                flat = [r for rs in records.values() for r in rs]
                if flat:
                    self.batches.put(Batch(flat, self.generation))
        except BaseException as exc:  # noqa: BLE001 - reported to the daemon, which stops
            log.exception("poll loop failed")
            self.error = exc
        finally:
            self._serve_commands()
            if self.consumer is not None:
                self.consumer.close(autocommit=False)

    def _serve_commands(self) -> None:
        while True:
            try:
                offsets, done = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                consumer = self.client
                mine = {tp: o for tp, o in offsets.items() if tp in consumer.assignment()}
                if mine:
                    consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in mine.items()})
                    self.committed.update(mine)
                done.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting daemon thread
                done.set_exception(exc)

    def _take_over(self) -> None:
        consumer = self.client
        gained, self.gained = self.gained, []
        positions = self.on_assign(gained)
        for tp in gained:
            if tp in positions:
                consumer.seek(tp, positions[tp])
        consumer.resume(*gained)
        self.assigned = self.assigned + gained
        log.info(
            "partitions taken over: %s (positions %s)",
            sorted(f"{tp.topic}-{tp.partition}" for tp in gained),
            {f"{tp.topic}-{tp.partition}": o for tp, o in positions.items()},
        )

    def _backpressure(self) -> None:
        consumer = self.client
        full = self.batches.full()
        parts = list(consumer.assignment())
        if full and not self.paused and parts:
            consumer.pause(*parts)
            self.paused = True
        elif not full and self.paused:
            consumer.resume(*consumer.paused())
            self.paused = False

    def _observe(self) -> None:
        consumer = self.client
        for tp in self.assigned:
            hw = consumer.highwater(tp)
            if hw is not None:
                self.highwater[tp] = hw
        metrics = consumer.metrics().get("consumer-coordinator-metrics", {})
        age = metrics.get("last-heartbeat-seconds-ago", 0.0)
        self.heartbeat_age = 0.0 if age == float("inf") else float(age)

    def drain(self) -> None:
        """Drop batches fetched before a rebalance: they will be fetched again after the seek."""
        while True:
            try:
                self.batches.get_nowait()
            except queue.Empty:
                return


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # kafka-python has no type hints
    def __init__(self, source: KafkaSource):
        self.source = source

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._leave(revoked, self.source.on_revoke, "revoked")

    def on_partitions_lost(self, lost: list[TopicPartition]) -> None:
        self._leave(lost, self.source.on_lost, "lost (evicted from the group)")

    def _leave(self, parts: list[TopicPartition], handler: Callable[[list[TopicPartition]], None], how: str) -> None:
        src = self.source
        src.generation += 1
        src.drain()
        handler(list(parts))
        src.assigned = [tp for tp in src.assigned if tp not in parts]
        src.gained = [tp for tp in src.gained if tp not in parts]
        log.info("partitions %s: %s", how, sorted(f"{tp.topic}-{tp.partition}" for tp in parts))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        src = self.source
        src.generation += 1
        src.drain()
        if assigned:
            src.client.pause(*assigned)
        src.gained = list(assigned)
        src.paused = False
        log.info("partitions assigned: %s", sorted(f"{tp.topic}-{tp.partition}" for tp in assigned))
