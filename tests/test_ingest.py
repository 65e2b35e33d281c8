"""The ingest step, the source's poll loop, and a whole daemon on them, with in-memory fakes: no broker, a few
seconds in all."""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from kafka import TopicPartition

from lifelong.config import load_config
from lifelong.core.events import Schema
from lifelong.kafka.sink import Sink
from lifelong.kafka.source import JOIN_POLL_MS, KafkaSource, Source
from lifelong.service.ingest import ingest
from lifelong.tools.broker import free_port

from kafka_helpers import ThreadDaemon

SCHEMA = Schema(dim=2)
TP0, TP1 = TopicPartition("ev", 0), TopicPartition("ev", 1)


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp: int = 1_700_000_000_000


def rec(partition: int, offset: int, task: str = "a", **fields: Any) -> Rec:
    event = {"task": task, "id": f"{task}-{partition}-{offset}", "x": [1.0, 2.0], "y": 1, **fields}
    return Rec("ev", partition, offset, json.dumps(event).encode())


def run(records, positions=None, floor=None, known=(), max_tasks=100):
    positions = {} if positions is None else positions
    return ingest(records, SCHEMA, positions, floor or {}, set(known), len(known), max_tasks), positions


def test_records_below_the_position_are_skipped_and_positions_advance_per_partition():
    got, positions = run([rec(0, 5), rec(1, 0), rec(0, 6), rec(0, 7)], positions={TP0: 6})
    assert [e.id for e in got.events] == ["a-1-0", "a-0-6", "a-0-7"]  # offset 5 was learned before the seek
    assert positions == {TP0: 8, TP1: 1}
    again, _ = run([rec(0, 6), rec(0, 7)], positions=positions)
    assert again.events == [] and again.rejected == []


def test_invalid_payloads_are_rejected_with_the_reason_and_their_neighbours_go_on():
    a_bool = b'{"task": "a", "id": "z", "x": [1, true], "y": 1}'
    bad = [Rec("ev", 0, 1, b"not json"), Rec("ev", 0, 2, None), Rec("ev", 0, 3, a_bool)]
    got, positions = run([rec(0, 0), *bad, rec(0, 4)])
    assert [e.id for e in got.events] == ["a-0-0", "a-0-4"]
    assert [(r.offset, exc.field) for r, exc in got.rejected] == [(1, "payload"), (2, "payload"), (3, "x")]
    assert positions[TP0] == 5  # a rejected record is behind us too: never read again


def test_new_tasks_past_max_tasks_are_rejected_known_ones_go_on():
    records = [rec(0, 0, "old"), rec(0, 1, "new1"), rec(0, 2, "new2"), rec(0, 3, "new1"), rec(0, 4, "old")]
    got, _ = run(records, known=("old",), max_tasks=2)
    assert [e.task for e in got.events] == ["old", "new1", "new1", "old"]
    ((r, exc),) = got.rejected
    assert r.offset == 2 and exc.field == "task" and "max_tasks" in str(exc)


def test_events_below_their_task_floor_are_skipped_and_timestamps_come_from_the_record():
    got, positions = run([rec(0, 3, "a"), rec(0, 4, "b"), rec(0, 5, "a"), rec(0, 6, "a", ts=12.5)], floor={"a": 5})
    assert [e.id for e in got.events] == ["a-0-4".replace("a", "b", 1), "a-0-5", "a-0-6"]
    assert [e.ts for e in got.events] == [1_700_000_000.0, 1_700_000_000.0, 12.5]
    assert positions[TP0] == 7


