"""What a replica does for the tasks of its partitions, beyond learning them: two implementations of one
interface, chosen once by the configuration (``Daemon`` has no branch on it).

- ``Standalone`` (no scale-out topics): the replica's checkpoint is its whole state. Without one, offsets its
  group committed stand for state that is lost: it refuses to start (``check_state``).
- ``ScaleOut`` (``kafka.knowledge_topic`` and ``kafka.changelog_topic`` set; README "Scaling out"): replicas
  share one consumer group. Published KB members go to the knowledge topic and join the KB only when read back
  from it, in log order, on every replica. Each checkpoint also writes the state of every task changed since
  the last one to the changelog (before the local checkpoint; each record tagged with its partition's
  position). A replica that gains a partition keeps its own state of it only when that state is at the
  committed offset; otherwise it restores the partition's tasks from the changelog (per task, the newest
  record at or below the committed offset, see ``shared.read_changelog``) before it fetches an event of it
  or reports ready; tasks of partitions it no longer owns leave its memory and task store.

Every method runs under the daemon's processing lock unless it says otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from kafka import TopicPartition

from lifelong.config import Config
from lifelong.core.engine import Engine
from lifelong.core.handover import pack_tasks
from lifelong.core.knowledge import Staged
from lifelong.errors import LifelongError, StateError, started
from lifelong.kafka.admin import committed_offsets
from lifelong.kafka.factory import open_sink
from lifelong.kafka.shared_topics import KnowledgeLog, read_changelog
from lifelong.kafka.sink import Sink
from lifelong.kafka.source import Source
from lifelong.service.commit import Changelog, Checkpointer, Rest
from lifelong.service.metrics import Metrics
from lifelong.storage.wire import Refused

log = logging.getLogger(__name__)
KNOWLEDGE_EVERY_S = 0.2  # how often the main loop reads the knowledge log
SENT_KEPT = 10_000  # members sent and kept until read back from the knowledge log
CHANGELOG_CHUNK = 256  # changelog records packed and sent between two of the checkpoint writer's rests


class Host(Protocol):
    """What a replica reads and sets of the daemon that runs it."""

    cfg: Config
    engine: Engine
    lock: threading.RLock
    assigned: list[TopicPartition]
    positions: dict[TopicPartition, int]
    checkpointer: Checkpointer
    metrics: Metrics
    sink: Sink | None
    source: Source | None
    dirty: bool
    ended: set[str]
    restored: bool
    reset_state: bool
    stopping: threading.Event

    @property
    def storage_error(self) -> str | None:
        """Why the last checkpoint could not be written, or None."""

    def checkpoint(self, timeout: float, commit_by: str = "wait") -> Path | None:
        """Run the commit protocol."""


class Standalone:
    """A replica that shares nothing: its checkpoint is its whole state."""

    def __init__(self, daemon: Host):
        self.daemon = daemon
        # Where the engine's published members go (``Engine.publisher``): None, into its own KB at once.
        self.publisher: Callable[[list[Staged]], None] | None = None
        self.floor: dict[str, int] = {}  # task -> its events below this offset are in its restored state

    def restore(self, extra: dict[str, Any]) -> None:
        """Take what a checkpoint's daemon metadata holds for this kind of replica."""

    def extra(self) -> dict[str, Any]:
        """What a checkpoint holds for this kind of replica (copies: it may be written while the loop goes on)."""
        return {}

    def check_state(self) -> None:
        """Never a silent fresh start: without a usable checkpoint, offsets the group committed stand for
        state that is lost (main thread, before joining the group)."""
        daemon = self.daemon
        if daemon.restored:
            return
        committed = committed_offsets(daemon.cfg)
        if committed and not daemon.reset_state:
            k = daemon.cfg.kafka
            raise StateError(
                f"no usable checkpoint in {daemon.cfg.checkpoint.dir}, but group {k.group_id!r} committed "
                f"offsets {committed} of {k.events_topic!r}: the state they stand for is lost. Restore "
                f"the checkpoint directory, or run once with --reset-state to start with an empty "
                f"engine from the committed offsets"
            )
        if committed:
            log.warning("--reset-state: starting with an empty engine from the committed offsets %s", committed)

    def start(self) -> None:
        """Before joining the group (main thread)."""

    def tick(self) -> None:
        """Each turn of the main loop (main thread, outside the lock)."""

    def gained(self, partitions: list[TopicPartition]) -> None:
        """Partitions assigned (poll thread; ``Daemon.assigned`` holds them already)."""

    def revoking(self, partitions: list[TopicPartition]) -> None:
        """Partitions about to be given up (poll thread)."""

    def dropped(self, partitions: list[TopicPartition]) -> None:
        """Partitions given up or lost."""

    def learned(self, events: list[Any], sources: list[Any]) -> None:
        """A batch learned: its ``events`` and the records they came from."""

    changelog: Changelog | None = None  # the commit protocol's changelog step, if any (``ScaleOut._changelog``)

    def foreign_tasks(self) -> set[int]:
        """Resident tasks (rows) of partitions this replica does not own now."""
        return set()

    def finish(self) -> None:
        """Before the shutdown checkpoint (main thread, outside the lock)."""

    def close(self) -> None:
        """After the loop."""


