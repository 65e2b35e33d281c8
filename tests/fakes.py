"""In-memory stand-ins for Kafka: a record, a source over an in-memory log, a sink that keeps what it is sent."""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition

from lifelong.kafka.sink import Sink
from lifelong.kafka.source import Source


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


def wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
