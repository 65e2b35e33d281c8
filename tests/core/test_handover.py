"""Scale-out at the engine level: one knowledge log gives one KB; a task moves with its whole state; the wire
format refuses anything it was not built to read."""

import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from lifelong.storage import wire

from conftest import make_stream

MAX = 1 << 20
DT = torch.float64


def outbox(engine):
    """The engine's published members wait in the list returned, as a scale-out replica's do, instead of
    joining its KB."""
    members = []
    engine.publisher = members.extend
    return members


def drain(engine, members, log):
    """Send the engine's published snapshots to the shared log (as bytes, like the knowledge topic)."""
    log.extend(engine.kb.encode(members))
    members.clear()


def catch_up(engine, log, applied):
    engine.apply([engine.kb.decode(rec, MAX) for rec in log[applied:]])
    return len(log)


@pytest.mark.parametrize("capacity", [4, 10])  # 10: enough members for the task prior
def test_one_log_one_kb_and_a_task_moves_with_its_state(engine_factory, capacity):
    events = make_stream(n_tasks=12, per_task=48, block=6, ends=False)
    a, b = engine_factory(kb_capacity=capacity), engine_factory(kb_capacity=capacity)
    out = {a: outbox(a), b: outbox(b)}
    mine = {"a": [e for e in events if int(e.task[1:]) < 4], "b": [e for e in events if int(e.task[1:]) >= 4]}
    moved = "t1"
    cut = [i for i, e in enumerate(mine["a"]) if e.task == moved][30]
    first, rest = mine["a"][:cut], [e for e in mine["a"][cut:] if e.task == moved]
    log: list[bytes] = []
    seen = {"a": 0, "b": 0}
    for step, start in enumerate(range(0, max(len(first), len(mine["b"])), 20)):
        a.process(first[start : start + 20])
        drain(a, out[a], log)
        seen["a"] = catch_up(a, log, seen["a"])  # a reads the log after every batch ...
        b.process(mine["b"][start : start + 20])
        drain(b, out[b], log)
        if step % 3 == 2:  # ... b only now and then: the KB must not depend on when a replica reads
            seen["b"] = catch_up(b, log, seen["b"])
    seen["a"], seen["b"] = catch_up(a, log, seen["a"]), catch_up(b, log, seen["b"])
    assert a.kb.size >= 3 and a.kb.counts["evicted"] > 0 and a.kb.basis_ready
    assert a.kb.ids == b.kb.ids and a.kb.updated == b.kb.updated
    for k in a.kb.store:
        torch.testing.assert_close(a.kb.store[k], b.kb.store[k], rtol=0, atol=0)
    torch.testing.assert_close(a.kb.B, b.kb.B, rtol=0, atol=0)
    assert (a.kb.task_S is None) == (capacity < 8) and (b.kb.task_S is None) == (capacity < 8)
    if a.kb.task_S is not None:
        torch.testing.assert_close(a.kb.task_S, b.kb.task_S, rtol=0, atol=0)

    record = b.handover.decode_task(a.handover.export_task(moved, {"partition": 0}), MAX)
    assert record[0]["partition"] == 0
    b.handover.load_tasks({moved: record})
    i_a, i_b = a.tasks.index[moved], b.tasks.index[moved]
    assert b.n_labelled[i_b] == a.n_labelled[i_a] == 30
    ra, rb = a.process(rest), b.process(rest)  # the same events, now on the replica the task moved to
    # the task's own learner and its KB level predict alike (each replica keeps its own shared level)
    np.testing.assert_allclose(ra.p_local, rb.p_local, atol=1e-9)
    np.testing.assert_allclose(ra.p_kb, rb.p_kb, atol=1e-9)
    assert b.n_labelled[i_b] == a.n_labelled[i_a] == 48


def test_members_encoded_together_are_the_records_each_gives_alone(engine_factory):
    eng = engine_factory()
    snaps = outbox(eng)
    eng.process(make_stream(n_tasks=5, per_task=40, ends=False))
    assert len(snaps) >= 3
    together = eng.kb.encode(snaps)
    assert together == [eng.kb.encode([s])[0] for s in snaps]  # what other replicas read does not depend on it
    for snap, record in zip(snaps, together, strict=True):
        back = eng.kb.decode(record, MAX)
        assert (back.task_name, back.learned) == (snap.task_name, snap.learned)
        for k, v in snap.store.items():
            torch.testing.assert_close(back.store[k], v, rtol=0, atol=0)
    assert eng.kb.encode([]) == []