class FakeSource(Source):
    """A source over an in-memory log: what a Kafka client would do, minus the network."""

    def __init__(self, cfg, log: dict[TopicPartition, list[Rec]], **callbacks):
        super().__init__(cfg, **callbacks)
        self.log = log
        self.position: dict[TopicPartition, int] = {}
        self.assignment: list[TopicPartition] = []
        self.paused_parts: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.group_committed: dict[TopicPartition, int] = {}
        self.rebalance: list[TopicPartition] | None = None  # the next poll assigns these (after revoking all)
        # librdkafka's way: the rebalance runs inside the poll after some records were fetched, and gained
        # partitions are taken over right there
        self.rebalance_late = False
        self.polls = 0

    def _open(self) -> None:
        pass

    def _poll(self, timeout_s: float, max_records: int) -> list[Any]:
        self.polls += 1
        if not self.rebalance_late:
            self._rebalance()
        out = []
        for tp in self.assignment:
            if tp in self.paused_parts:
                continue
            at = self.position[tp]
            got = self.log[tp][at : at + max_records - len(out)]
            out += got
            self.position[tp] = at + len(got)
        if self.rebalance_late:
            self._rebalance()
        if not out:
            time.sleep(timeout_s / 10)
        return out

    def _rebalance(self) -> None:
        if self.rebalance is None:
            return
        new, self.rebalance = self.rebalance, None
        if self.assignment:
            self._leave(self.assignment, self.on_revoke, "revoked")
        self.assignment = list(new)
        for tp in new:
            self.position[tp] = self.group_committed.get(tp, 0)
        self._gain(new, now=self.rebalance_late)

    def _assignment(self):
        return list(self.assignment)

    def _pause(self, parts):
        self.paused_parts |= set(parts)

    def _resume(self, parts):
        self.paused_parts -= set(parts)

    def _place(self, positions):
        for tp, offset in positions.items():
            self.position[tp] = self.group_committed.get(tp, 0) if offset is None else offset
        self.paused_parts -= set(positions)

    def _commit(self, offsets, wait):
        self.commits.append(dict(offsets))
        self.group_committed.update(offsets)

    def _committed(self, tp):
        return self.group_committed.get(tp)

    def _observe(self):
        self.highwater = {tp: len(self.log[tp]) for tp in self.assignment}

    def _close(self):
        pass


@pytest.fixture
def cfg():
    return load_config(env={}, overrides={"batching.queue_batches": 2, "batching.max_events": 3})


def wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_gained_partition_is_taken_over_at_the_daemons_position_then_read(cfg):
    log = {TP0: [Rec("ev", 0, i, b"{}") for i in range(10)]}
    calls = []

    def on_assign(parts):
        calls.append((threading.current_thread().name, list(parts)))
        return {TP0: 4}  # the daemon's restored state stands for offsets below 4

    src = FakeSource(cfg, log, on_assign=on_assign, on_revoke=lambda p: None, on_lost=lambda p: None)
    src.rebalance = [TP0]
    src.start()
    try:
        offsets = []
        while len(offsets) < 6:
            batch = src.get(2.0)
            assert batch is not None
            offsets += [r.offset for r in batch.records]
    finally:
        src.stop(2.0)
    assert offsets == [4, 5, 6, 7, 8, 9]
    assert calls == [("lifelong-poll", [TP0])]  # in the poll thread, which may block on the changelog
    assert src.assigned == [TP0]


def test_a_full_queue_pauses_the_partitions_and_resumes_them_with_room_without_loss(cfg):
    log = {TP0: [Rec("ev", 0, i, b"{}") for i in range(60)]}
    src = FakeSource(cfg, log, on_assign=lambda p: {}, on_revoke=lambda p: None, on_lost=lambda p: None)
    src.room_wait_s = 0.05
    src.rebalance = [TP0]
    src.start()
    try:
        wait(lambda: src.paused)  # nobody reads: two batches queued, the partition paused
        assert src.paused_parts == {TP0} and src.batches.full()
        polls = src.polls
        wait(lambda: src.polls > polls + 3)  # still polling while paused (the group keeps us)
        seen = []
        while len(seen) < 60:
            batch = src.get(1.0)
            assert batch is not None
            seen += [r.offset for r in batch.records]
        assert seen == list(range(60))  # in order, none lost or read twice
        wait(lambda: not src.paused)
    finally:
        src.stop(2.0)


def test_a_queue_full_for_less_than_the_room_wait_is_not_paused(cfg):
    """A pause costs the clients their next fetches (kafka-python sleeps 100 ms, librdkafka drops what it fetched
    ahead): a loop that takes a batch within ``ROOM_WAIT_S`` (1 s) keeps the partitions fetching."""
    log = {TP0: [Rec("ev", 0, i, b"{}") for i in range(60)]}
    src = FakeSource(cfg, log, on_assign=lambda p: {}, on_revoke=lambda p: None, on_lost=lambda p: None)
    src.rebalance = [TP0]
    src.start()
    try:
        seen: list[int] = []
        for _ in range(5):
            wait(src.batches.full)
            time.sleep(0.2)  # a slow batch in the loop
            seen += [r.offset for r in src.get(1.0).records]
            assert not src.paused and not src.paused_parts
        while len(seen) < 60:
            seen += [r.offset for r in src.get(1.0).records]
        assert seen == list(range(60))
    finally:
        src.stop(2.0)


