import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.events import Event, Schema, decode, decode_many, hash_index
from lifelong.errors import InvalidEvent

SCHEMA = Schema(dim=3, tasks=frozenset())


INVALID = [
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
]


@pytest.mark.parametrize(("payload", "field"), INVALID)
def test_invalid_events_name_the_field(payload, field):
    with pytest.raises(InvalidEvent) as info:
        decode(payload, SCHEMA)
    assert info.value.field == field
    assert info.value.problem


VALID = [
    b'{"task": "a", "id": "1", "x": [1, 2, 3], "y": 1, "ts": 5}',
    b'{"task": "b", "id": "2", "x": [0.5, -2, 1e300]}',
    b'{"task": "a", "id": "1", "x": {"amount": 2.0, "age": 1.0}}',
    b'{"task": "a", "id": "1", "y": 0}',
    b'{"task": "a", "control": "end"}',
    b'{"task": "c", "x": [1, 1' + b"0" * 30 + b', 3], "y": 1}',  # beyond 64 bits, still a float64
]


def _same(got: Event | InvalidEvent, payload: bytes, schema: Schema) -> None:
    """``got`` (from a batch) is what ``decode`` makes of ``payload`` alone: the same event, with the same value
    types and x bits, or the same reason."""
    try:
        want: Event | InvalidEvent = decode(payload, schema)
    except InvalidEvent as exc:
        want = exc
    assert type(got) is type(want), payload
    if isinstance(want, InvalidEvent):
        assert str(got) == str(want), payload
        return
    assert isinstance(got, Event)
    assert (got.task, got.id, got.y, got.ts, got.control) == (want.task, want.id, want.y, want.ts, want.control)
    assert (type(got.y), type(got.ts)) == (type(want.y), type(want.ts)), payload
    assert (got.x is None and want.x is None) or got.x.tobytes() == want.x.tobytes(), payload


@pytest.mark.parametrize("seed", range(5))
def test_a_batch_decodes_as_its_payloads_one_by_one(seed):
    """Whatever the mix, each payload of a batch gives the event, or the reason, that decode gives it alone:
    one bad x (a bool, a string, NaN, infinity) refuses its own event, never its neighbours."""
    rng = random.Random(seed)
    payloads = [rng.choice([p for p, _ in INVALID] + VALID * 4) for _ in range(60)]
    for got, payload in zip(decode_many(payloads, SCHEMA), payloads, strict=True):
        _same(got, payload, SCHEMA)


# integers within 64 bits: beyond, orjson reads one as a float, and a label's refusal shows it rounded
NUMBER = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**63), 2**64 - 1))
VALUE = st.one_of(NUMBER, st.booleans(), st.none(), st.text(max_size=3), st.just([1]), st.just({}))
FIELDS = {  # what a field may hold: what valid events hold, and anything
    "task": st.one_of(st.sampled_from(["a", "b", "_population", "", "t" * 257]), VALUE),
    "id": st.one_of(st.text(max_size=4), st.just("i" * 257), VALUE),
    "x": st.one_of(
        st.lists(st.one_of(NUMBER, VALUE), min_size=2, max_size=4),
        st.dictionaries(st.text(max_size=3), st.one_of(NUMBER, VALUE), max_size=3),
        VALUE,
    ),
    "y": st.one_of(st.sampled_from([0, 1, 2, 0.0, 1.0, 0.5, -1, 3]), VALUE),
    "ts": st.one_of(NUMBER, VALUE),
    "control": st.one_of(st.just("end"), VALUE),
}
COMMON = st.fixed_dictionaries(  # valid events of every schema below, mostly
    {"task": st.sampled_from(["a", "b", "_population"])},
    optional={
        "id": st.text(max_size=4),
        "x": st.one_of(
            st.lists(NUMBER, min_size=3, max_size=3), st.dictionaries(st.text(max_size=3), NUMBER, max_size=3)
        ),
        "y": st.sampled_from([0, 1, 2, 0.0, 1.0, 0.5, 1.5, 2.5, -2]),
        "ts": NUMBER,
    },
)
PAYLOAD = st.builds(  # a common event, some of its fields replaced by anything or left out
    lambda d, changed, dropped: json.dumps({k: v for k, v in {**d, **changed}.items() if k not in dropped}).encode(),
    COMMON,
    st.fixed_dictionaries({}, optional=FIELDS),
    st.sets(st.sampled_from(sorted(FIELDS)), max_size=2),
)
SCHEMAS = [
    Schema(dim=3),
    Schema(dim=3, task="multiclass", n_classes=3, tasks=frozenset({"a"})),
    Schema(dim=3, task="regression", target_range=(-1.0, 2.0)),
]


@settings(max_examples=500, deadline=None)
@given(payloads=st.lists(PAYLOAD, min_size=1, max_size=20), schema=st.sampled_from(SCHEMAS))
def test_any_payload_decodes_in_a_batch_as_alone(payloads, schema):
    """The parse of common events (msgspec) and the general one (orjson, json) agree on every payload."""
    for got, payload in zip(decode_many(payloads, schema), payloads, strict=True):
        _same(got, payload, schema)


def test_a_null_record_is_refused_not_fatal():
    (got,) = decode_many([None], SCHEMA)
    assert isinstance(got, InvalidEvent) and got.field == "payload"


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
