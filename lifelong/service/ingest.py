"""The ingest step, without a broker: polled records in, events to learn and rejections out.

Per record, in order: below its partition's position (seen again after a seek) -> skipped, already learned;
not a valid event, or a new task past ``engine.max_tasks`` -> rejected (the daemon dead-letters it with the
reason); below its task's floor (already in the task's state restored from the changelog) -> skipped; else an
event, stamped with the record's timestamp when it carries none. The payloads are decoded as one batch
(``events.decode_many``).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition

from lifelong.core.events import Event, Schema, decode_many
from lifelong.errors import InvalidEvent


@dataclass
class Ingested:
    """What ``ingest`` made of a batch of records."""

    events: list[Event] = field(default_factory=list)
    sources: list[Any] = field(default_factory=list)  # the record of each event
    rejected: list[tuple[Any, InvalidEvent]] = field(default_factory=list)


def ingest(
    records: Sequence[Any],
    schema: Schema,
    positions: dict[TopicPartition, int],
    floor: dict[str, int],
    known: Container[str],
    n_known: int,
    max_tasks: int,
    stored: Callable[[list[str]], set[str]] | None = None,
) -> Ingested:
    """Sort ``records`` (``topic partition offset value timestamp`` attributes) out, advancing ``positions`` (the
    next offset to read per partition) past each one; the engine knows ``n_known`` tasks: ``known`` (resident)
    and those ``stored`` says its task store holds (asked only when a new task would reach ``max_tasks``)."""
    fresh, tp = [], TopicPartition("", -1)
    for r in records:
        if r.partition != tp.partition or r.topic != tp.topic:  # a poll's records come partition by partition
            tp = TopicPartition(r.topic, r.partition)
        if r.offset < positions.get(tp, -1):
            continue
        positions[tp] = r.offset + 1
        fresh.append(r)
    out = Ingested()
    new: set[str] = set()  # tasks the batch creates
    held: set[str] = set()  # and tasks of it found in the task store: known
    asked: set[str] = set()
    for r, e in zip(fresh, decode_many([r.value for r in fresh], schema), strict=True):
        if isinstance(e, Event) and e.task not in known and e.task not in new and e.task not in held:
            if n_known + len(new) >= max_tasks and stored is not None:  # only near the limit: a store lookup
                ask = [t for t in new if t not in asked] + [e.task]
                asked.update(ask)
                found = stored(ask)
                held |= found
                new -= found
            if e.task in held:
                pass
            elif n_known + len(new) >= max_tasks:
                e = InvalidEvent("task", f"engine.max_tasks ({max_tasks}) reached")
            else:
                new.add(e.task)
        if isinstance(e, InvalidEvent):
            out.rejected.append((r, e))
            continue
        if r.offset < floor.get(e.task, -1):
            continue
        if e.ts is None:
            e.ts = r.timestamp / 1000.0
        e.partition = r.partition
        out.events.append(e)
        out.sources.append(r)
    return out