def test_kafka_pythons_poll_waits_at_most_the_brokers_fetch_wait(cfg):
    """kafka-python's poll sleeps for its whole timeout (up to 100 ms) when it finds no fetch in flight, which
    happens now and then under load: events waited that long at the broker. It is given ``batching.max_ms``."""
    timeouts: list[int] = []
    src = KafkaSource(cfg, on_assign=lambda p: {}, on_revoke=lambda p: None, on_lost=lambda p: None)
    src.consumer = SimpleNamespace(poll=lambda timeout_ms, max_records: timeouts.append(timeout_ms) or {})
    src.assigned = [TopicPartition("events", 0)]
    assert src._poll(0.1, 3) == [] and src._poll(0.0, 3) == []
    assert timeouts == [cfg.batching.max_ms, 1]


def test_kafka_python_waits_for_its_group_join_inside_one_poll(cfg):
    """A join that completes between two polls is sent again by kafka-python 3, and the group rebalances once
    more (3 s on tansu, as on Kafka by default): restarts took 8-24 s instead of 5-6 in 13 of 40. Until it has
    partitions, the source polls for ``JOIN_POLL_MS``; once they are taken over, for the fetch wait again."""
    timeouts: list[int] = []
    src = KafkaSource(cfg, on_assign=lambda p: {}, on_revoke=lambda p: None, on_lost=lambda p: None)
    src.consumer = SimpleNamespace(poll=lambda timeout_ms, max_records: timeouts.append(timeout_ms) or {})
    src._poll(0.1, 3)
    src.gained = [TopicPartition("events", 0)]
    src._poll(0.1, 3)
    assert timeouts == [JOIN_POLL_MS, cfg.batching.max_ms]


def test_commits_run_in_the_poll_thread_and_queued_batches_of_a_revoked_assignment_are_dropped(cfg):
    log = {TP0: [Rec("ev", 0, i, b"{}") for i in range(6)], TP1: [Rec("ev", 1, i, b"{}") for i in range(6)]}
    revoked = []
    src = FakeSource(cfg, log, on_assign=lambda p: {}, on_revoke=revoked.extend, on_lost=lambda p: None)
    src.rebalance = [TP0]
    src.start()
    try:
        wait(lambda: src.batches.full())
        src.commit({TP0: 3, TP1: 9}, timeout=2.0)  # TP1 is not ours: left out
        assert src.commits == [{TP0: 3}] and src.committed == {TP0: 3}
        generation = src.generation
        src.rebalance = [TP1]
        src.get(0.01)  # room for the poll that rebalances
        wait(lambda: src.generation > generation + 1)
        assert revoked == [TP0]
        batch = src.get(1.0)
        assert batch is not None and batch.generation == src.generation
        assert {r.partition for r in batch.records} == {1}  # what TP0 had queued was dropped
    finally:
        src.stop(2.0)


def test_records_fetched_before_a_rebalance_inside_the_same_poll_never_reach_the_daemon_for_partitions_given_up(cfg):
    # librdkafka runs rebalance callbacks inside consume(): what the same poll fetched before one is of the old
    # assignment; a record of a partition now owned elsewhere must not be learned here (its owner learns it)
    log = {TP0: [Rec("ev", 0, i, b"{}") for i in range(6)], TP1: [Rec("ev", 1, i, b"{}") for i in range(6)]}
    src = FakeSource(cfg, log, on_assign=lambda p: {}, on_revoke=lambda p: None, on_lost=lambda p: None)
    src.assignment = [TP0, TP1]
    src.position = {TP0: 0, TP1: 0}
    src.assigned = [TP0, TP1]
    src.rebalance, src.rebalance_late = [TP1], True
    src.start()
    try:
        seen = []
        while len(seen) < 6:
            batch = src.get(1.0)
            assert batch is not None and batch.generation == src.generation
            seen += [(r.partition, r.offset) for r in batch.records]
    finally:
        src.stop(2.0)
    assert all(p == 1 for p, _ in seen), seen
    assert sorted(set(seen)) == [(1, i) for i in range(6)]