class ScaleOut(Standalone):
    """A replica sharing its knowledge base and its tasks' state with the others (module docstring)."""

    def __init__(self, daemon: Host):
        super().__init__(daemon)
        # published members wait here for the next batch's end, then go to the knowledge log; they join the KB
        # (every replica's) when read back from it
        self.outbox: list[Staged] = []
        self.publisher = self.outbox.extend
        self.task_partition: dict[str, int] = {}  # task -> the events partition its events arrive on
        self.knowledge_offset = 0  # the knowledge log has been applied up to here
        self.changed: set[str] = set()  # tasks to write to the changelog at the next checkpoint
        self.knowledge: KnowledgeLog | None = None
        self.knowledge_read = 0.0
        # members this replica sent and has not read back yet, by record: read back, they are not decoded
        self.sent: OrderedDict[bytes, Staged] = OrderedDict()
        self.changelog = self._changelog
        self.changelog_sink: Sink | None = None  # the checkpoint's writer sends the changelog on its own producer

    def restore(self, extra: dict[str, Any]) -> None:
        """Tasks' partitions, their floors and the knowledge log's offset."""
        self.task_partition = dict(extra.get("task_partition", {}))
        self.knowledge_offset = int(extra.get("knowledge_offset", 0))
        self.floor = dict(extra.get("floor", {}))

    def extra(self) -> dict[str, Any]:
        """Tasks' partitions, their floors and the knowledge log's offset (copies)."""
        return {
            "task_partition": dict(self.task_partition),
            "floor": dict(self.floor),
            "knowledge_offset": self.knowledge_offset,
        }

    def check_state(self) -> None:
        """Nothing to refuse: a replica restores its partitions' tasks from the changelog."""

    def start(self) -> None:
        """Open the knowledge log and read it to its end: a replica starts with the group's KB."""
        self.knowledge = KnowledgeLog(self.daemon.cfg, self.knowledge_offset)
        self.read_knowledge(until_end=True)
        self.changelog_sink = open_sink(self.daemon.cfg)

    def tick(self) -> None:
        """Read the knowledge log now and then."""
        if time.monotonic() - self.knowledge_read >= KNOWLEDGE_EVERY_S:
            self.read_knowledge()

    def finish(self) -> None:
        """Read the knowledge log to its end: the last checkpoint holds every member."""
        self.read_knowledge(until_end=True)

    def close(self) -> None:
        """Close the knowledge log and the changelog's producer."""
        if self.knowledge is not None:
            self.knowledge.close()
        if self.changelog_sink is not None:
            try:
                self.changelog_sink.close(timeout=self.daemon.cfg.shutdown_grace_s * 0.1)
            except Exception as exc:  # noqa: BLE001 - closing is best effort; state is already saved
                log.warning("closing the changelog's producer: %r", exc)

    def read_knowledge(self, until_end: bool = False) -> None:
        """Apply the knowledge log's new members in log order; refuse (and count) any record that is not one.

        With ``until_end``, read up to the log's current end first (bounded in time): a replica starts with
        the group's KB (main thread; takes the lock)."""
        daemon = self.daemon
        knowledge = started(self.knowledge)
        self.knowledge_read = time.monotonic()
        end = knowledge.end() if until_end else None
        deadline = time.monotonic() + 60.0
        while True:
            records = knowledge.poll(timeout_s=0.1 if until_end else 0.0)
            members = []
            for r in records:
                own = self.sent.pop(r.value, None)
                if own is not None:  # what decoding its record gives
                    members.append(Staged(-1, own.task_name, own.learned, 0, own.store))
                    continue
                try:
                    members.append(daemon.engine.kb.decode(r.value, daemon.cfg.kafka.max_message_bytes))
                except Refused as exc:
                    daemon.metrics.knowledge_refused.labels(exc.reason).inc()
                    log.warning("knowledge record at offset %d refused: %s", r.offset, exc)
            with daemon.lock:  # the KB and the offset it has read to change together (checkpoints read both)
                if members:
                    daemon.engine.apply(members)
                    daemon.dirty = True
                if records:
                    self.knowledge_offset = records[-1].offset + 1
            # past the end offset and nothing more (tansu may report the end one short)
            if end is None or (not records and knowledge.offset >= end) or time.monotonic() > deadline:
                break
        if until_end:
            log.info("knowledge base read to offset %d: %d members", knowledge.offset, daemon.engine.kb.size)

    def learned(self, events: list[Any], sources: list[Any]) -> None:
        """Each event's task is on its partition and changed; members published are sent."""
        daemon = self.daemon
        tasks = [e.task for e in events]
        for task, partition in dict.fromkeys(zip(tasks, [r.partition for r in sources], strict=True)):
            if self.task_partition.setdefault(task, partition) != partition:
                log.warning(
                    "task %r arrived on partition %d, earlier on %d: key events by task, so that each task has "
                    "one writer",
                    task,
                    partition,
                    self.task_partition[task],
                )
                self.task_partition[task] = partition
        self.changed.update(tasks)
        sink = started(daemon.sink)
        for snap, value in zip(self.outbox, daemon.engine.kb.encode(self.outbox), strict=True):
            sink.knowledge(snap.task_name, value)
            self.sent[value] = snap
            if len(self.sent) > SENT_KEPT:  # not read back (a lost delivery): decoded if it ever comes
                self.sent.popitem(last=False)
        self.outbox.clear()

    def _changelog(self) -> tuple[Callable[[float, Rest], None], Callable[[], None]]:
        """Every task changed since the last checkpoint, its state taken now, and (1) what sends those records
        to the changelog, each tagged with its partition's position (it holds the task's events below it), and
        waits for their delivery: the checkpoint's writer runs it, on a producer of its own, while the loop goes
        on; (2) what takes the step back when the checkpoint is postponed before sending (the tasks are changed
        still)."""
        daemon = self.daemon
        owned = {tp.partition: daemon.positions.get(tp, 0) for tp in daemon.assigned}
        tasks = [t for t in sorted(self.changed) if self.task_partition[t] in owned]
        extras: list[dict[str, Any]] = [
            {"partition": (p := self.task_partition[t]), "position": max(owned[p], self.floor.get(t, 0))} for t in tasks
        ]
        taken = daemon.engine.handover.take_tasks(tasks, extras)
        self.floor = {t: f for t, f in self.floor.items() if f > owned.get(self.task_partition[t], -1)}
        changed, self.changed = self.changed, set()

        def send(timeout: float, rest: Rest) -> None:
            sink, sent, i = started(self.changelog_sink), 0, 0
            busy = time.perf_counter()
            for records in pack_tasks(taken, CHANGELOG_CHUNK):
                for value in records:
                    at = extras[i]
                    sink.changelog(tasks[i], at["partition"], value, at["position"])
                    sent, i = sent + len(value), i + 1
                rest(time.perf_counter() - busy)
                busy = time.perf_counter()
            sink.flush(timeout)  # and any sent before whose checkpoint was postponed
            daemon.metrics.changelog_bytes.inc(sent)

        def undo() -> None:
            self.changed |= changed

        return send, undo

    def foreign_tasks(self) -> set[int]:
        """Resident tasks (rows) of partitions this replica does not own now."""
        owned = {tp.partition for tp in self.daemon.assigned}
        index = self.daemon.engine.tasks.index
        return {index[t] for t, p in self.task_partition.items() if p not in owned and t in index}

    def _forget_unowned(self) -> None:
        """Tasks of partitions this replica does not own after a rebalance leave its memory and task store:
        their owner holds them, and the changelog; one that comes back is restored from there (take-over)."""
        daemon = self.daemon
        owned = {tp.partition for tp in daemon.assigned if tp.topic == daemon.cfg.kafka.events_topic}
        gone = [t for t, p in self.task_partition.items() if p not in owned]
        if not gone:
            return
        daemon.engine.drop_tasks(gone)
        for t in gone:
            del self.task_partition[t]
            self.floor.pop(t, None)
            daemon.ended.discard(t)
        self.changed -= set(gone)
        for tp in [tp for tp in daemon.positions if tp.partition not in owned]:
            daemon.positions.pop(tp)
            daemon.checkpointer.moved(tp, None)
        log.info("dropped %d tasks of partitions owned elsewhere now", len(gone))

    def _take_over(self, tp: TopicPartition) -> None:
        """Make this replica's state of ``tp``'s tasks the committed one (poll thread, under the lock)."""
        daemon = self.daemon
        source = started(daemon.source)
        t0 = time.monotonic()
        offset = source.committed_offset(tp)
        p = tp.partition
        mine = [t for t, q in self.task_partition.items() if q == p]
        if offset is not None and offset == daemon.positions.get(tp):
            log.info(
                "partition %s-%d: local state is at the committed offset %d (%d tasks)", tp.topic, p, offset, len(mine)
            )
            return
        limit = max(30.0, daemon.cfg.kafka.max_poll_interval_ms / 2000)
        records, seen = read_changelog(daemon.cfg, p, offset, timeout_s=limit)
        decoded: dict[str, Any] = {}
        for task, (value, _) in records.items():
            try:
                decoded[task] = daemon.engine.handover.decode_task(value, daemon.cfg.kafka.max_message_bytes)
            except Refused as exc:
                log.error("changelog record of task %r refused: %s", task, exc)
        restored = list(decoded)
        # tasks held for this partition without a record: learned after the committed offset, so untrained
        # again and replayed from it
        decoded.update({task: None for task in mine if task not in decoded})
        daemon.engine.handover.load_tasks(decoded)
        self.task_partition.update({task: p for task in restored})
        newer = {t for t in restored if offset is None or records[t][1] > offset}
        self.floor = {t: f for t, f in self.floor.items() if self.task_partition.get(t) != p}
        self.floor.update({t: records[t][1] for t in newer})  # replay skips what these records already hold
        self.changed |= set(restored)  # rewritten at this replica's first checkpoint (see shared.read_changelog)
        if offset is None:
            daemon.positions.pop(tp, None)
        else:
            daemon.positions[tp] = offset
        daemon.checkpointer.moved(tp, offset)
        seconds = time.monotonic() - t0
        daemon.metrics.restore_seconds.observe(seconds)
        daemon.metrics.tasks_restored.inc(len(restored))
        at_commit = [t for t in restored if t not in newer]
        labels = sum(daemon.engine.n_labelled[daemon.engine.tasks.index[t]] for t in at_commit)
        log.info(
            "partition %s-%d: restored %d tasks (%d labels learned, state digest %s) from the changelog at "
            "committed offset %s, and %d from newer records (their events below those are skipped) in "
            "%.2fs; %d records read, %d refused",
            tp.topic,
            p,
            len(at_commit),
            labels,
            daemon.engine.handover.digest(at_commit),
            offset,
            len(newer),
            seconds,
            seen,
            len(records) - len(restored),
        )

    def gained(self, partitions: list[TopicPartition]) -> None:
        """Take each partition over, then drop the tasks of partitions owned elsewhere now."""
        for tp in partitions:
            self._take_over(tp)
        self._forget_unowned()

    def revoking(self, partitions: list[TopicPartition]) -> None:
        """Hand the partitions over at a checkpoint when one can be written now."""
        daemon = self.daemon
        if (
            daemon.dirty
            and daemon.sink is not None
            and daemon.source is not None
            and daemon.source.broker_reachable
            and not daemon.stopping.is_set()
            and daemon.storage_error is None
        ):
            try:  # hand the partitions over at a checkpoint: the next owner starts there once it is committed
                daemon.checkpoint(timeout=min(10.0, daemon.cfg.kafka.session_timeout_ms / 2000), commit_by="send")
            except LifelongError as exc:
                log.warning("no checkpoint before giving partitions up (%s): the next owner replays", exc)

    def dropped(self, partitions: list[TopicPartition]) -> None:
        """Their tasks are not written to the changelog by this replica any more."""
        gone = {tp.partition for tp in partitions if tp.topic == self.daemon.cfg.kafka.events_topic}
        self.changed = {t for t in self.changed if self.task_partition.get(t) not in gone}
