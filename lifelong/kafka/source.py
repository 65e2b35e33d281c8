"""Kafka source: a consumer polled in its own thread, handing record batches over a bounded queue.

The poll loop never waits on learning: when the queue is full it pauses its partitions and keeps polling
(so the group never sees a missed ``max_poll_interval_ms``) and resumes them when there is room. Consumers
are not thread-safe, so commits and seeks happen in this thread too: the daemon asks for a commit and waits
for the answer.

With kafka-python (``KafkaSource``) rebalance callbacks run on the client's IO thread, where nothing may block.
Gained partitions are paused there, and taken over in this thread right after ``poll`` returns: the daemon
restores their state (it may read the changelog and the committed offsets), then they are sought and
resumed. With confluent-kafka see ``confluent.ConfluentSource``.
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

from lifelong.config import Config
from lifelong.errors import LifelongError
from lifelong.kafka.options import client_options

log = logging.getLogger(__name__)
# A full queue waits this long for room before the partitions are paused (learning slower than that still never
# misses max.poll.interval.ms). A pause costs either client its next fetches: librdkafka drops what it fetched
# ahead, and kafka-python's poll sleeps retry_backoff_ms (100 ms) while every partition is paused, so the first
# fetch after the resume comes that much later. Pausing as soon as the queue filled made kafka-python's replica
# swing into batches a retry backoff old at half its rate, its latency several times higher.
ROOM_WAIT_S = 1.0
# How long kafka-python polls while the replica has no partitions (``KafkaSource._poll``): the group's join ends
# mid-poll (brokers hold a new group's first join 3 s: 7.5 polls), so the poll awaiting it takes its answer
JOIN_POLL_MS = 400


@dataclass
class Batch:
    """Records of one poll, tagged with the assignment generation they were fetched under."""

    records: list[Any]
    generation: int
    polled_at: float = field(default_factory=time.time)


class Source:
    """The client-independent part of a source: the poll thread, the bounded queue and back-pressure, commits
    asked for by the daemon, take-over of gained partitions and broker health. A client implements the
    ``_open`` ... ``_close`` steps below (see ``KafkaSource``; ``confluent.ConfluentSource``)."""

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
        # commits for the poll thread: offsets, the daemon's waiter (None: nobody waits), the generation
        self.commands: queue.Queue[tuple[dict[TopicPartition, int], Future[None] | None, int]] = queue.Queue()
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
        self.room_wait_s = ROOM_WAIT_S  # polls keep coming at least this often
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lifelong-poll", daemon=True)

    # --- what a client implements (all called in the poll thread) ---

    def _open(self) -> None:
        """Create the consumer and subscribe to ``kafka.events_topic`` with this source's rebalance callbacks."""
        raise NotImplementedError

    def _poll(self, timeout_s: float, max_records: int) -> list[Any]:
        """Records with ``topic partition offset key value timestamp`` (ms) attributes; may run callbacks."""
        raise NotImplementedError

    def _assignment(self) -> list[TopicPartition]:
        raise NotImplementedError

    def _pause(self, parts: list[TopicPartition]) -> None:
        raise NotImplementedError

    def _resume(self, parts: list[TopicPartition]) -> None:
        raise NotImplementedError

    def _place(self, positions: dict[TopicPartition, int | None]) -> None:
        """Fetch the gained partitions from these offsets (None: the group's committed one), unpaused."""
        raise NotImplementedError

    def _commit(self, offsets: dict[TopicPartition, int], wait: bool) -> None:
        raise NotImplementedError

    def _committed(self, tp: TopicPartition) -> int | None:
        raise NotImplementedError

    def _observe(self) -> None:
        """Update ``highwater`` and ``heartbeat_age``."""
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    # --- the daemon's side ---

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
            batch = self.batches.get(timeout=timeout)
        except queue.Empty:
            return None
        self._wake.set()
        return batch

    def commit(
        self, offsets: dict[TopicPartition, int], timeout: float | None = None, generation: int | None = None
    ) -> None:
        """Commit ``offsets`` (the next offset to read per partition) from the poll thread. With ``timeout``,
        wait for the answer (raises on failure); without, return at once: the poll thread logs a failure, and
        leaves the commit out if a rebalance comes after ``generation`` (by default now): the partitions may be
        another owner's by then."""
        done: Future[None] | None = None if timeout is None else Future()
        self.commands.put((offsets, done, self.generation if generation is None else generation))
        self._wake.set()
        if done is not None:
            done.result(timeout)

    def commit_async(self, offsets: dict[TopicPartition, int]) -> None:
        """Send a commit without waiting (rebalance callbacks, which run in the poll thread)."""
        mine = {tp: o for tp, o in offsets.items() if tp in self._assignment()}
        if mine:
            self._commit(mine, wait=False)

    def committed_offset(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of ``tp`` (in the poll thread: taking over gained partitions)."""
        if threading.current_thread() is not self._thread:
            raise LifelongError("the consumer is used outside the poll thread")
        return self._committed(tp)

    @property
    def broker_reachable(self) -> bool:
        """Heartbeats answered recently (a frozen or unreachable broker stops answering them)."""
        limit = 2 * self.cfg.kafka.session_timeout_ms / 3000 + 1
        return self.heartbeat_age < limit and time.monotonic() - self.last_poll < limit

    def drain(self) -> None:
        """Drop batches fetched before a rebalance: they will be fetched again after the seek."""
        while True:
            try:
                self.batches.get_nowait()
            except queue.Empty:
                return

    # --- the poll thread ---

    def _run(self) -> None:
        try:
            self._open()
            while not self._stop.is_set():
                self._serve_commands()
                self._backpressure()
                generation = self.generation
                records = self._poll(0.1, self.cfg.batching.max_events)
                now = time.monotonic()
                self.poll_gaps.append(now - self.last_poll)
                self.last_poll = now
                if self.gained:
                    gained, self.gained = self.gained, []
                    self._take_over(gained)
                if records and self.generation != generation:
                    # a rebalance ran inside this poll (librdkafka's callbacks do): what it fetched before is
                    # of the old assignment, and a partition given up is its new owner's to learn
                    owned = set(self.assigned)
                    records = [r for r in records if TopicPartition(r.topic, r.partition) in owned]
                self._observe()
                if records:
                    self.batches.put(Batch(records, self.generation))
        except BaseException as exc:  # noqa: BLE001 - reported to the daemon, which stops
            log.exception("poll loop failed")
            self.error = exc
        finally:
            self._serve_commands()
            self._close()

    def _serve_commands(self) -> None:
        while True:
            try:
                offsets, done, generation = self.commands.get_nowait()
            except queue.Empty:
                return
            if done is None and generation != self.generation:
                continue
            try:
                mine = {tp: o for tp, o in offsets.items() if tp in self._assignment()}
                if mine:
                    self._commit(mine, wait=True)
                    self.committed.update(mine)
                if done is not None:
                    done.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting daemon thread, or logged
                if done is None:
                    log.warning("offset commit failed (the checkpoint holds the offsets): %r", exc)
                else:
                    done.set_exception(exc)

    def _take_over(self, gained: list[TopicPartition]) -> None:
        """The daemon restores the partitions' state (it may read the changelog and the committed offsets); they
        are then fetched from the positions that state stands for."""
        positions = self.on_assign(gained)
        self._place({tp: positions.get(tp) for tp in gained})
        self.assigned = self.assigned + gained
        log.info(
            "partitions taken over: %s (positions %s)",
            _names(gained),
            {f"{tp.topic}-{tp.partition}": o for tp, o in positions.items()},
        )

    def _backpressure(self) -> None:
        deadline = time.monotonic() + self.room_wait_s
        while self.batches.full() and (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
            self._wake.clear()  # set by the daemon taking a batch or asking for a commit
            if self.batches.full() and self.commands.empty():
                self._wake.wait(min(left, 0.1))
            self._serve_commands()
        full = self.batches.full()
        parts = self._assignment()
        if full and not self.paused and parts:
            self._pause(parts)
            self.paused = True
        elif not full and self.paused:
            self._resume([tp for tp in parts if tp not in self.gained])
            self.paused = False

    def _leave(self, parts: list[TopicPartition], handler: Callable[[list[TopicPartition]], None], how: str) -> None:
        """Partitions revoked or lost (a rebalance callback): batches in the queue are dropped."""
        self.generation += 1
        self.drain()
        handler(list(parts))
        self.assigned = [tp for tp in self.assigned if tp not in parts]
        self.gained = [tp for tp in self.gained if tp not in parts]
        log.info("partitions %s: %s", how, _names(parts))

    def _gain(self, assigned: list[TopicPartition], now: bool = False) -> None:
        """Partitions assigned (a rebalance callback): taken over ``now`` where the callback may block, else
        paused until taken over after the poll returns."""
        self.generation += 1
        self.drain()
        self.paused = False
        log.info("partitions assigned: %s", _names(assigned))
        if now:
            self._take_over(list(assigned))
            return
        if assigned:
            self._pause(assigned)
        self.gained = list(assigned)


def _names(parts: list[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}-{tp.partition}" for tp in parts)


class KafkaSource(Source):
    """The kafka-python consumer (``kafka.client: kafka-python``). It is not thread-safe: everything runs in
    the poll thread, and its rebalance callbacks run on its IO thread, where nothing may block."""

    consumer: KafkaConsumer | None = None

    @property
    def client(self) -> KafkaConsumer:
        """The consumer, which the poll thread creates when it starts (using it earlier is a bug)."""
        if self.consumer is None:
            raise LifelongError("used before the Kafka clients were started")
        return self.consumer

    def _open(self) -> None:
        kafka_cfg = self.cfg.kafka
        self.consumer = KafkaConsumer(
            group_id=kafka_cfg.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=kafka_cfg.session_timeout_ms,
            heartbeat_interval_ms=max(100, kafka_cfg.session_timeout_ms // 3),
            max_poll_interval_ms=kafka_cfg.max_poll_interval_ms,
            max_poll_records=self.cfg.batching.max_events,
            fetch_max_wait_ms=self.cfg.batching.max_ms,  # a broker holding fetches adds to every latency
            fetch_max_bytes=max(50 * 1024 * 1024, kafka_cfg.max_message_bytes),
            max_partition_fetch_bytes=max(1024 * 1024, kafka_cfg.max_message_bytes),
            client_id="lifelong",
            **client_options(self.cfg),
        )
        self.consumer.subscribe([kafka_cfg.events_topic], listener=_Listener(self))

    def _poll(self, timeout_s: float, max_records: int) -> list[Any]:
        # at most the broker's fetch wait: a poll that finds no fetch in flight (now and then under load, between
        # one fetch's completion and the next one's send) sleeps for its timeout, up to retry_backoff_ms (100
        # ms), while events wait at the broker
        timeout_ms = max(1, min(int(timeout_s * 1000), self.cfg.batching.max_ms))
        if not self.assigned and not self.gained:
            # joining the group: kafka-python 3 sends the join again when it completes while no poll awaits it
            # (``join_group_async`` replaces a finished join task), another rebalance and 3 s more; with short
            # polls that happened in about a third of restarts
            timeout_ms = JOIN_POLL_MS
        records = self.client.poll(timeout_ms=timeout_ms, max_records=max_records)
        return [r for rs in records.values() for r in rs]

    def _assignment(self) -> list[TopicPartition]:
        return list(self.client.assignment())

    def _pause(self, parts: list[TopicPartition]) -> None:
        self.client.pause(*parts)

    def _resume(self, parts: list[TopicPartition]) -> None:
        self.client.resume(*parts)

    def _place(self, positions: dict[TopicPartition, int | None]) -> None:
        for tp, offset in positions.items():
            if offset is not None:
                self.client.seek(tp, offset)
        self.client.resume(*positions)

    def _commit(self, offsets: dict[TopicPartition, int], wait: bool) -> None:
        meta = {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
        if wait:
            self.client.commit(meta)
        else:
            self.client.commit_async(meta)

    def _committed(self, tp: TopicPartition) -> int | None:
        got = self.client.committed(tp)
        return None if got is None else int(got)

    def _observe(self) -> None:
        consumer = self.client
        for tp in self.assigned:
            hw = consumer.highwater(tp)
            if hw is not None:
                self.highwater[tp] = hw
        metrics = consumer.metrics().get("consumer-coordinator-metrics", {})
        age = metrics.get("last-heartbeat-seconds-ago", 0.0)
        self.heartbeat_age = 0.0 if age == float("inf") else float(age)

    def _close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # kafka-python has no type hints
    def __init__(self, source: KafkaSource):
        self.source = source

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.source._leave(revoked, self.source.on_revoke, "revoked")

    def on_partitions_lost(self, lost: list[TopicPartition]) -> None:
        self.source._leave(lost, self.source.on_lost, "lost (evicted from the group)")

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.source._gain(assigned)