def test_a_queued_commit_is_sent_by_the_poll_thread_unless_a_rebalance_comes_first(cfg):
    log = {TP0: [Rec("ev", 0, i, b"{}") for i in range(3)], TP1: [Rec("ev", 1, i, b"{}") for i in range(3)]}
    src = FakeSource(cfg, log, on_assign=lambda p: {}, on_revoke=lambda p: None, on_lost=lambda p: None)
    src.rebalance = [TP0]
    src.start()
    try:
        wait(lambda: src.assigned == [TP0])
        src.commit({TP0: 2})  # returns at once; the poll thread commits
        wait(lambda: src.committed == {TP0: 2})
        generation = src.generation
        src.commands.put(({TP0: 1}, None, generation - 1))  # queued under an earlier assignment: left out
        src.commit({TP0: 3})
        wait(lambda: src.committed == {TP0: 3})
        assert src.commits == [{TP0: 2}, {TP0: 3}]
    finally:
        src.stop(2.0)


def test_tasks_waiting_in_the_task_store_are_known_near_max_tasks_and_the_store_is_asked_only_there():
    asked = []

    def stored(names):
        asked.append(list(names))
        return {n for n in names if n == "back"}

    records = [rec(0, 0, "old"), rec(0, 1, "back"), rec(0, 2, "new1"), rec(0, 3, "new2"), rec(0, 4, "back")]
    # the engine knows 2 tasks: "old" resident, "back" in its store; room for one more
    got = ingest(records, SCHEMA, {}, {}, {"old"}, 2, 3, stored)
    assert [e.task for e in got.events] == ["old", "back", "new1", "back"]
    ((r, exc),) = got.rejected
    assert r.offset == 3 and "max_tasks" in str(exc)
    assert asked == [["back", "new1"], ["new2"]]  # once the limit is near, each candidate once
    roomy = ingest(records, SCHEMA, {}, {}, {"old"}, 2, 100, stored)
    assert not roomy.rejected and len(asked) == 2  # far from the limit: no lookup


class MemorySink(Sink):
    """Keeps what a daemon sends: (value, headers) by topic."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.topics: dict[str, list[tuple[bytes, dict]]] = collections.defaultdict(list)

    def _send(self, topic, value, key, partition=None, headers=None, where=None):
        self.topics[topic].append((value, dict(headers or [])))

    def flush(self, timeout):
        return 0

    def close(self, timeout):
        pass


def test_a_daemon_on_an_in_memory_log_predicts_each_event_once_across_a_restart(tmp_path, monkeypatch):
    """The whole loop with the source and sink passed in: every valid event predicted once, in order, the bad
    one dead-lettered with its reason; at SIGTERM a checkpoint and the group commit; a new daemon on that
    checkpoint goes on from the committed offset with the state it left."""
    monkeypatch.setattr("lifelong.service.daemon.ensure_topics", lambda cfg: None)  # no broker to create topics on
    monkeypatch.setattr("lifelong.service.replicas.committed_offsets", lambda cfg: {})
    overrides = {"engine.dim": 2, "kafka.events_topic": "ev", "kafka.knowledge_topic": "", "kafka.changelog_topic": ""}
    cfg = load_config(env={}, overrides={**overrides, "checkpoint.dir": str(tmp_path), "metrics.port": free_port()})
    log = {TP0: [rec(0, i, f"t{i % 3}") for i in range(40)]}
    log[TP0][7] = Rec("ev", 0, 7, b"not json")
    group: dict[TopicPartition, int] = {}  # the group's committed offsets

    def serve(n: int) -> tuple[MemorySink, Any]:
        sink = MemorySink(cfg)

        def source(cfg, on_assign, on_revoke, on_lost):
            src = FakeSource(cfg, log, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
            src.group_committed, src.rebalance = group, [TP0]
            return src

        with ThreadDaemon(cfg, source=source, sink=lambda cfg: sink) as daemon:
            wait(lambda: len(sink.topics[cfg.kafka.predictions_topic]) >= n, timeout=60)
        return sink, daemon

    def ids(sink):
        return [json.loads(v)["id"] for v, _ in sink.topics[cfg.kafka.predictions_topic]]

    sink, first = serve(39)
    assert ids(sink) == [f"t{i % 3}-0-{i}" for i in range(40) if i != 7]
    ((payload, headers),) = sink.topics[cfg.kafka.dead_letter_topic]
    assert payload == b"not json" and b"not JSON" in headers["error"] and headers["source_offset"] == b"7"
    assert group == {TP0: 40} and list(tmp_path.glob("checkpoint-*.ckpt"))
    log[TP0] += [rec(0, i, f"t{i % 3}") for i in range(40, 60)]
    sink, second = serve(20)
    assert ids(sink) == [f"t{i % 3}-0-{i}" for i in range(40, 60)]  # nothing before the commit again
    assert second.engine.events_seen == first.engine.events_seen + 20 == 59 and group == {TP0: 60}
