"""Event time from untrusted producers: one wrong clock moves no other task's pending predictions."""

import dataclasses
import math
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.config import LabelsConfig
from lifelong.core.events import Event
from lifelong.core.results import LABEL_JOINED, LEARNED

X = np.ones(5, np.float32)
YEAR = 365 * 24 * 3600.0


def test_one_event_ten_years_ahead_loses_no_label(engine_factory):
    """50 predictions wait for their labels; one event of another task claims a time ten years ahead; the 50
    labels then come 5 s later: every label is learned, and the untrusted time is counted."""
    engine = engine_factory()
    now = time.time()
    predictions = [Event(f"t{i}", f"p{i}", X, None, ts=now) for i in range(50)]
    spike = [Event("clock-wrong", "s", X, 1, ts=now + 10 * YEAR)]
    labels = [Event(f"t{i}", f"p{i}", None, i % 2, ts=now + 5) for i in range(50)]
    for batch in (predictions, spike, labels):
        engine.process(batch)
    c = engine.counters
    assert (c["label_expired"], c["label_unmatched"], c["learned"]) == (0, 0, 51)
    assert c["time_future"] == 1 and engine.arrivals.now_ts < now + 60


def test_a_partition_running_ahead_expires_none_of_anothers_predictions_until_that_one_goes_idle(engine_factory):
    """Expiry follows the slowest partition still sending: partition 0 moving two hours on does not expire
    partition 1's prediction; once partition 1 has been silent for ``idle_partition_s``, it does."""
    labels = LabelsConfig(pending_ttl_s=3600.0, idle_partition_s=60.0)
    engine, other = engine_factory(labels=labels), engine_factory(labels=labels)
    wall = [1_000_000.0]
    for e in (engine, other):
        e.arrivals.clock.wall = lambda: wall[0]
    base = wall[0] - 10_000  # every time below is in this machine's past: trusted
    for e in (engine, other):
        e.process([Event("b", "p", X, None, ts=base, partition=1), Event("a", "a0", X, 1, ts=base, partition=0)])
    ahead = Event("a", "a1", X, 0, ts=base + 7200, partition=0)
    label = Event("b", "p", None, 1, ts=base + 10, partition=1)
    assert list(engine.process([ahead, label]).outcome) == [LEARNED, LABEL_JOINED]
    wall[0] += 120  # partition 1 silent for two minutes: idle
    other.process([ahead])
    assert list(other.process([label]).outcome)[0] != LABEL_JOINED and other.counters["label_expired"] == 1


def test_a_late_time_is_replaced_by_its_partitions_time_and_its_prediction_waits_the_whole_ttl(engine_factory):
    engine = engine_factory(labels=LabelsConfig(pending_ttl_s=100.0, max_lateness_s=50.0))
    engine.arrivals.clock.wall = lambda: 10_000.0
    engine.process([Event("a", "e0", X, 1, ts=5000.0)])
    engine.process([Event("a", "p", X, None, ts=1.0)])  # far older than what the partition has seen
    assert engine.counters["time_late"] == 1
    out = engine.process([Event("a", "p", None, 1, ts=5090.0)])
    assert list(out.outcome) == [LABEL_JOINED] and out.label_delay[0] == 90.0


def test_the_clocks_survive_a_checkpoint(engine_factory):
    engine = engine_factory()
    engine.process([Event("a", "e", X, 1, ts=100.0, partition=3), Event("b", "f", X, 1, ts=50.0, partition=1)])
    restored = engine_factory()
    restored.load_state(*engine.state())
    assert restored.arrivals.clock.state() == engine.arrivals.clock.state()
    assert engine.arrivals.now_ts == 50.0


@st.composite
def timestamp_streams(draw):
    """Predictions and their labels interleaved with other events whose times spike far ahead, fall far behind,
    repeat or go back and forth."""
    base = 1_700_000_000.0
    kinds = st.sampled_from(["near", "spike", "past", "same", "none"])
    n = draw(st.integers(5, 40))
    events, last = [], base
    for i in range(n):
        kind = draw(kinds)
        ts = {
            "near": last + draw(st.floats(-30.0, 60.0)),
            "spike": base + draw(st.floats(1e4, 1e10)),
            "past": base - draw(st.floats(1e3, 1e9)),
            "same": last,
            "none": None,
        }[kind]
        if kind == "near":
            last = ts
        role = draw(st.sampled_from(["predict", "label", "other"]))
        events.append((role, i, ts))
    return events


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=timestamp_streams(), ttl=st.sampled_from([30.0, 120.0, 3600.0]))
def test_no_label_younger_than_the_ttl_in_trusted_time_is_ever_expired(engine_factory, stream, ttl):
    """Trusted time, as the README states it: an event's own time unless it lies beyond this machine's clock
    plus ``max_future_s`` or before the event time seen so far by more than ``max_lateness_s``, else the event
    time seen so far. A label whose prediction is younger than the TTL in that time always joins it."""
    labels = LabelsConfig(pending_ttl_s=ttl, max_future_s=300.0, max_lateness_s=600.0)
    engine = engine_factory(labels=labels)
    wall = 1_700_000_000.0 + 86400
    engine.arrivals.clock.wall = lambda: wall
    clock, made, events = -math.inf, {}, []
    for role, i, ts in stream:
        trusted = clock if ts is None else ts
        if ts is not None and (ts > wall + 300.0 or ts < clock - 600.0):
            trusted = clock if clock > -math.inf else wall
        clock = max(clock, trusted)
        if role == "predict":
            made[f"p{i}"] = trusted
            events.append(Event("t", f"p{i}", X, None, ts=ts))
        elif role == "label" and made:
            pid = list(made)[i % len(made)]
            events.append(dataclasses.replace(Event("t", pid, None, 1, ts=ts), partition=0))
            young = made.pop(pid) >= clock - ttl
            events[-1] = (events[-1], young)
        else:
            events.append(Event("u", f"o{i}", X, 1, ts=ts))
    for item in events:
        e, young = item if isinstance(item, tuple) else (item, False)
        outcome = engine.process([e]).outcome[0]
        if young:
            assert outcome == LABEL_JOINED, (e, engine.arrivals.now_ts)
    assert engine.counters["learned"] >= sum(1 for item in events if isinstance(item, tuple) and item[1])
