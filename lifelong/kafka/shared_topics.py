"""Readers of the two topics replicas share (README "Scaling out"): the knowledge log and the task changelog.

Both are plain consumers outside the group (``assign``, no commits): the knowledge log is read whole, in
order, by every replica; a changelog partition is read when its events partition is gained.
"""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from lifelong.config import Config
from lifelong.errors import LifelongError
from lifelong.kafka.options import client_options


def _consumer(cfg: Config) -> KafkaConsumer:
    return KafkaConsumer(
        group_id=None,
        enable_auto_commit=False,
        client_id="lifelong-shared",
        max_partition_fetch_bytes=max(1024 * 1024, cfg.kafka.max_message_bytes),
        fetch_max_bytes=max(50 * 1024 * 1024, cfg.kafka.max_message_bytes),
        **client_options(cfg),
    )


class KnowledgeLog:
    """The knowledge topic (one partition: one order for every replica), read from ``offset`` on."""

    def __init__(self, cfg: Config, offset: int):
        self.tp = TopicPartition(cfg.kafka.knowledge_topic, 0)
        self.consumer = _consumer(cfg)
        self.consumer.assign([self.tp])
        self.consumer.seek(self.tp, offset)
        self.offset = offset

    def poll(self, timeout_s: float = 0.0) -> list[Any]:
        """Records since the last call, in log order."""
        got = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        records = got.get(self.tp, [])
        if records:
            self.offset = records[-1].offset + 1
        return list(records)

    def end(self) -> int:
        """The knowledge log's end offset as the broker reports it."""
        return int(self.consumer.end_offsets([self.tp])[self.tp])

    def close(self) -> None:
        """Close the consumer."""
        self.consumer.close(autocommit=False)


def read_changelog(
    cfg: Config, partition: int, committed: int | None, timeout_s: float
) -> tuple[dict[str, tuple[bytes, int]], int]:
    """The state of each task of events ``partition`` to restore, with the position its record covers.

    A record written at position P holds a task's state after exactly its events below P. Per task this
    takes the newest record at or below the committed offset: records of a checkpoint whose commit never
    happened are skipped, and the events after the committed offset are learned again. When there is no
    such record (the task was new since, or compaction removed the committed version in favour of a newer
    one), it takes the newest record: the caller then skips that task's events below its position.
    Returns {task: (record, position)} and how many records were read.
    """
    tp = TopicPartition(cfg.kafka.changelog_topic, partition)
    consumer = _consumer(cfg)
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = int(consumer.end_offsets([tp])[tp])
        at_commit: dict[str, tuple[bytes, int]] = {}
        newest: dict[str, tuple[bytes, int]] = {}
        seen = 0
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() > deadline:
                raise LifelongError(
                    f"reading changelog partition {partition} took longer than {timeout_s:.0f}s "
                    f"({seen} of {end} records)"
                )
            past = consumer.position(tp) >= end
            got = consumer.poll(timeout_ms=100 if past else 200).get(tp, [])
            if not got and past:
                break  # past the end offset and nothing more (tansu may report the end one short)
            for r in got:
                seen += 1
                position = dict(r.headers or []).get("position", b"")
                if r.key is None or not position.isdigit():
                    continue
                task, entry = r.key.decode(errors="replace"), (r.value, int(position))
                newest[task] = entry
                if committed is not None and entry[1] <= committed:
                    at_commit[task] = entry
        return {**newest, **at_commit}, seen
    finally:
        consumer.close(autocommit=False)
