"""The ingest step without a broker: polled records in, events to learn and rejections out."""

from __future__ import annotations

from kafka import TopicPartition

from lifelong.core.events import Schema
from lifelong.service.ingest import ingest

from fakes import Rec, rec

SCHEMA = Schema(dim=2)
TP0, TP1 = TopicPartition("ev", 0), TopicPartition("ev", 1)


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
