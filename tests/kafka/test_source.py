"""The source's poll loop over an in-memory log: rebalances, backpressure, commits; and kafka-python's waits."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from kafka import TopicPartition

from lifelong.config import load_config
from lifelong.kafka.source import JOIN_POLL_MS, KafkaSource

from fakes import FakeSource, Rec, wait

TP0, TP1 = TopicPartition("ev", 0), TopicPartition("ev", 1)


@pytest.fixture
def cfg():
    return load_config(env={}, overrides={"batching.queue_batches": 2, "batching.max_events": 3})


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