def test_a_moved_task_meets_another_kb_with_late_expert_entry(engine_factory):
    events = make_stream(n_tasks=6, per_task=40, ends=False)
    a, b = engine_factory(), engine_factory()
    a.process(events)
    record = b.handover.decode_task(a.handover.export_task("t0", {}), MAX)
    b.handover.load_tasks({"t0": record})  # b's KB is empty: every expert a's task had is absent here
    i = b.tasks.index["t0"]
    assert not bool(b.tasks.cols["in_kb"][i].any()) and b.n_labelled[i] == a.n_labelled[a.tasks.index["t0"]]
    out = b.process([e for e in make_stream(n_tasks=6, per_task=50, ends=False, seed=1) if e.task == "t0"][:5])
    assert np.isfinite(out.pred).all()
    b.handover.load_tasks({"t0": None})
    assert b.n_labelled[i] == 0 and bool((b.learners.task_state(i)["param.mu"] == 0).all())


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/lifelong-pwned", "w"))


def _member(engine_factory):
    eng = engine_factory()
    eng.process(make_stream(n_tasks=2, per_task=16, ends=False))
    snap = eng.kb.encode([eng.staging.staged[0] if eng.staging.staged else _staged(eng)])[0]
    return eng, snap


def _staged(eng):
    from lifelong.core.knowledge import Staged

    store = eng.learners.new_store(1)
    eng.learners.write_member(store, 0, 0)
    return Staged(0, "t0", 5, 0, store)


def test_good_member_records_round_trip(engine_factory):
    eng, data = _member(engine_factory)
    snap = eng.kb.decode(data, MAX)
    assert snap.task_name == "t0" and snap.learned >= 1
    ref = _staged(eng) if not eng.staging.staged else eng.staging.staged[0]
    for k in snap.store:
        torch.testing.assert_close(snap.store[k], ref.store[k])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda good: pickle.dumps(_Boom()), "not_lifelong"),
        (lambda good: good[:40], "malformed"),
        (lambda good: good + b"\0" * 8, "shape"),
        (lambda good: good[:4] + struct.pack(">I", 1 << 30) + good[8:], "malformed"),
        (lambda good: good + b"\0" * (2 * MAX), "too_large"),
        (lambda good: member({"source": "x", "learned": 3}, w=torch.zeros(1, 999, 1)), "shape"),
        (lambda good: member({"source": "x", "learned": 3}, w=torch.zeros(1, 5, 1, dtype=torch.float32)), "shape"),
        (lambda good: member({"source": "x", "learned": 3}, w=torch.full((1, 5, 1), math.nan, dtype=DT)), "not_finite"),
        (lambda good: member({"source": 7, "learned": 3}), "malformed"),
        (lambda good: member({"source": "x", "learned": 3}, kind="task"), "malformed"),
        (lambda good: None, "malformed"),
    ],
)
def test_bad_member_records_are_refused_never_loaded(engine_factory, make, reason):
    eng, good = _member(engine_factory)  # the engine's dtype is float64: members are float64 arrays
    with pytest.raises(wire.Refused) as info:
        eng.kb.decode(make(good), MAX)
    assert info.value.reason == reason
    assert not os.path.exists("/tmp/lifelong-pwned")  # the pickle was never loaded


def member(meta, kind="member", w=None):
    w = torch.zeros(1, 5, 1, dtype=DT) if w is None else w
    return wire.pack(kind, meta, {"w": w, "b": torch.zeros(1, 1, dtype=DT)})


def test_a_river_engine_never_reads_records_from_other_replicas(engine_factory):
    eng, good = _member(engine_factory)
    river = engine_factory(backend="river")  # its state is pickle: nothing from the network may reach it
    with pytest.raises(wire.Refused) as info:
        river.kb.decode(good, MAX)
    assert info.value.reason == "backend"
    with pytest.raises(wire.Refused) as info:
        river.handover.decode_task(eng.handover.export_task("t0", {}), MAX)
    assert info.value.reason == "backend"


def test_a_task_restored_from_an_older_record_learns_the_replayed_events_again(engine_factory):
    """A partition back on the replica that learned it, after a commit that failed: the task is restored from
    the committed record and the events after it are replayed. They are learned again, not taken for
    duplicates of what this replica learned before the restore (exactly once)."""
    events = [e for e in make_stream(n_tasks=3, per_task=20, ends=False) if e.task == "t0"]
    committed, replica = engine_factory(), engine_factory()
    committed.process(events[:12])
    replica.process(events)  # learned past the commit
    replica.handover.load_tasks({"t0": replica.handover.decode_task(committed.handover.export_task("t0", {}), MAX)})
    replica.process(events[12:])  # the replay
    assert replica.counters["duplicates"] == 0
    assert replica.n_labelled[replica.tasks.index["t0"]] == len(events)
