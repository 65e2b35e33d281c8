import json

import pytest

from lifelong.errors import InvalidEvent
from lifelong.events import Schema, decode, hash_index

SCHEMA = Schema(dim=3, tasks=frozenset())


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"{not json", "payload"),
        (b"\xff\xfe", "payload"),
        (b"[1, 2]", "event"),
        (b'{"x": [1, 2, 3], "y": 1}', "task"),
        (b'{"task": "", "x": [1, 2, 3], "y": 1}', "task"),
        (b'{"task": 5, "x": [1, 2, 3], "y": 1}', "task"),
        (json.dumps({"task": "a" * 300, "x": [1, 2, 3], "y": 1}).encode(), "task"),
        (b'{"task": "a", "x": [1, 2], "y": 1}', "x"),
        (b'{"task": "a", "x": [1, 2, "3"], "y": 1}', "x"),
        (b'{"task": "a", "x": [1, true, 3], "y": 1}', "x"),
        (b'{"task": "a", "x": "1,2,3", "y": 1}', "x"),
        (b'{"task": "a", "x": [1, NaN, 3], "y": 1}', "payload"),
        (b'{"task": "a", "x": [1, 1e999, 3], "y": 1}', "x"),
        (b'{"task": "a", "x": {"f": "high"}, "y": 1}', "x.f"),
        (b'{"task": "a", "x": [1, 2, 3], "y": 2}', "y"),
        (b'{"task": "a", "x": [1, 2, 3], "y": "yes"}', "y"),
        (b'{"task": "a", "x": [1, 2, 3]}', "id"),
        (b'{"task": "a", "y": 1}', "id"),
        (b'{"task": "a", "id": "e"}', "y"),
        (b'{"task": "a", "control": "pause"}', "control"),
        (b'{"task": "a", "id": 7, "x": [1, 2, 3], "y": 1}', "id"),
        (b'{"task": "a", "x": [1, 2, 3], "y": 1, "ts": "now"}', "ts"),
        (b'{"task": "a", "x": [1, 2, 3], "y": true}', "y"),  # as true is not a feature, it is not a label
        (b'{"task": "a", "x": [1, 2, 3], "y": 1, "ts": 1' + b"0" * 400 + b"}", "ts"),
        (b'{"task": "a", "x": [1, 1' + b"0" * 400 + b', 3], "y": 1}', "x"),
        (b'{"task": "a", "x": {"f": 1e308, "g": 1e308, "h": 1e308, "i": 1e308}, "y": 1}', "x"),
    ],
)
def test_invalid_events_name_the_field(payload, field):
    with pytest.raises(InvalidEvent) as info:
        decode(payload, SCHEMA)
    assert info.value.field == field
    assert info.value.problem


def test_oversized_and_unknown_task_are_refused():
    with pytest.raises(InvalidEvent, match="bytes"):
        decode(b'{"task": "a"}' + b" " * 100, Schema(dim=3, max_bytes=50))
    with pytest.raises(InvalidEvent, match="unknown task"):
        decode(b'{"task": "b", "x": [1, 2, 3], "y": 1}', Schema(dim=3, tasks=frozenset({"a"})))


def test_regression_label_outside_range_is_refused():
    schema = Schema(dim=1, task="regression", target_range=(0.0, 10.0))
    assert decode(b'{"task": "a", "x": [1], "y": 2.5}', schema).y == 2.5
    with pytest.raises(InvalidEvent, match="outside"):
        decode(b'{"task": "a", "x": [1], "y": 11}', schema)


def test_valid_kinds():
    dense = decode(b'{"task": "a", "id": "1", "x": [1, 2, 3], "y": 1, "ts": 5}', SCHEMA)
    assert dense.x.tolist() == [1, 2, 3] and dense.y == 1 and dense.ts == 5.0
    sparse = decode(b'{"task": "a", "id": "1", "x": {"amount": 2.0, "age": 1.0}}', SCHEMA)
    assert sparse.y is None and sparse.x.sum() == 3.0
    assert sparse.x[hash_index("amount", 3)] >= 2.0
    label = decode(b'{"task": "a", "id": "1", "y": 0}', SCHEMA)
    assert label.x is None and label.y == 0
    control = decode(b'{"task": "a", "control": "end"}', SCHEMA)
    assert control.control == "end"
    huge = decode(b'{"task": "a", "id": "1", "x": [1e300, -1e300, 1]}', SCHEMA)
    assert huge.x.tolist() == [1e300, -1e300, 1.0]  # kept as sent: the engine scales it per task


def test_hash_index_is_stable():
    # crc32 is fixed: the same name lands in the same bucket in every process (unlike hash()).
    assert hash_index("amount", 1024) == 66
