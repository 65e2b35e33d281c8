"""Tasks beyond ``engine.max_resident_tasks`` wait in the on-disk task store (``storage/task_store.py``)."""

import gc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.engine import Engine
from lifelong.core.events import Event
from lifelong.errors import StateError
from lifelong.service import checkpoint
from lifelong.storage.task_store import TaskStore

from conftest import make_stream


def run(engine, events, batch):
    return np.concatenate([engine.process(events[i : i + batch]).pred for i in range(0, len(events), batch)])


@pytest.mark.parametrize(
    "cfg", [{}, {"optimizer": "adagrad"}, {"task": "multiclass", "n_classes": 3}], ids=["ekf", "adagrad", "multiclass"]
)
def test_tasks_beyond_the_resident_limit_give_the_same_results(engine_factory, cfg):
    stream = {"task": "multiclass", "n_classes": 3} if cfg.get("task") else {}
    events = make_stream(n_tasks=30, per_task=24, ends=False, delayed=0.2, **stream)
    memory, tiered = engine_factory(**cfg), engine_factory(max_resident_tasks=5, **cfg)
    np.testing.assert_allclose(run(memory, events, 8), run(tiered, events, 8), rtol=0, atol=1e-12)
    assert tiered.counters["tasks_evicted"] > 0 and tiered.counters["tasks_loaded"] > 0
    assert tiered.n_tasks <= 8 and tiered.n_known == memory.n_known == 30  # at most 5, or one batch's tasks
    assert tiered.residency.store is not None and tiered.residency.store.count > 0
    a, b = memory.report(), tiered.report()
    assert a["tasks"].keys() == b["tasks"].keys()  # (rows in another order: equal to rounding)
    assert all(a["tasks"][k] == pytest.approx(b["tasks"][k], rel=1e-9) for k in a["tasks"])
    assert a["methods"]["lifelong"] == pytest.approx(b["methods"]["lifelong"], rel=1e-12)
    assert a["regret"] == pytest.approx(b["regret"], rel=1e-12)
    probe = [Event(f"t{i}", "q", np.ones(5, np.float32)) for i in range(30)] + [Event("new", "q", np.ones(5))]
    np.testing.assert_allclose(memory.predict(probe).pred, tiered.predict(probe).pred, rtol=0, atol=1e-12)
    assert tiered.n_known == 30  # predict registers nothing


def test_tasks_written_at_a_checkpoint_and_evicted_unchanged_are_not_written_again(engine_factory, monkeypatch):
    """Between checkpoints (``Residency.flush`` after every batch here), an evicted task unchanged since it was
    written stays as it is in the store: same results as with every task in memory, fewer rows written."""
    events = make_stream(n_tasks=30, per_task=24, ends=False, delayed=0.2)
    memory, tiered = engine_factory(), engine_factory(max_resident_tasks=5)
    written = []
    write_rows = tiered.residency.write_rows
    monkeypatch.setattr(tiered.residency, "write_rows", lambda rows: (written.append(len(rows)), write_rows(rows)))
    preds, flushed = [], 0
    for i in range(0, len(events), 8):
        preds.append(tiered.process(events[i : i + 8]).pred)
        flushed += tiered.residency.flush()
    np.testing.assert_allclose(run(memory, events, 8), np.concatenate(preds), rtol=0, atol=1e-12)
    assert tiered.counters["tasks_evicted"] > 0 and sum(written) == flushed  # evictions wrote nothing


def test_tasks_written_behind_give_the_same_results_and_a_checkpoint_writes_only_the_rest(engine_factory):
    """The daemon writes changed tasks idle for two batches to the store after each batch: nothing in memory
    changes, tasks later evicted or read back are what they were, and the next flush writes only the rest."""
    events = make_stream(n_tasks=30, per_task=24, ends=False, delayed=0.2)
    memory, tiered = engine_factory(), engine_factory(max_resident_tasks=12)
    preds, behind = [], 0
    for i in range(0, len(events), 8):
        preds.append(tiered.process(events[i : i + 8]).pred)
        behind += tiered.residency.write_behind(3)
    np.testing.assert_allclose(run(memory, events, 8), np.concatenate(preds), rtol=0, atol=1e-12)
    assert behind > 0 and tiered.counters["tasks_evicted"] > 0 and tiered.counters["tasks_loaded"] > 0
    dirty = int(tiered.tasks.dirty[: tiered.n_tasks].sum())
    assert tiered.residency.flush() == dirty < tiered.n_tasks and tiered.residency.flushed == dirty + behind
    tiered.residency.recall()
    memory_state, tiered_state = memory.state()[0], tiered.state()[0]
    rows = [tiered.tasks.index[name] for name in memory.tasks.names]
    for name in ("task.stats", "task.L_kb", "learner.param.S"):
        np.testing.assert_allclose(memory_state[name].numpy(), tiered_state[name].numpy()[rows], rtol=0, atol=1e-12)


def test_an_engine_with_stored_tasks_saves_and_restores_all_of_them(engine_factory, tmp_path):
    events = make_stream(n_tasks=20, per_task=24, ends=False)
    half = len(events) // 2
    straight = engine_factory(max_resident_tasks=4)
    run(straight, events[:half], 16)
    checkpoint.save_engine(straight, tmp_path)  # every task: the stored ones are read back for it
    restored = checkpoint.load_engine(tmp_path, straight.cfg, straight.labels)
    assert restored.n_known == straight.n_known == 20
    np.testing.assert_allclose(run(straight, events[half:], 16), run(restored, events[half:], 16), rtol=0, atol=1e-12)


def test_a_moved_task_is_read_from_the_store_for_export(engine_factory):
    events = make_stream(n_tasks=12, per_task=24, ends=False)
    a, b = engine_factory(max_resident_tasks=3), engine_factory()
    run(a, events, 8)
    run(b, events, 8)
    stored = next(k for k, _ in a.residency.store.items() if k not in a.tasks.index)
    ra, rb = (e.handover.decode_task(e.handover.export_task(stored, {}), 1 << 20) for e in (a, b))
    assert ra[0] == rb[0] and ra[1].keys() == rb[1].keys()
    for k, v in ra[1].items():
        torch.testing.assert_close(v, rb[1][k], rtol=0, atol=1e-12)


def test_tasks_exported_together_are_the_records_of_each_alone_resident_or_stored(engine_factory):
    """The changelog of a checkpoint: every changed task's record, read a chunk at a time (more tasks than the
    resident limit), equals the record exported on its own by an engine with every task in memory."""
    events = make_stream(n_tasks=12, per_task=24, ends=False)
    tiered, memory = engine_factory(max_resident_tasks=4), engine_factory()
    run(tiered, events, 8)
    run(memory, events, 8)
    names = sorted(memory.tasks.names)
    extras = [{"partition": i % 3, "position": 100 + i} for i in range(len(names))]
    together = tiered.handover.export_tasks(names, extras)
    assert together == [memory.handover.export_task(n, x) for n, x in zip(names, extras, strict=True)]
    assert tiered.n_tasks <= 4  # read back two at a time (half the limit), never all at once


def test_flush_writes_only_changed_tasks_and_the_store_refuses_another_engine_shape(engine_factory, tmp_path):
    engine = engine_factory(max_resident_tasks=1000)
    engine.residency.store_dir = tmp_path / "tasks"
    events = make_stream(n_tasks=10, per_task=8, ends=False)
    run(engine, events, 16)
    assert engine.residency.flush() == 10 and engine.residency.flush() == 0
    engine.process([e for e in make_stream(n_tasks=10, per_task=8, ends=False, seed=1) if e.task in ("t1", "t2")])
    assert engine.residency.flush() == 2
    assert engine.residency.store.count == 10
    engine.residency.store.close()
    other = engine_factory(dim=6)
    with pytest.raises(StateError, match="another shape of engine"):
        TaskStore(tmp_path / "tasks", other.residency.layout())
    again = TaskStore(tmp_path / "tasks", engine.residency.layout())
    assert again.count == 10 and len(again.get(["t1", "nope"])) == 2 and again.get(["nope"]) == [None]
    again.close()


def test_rows_of_stored_tasks_survive_a_round_trip_through_bytes(engine_factory):
    from lifelong.storage.task_store import pack_rows, unpack_rows

    engine = engine_factory()
    run(engine, make_stream(n_tasks=6, per_task=20, ends=False), 16)
    cols = engine.residency.columns()
    rows = torch.tensor([4, 1, 3])
    packed = pack_rows(cols, rows)
    copy = {k: torch.zeros_like(v) for k, v in cols.items()}
    unpack_rows(copy, rows, packed)
    for k, v in cols.items():
        assert torch.equal(copy[k][rows], v[rows]), k
    assert len({len(p) for p in packed}) == 1


def test_incremental_checkpoints_write_changed_tasks_and_restore_from_the_snapshot(engine_factory, tmp_path):
    """A checkpoint of an engine whose task store lives in the checkpoint directory holds no task: it names a
    snapshot of the store, taken after the tasks changed since the last checkpoint were written."""
    events = make_stream(n_tasks=20, per_task=24, ends=False)
    engine = engine_factory(max_resident_tasks=4)
    engine.residency.store_dir = tmp_path / "tasks"
    reference = engine_factory(max_resident_tasks=4)
    run(engine, events[:240], 16)
    run(reference, events[:240], 16)
    checkpoint.save_engine(engine, tmp_path)
    tensors, meta = checkpoint.read(sorted(tmp_path.glob("checkpoint-*.ckpt"))[-1])
    assert meta["store"] == "store-000000000001" and meta["task_names"] == [] and len(tensors["task.stats"]) == 0
    only = [e for e in events[240:] if e.task in ("t1", "t2")]
    engine.process(only)
    reference.process(only)
    checkpoint.save_engine(engine, tmp_path)
    assert engine.residency.flushed == 2  # the two tasks that changed, not all twenty
    checkpoint.save_engine(engine, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("store-*")) == ["store-000000000002", "store-000000000003"]
    snapshot = tmp_path / "store-000000000003"

    def files():  # RocksDB's files (rocksdict rewrites its own small config file at every open)
        kept = [p for p in snapshot.iterdir() if "rocksdict" not in p.name]
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in kept}

    before = files()
    restored = checkpoint.load_engine(tmp_path, engine.cfg, engine.labels)  # the engine's live store stays open
    assert files() == before  # the snapshot is read, never written
    assert restored.n_tasks == 0 and restored.n_known == 20  # every task waits in the store
    assert restored.residency.store.path != engine.residency.store.path and engine.residency.store.count == 20
    np.testing.assert_allclose(restored.residency.stats_total(), reference.residency.stats_total(), rtol=1e-12)
    rest = [e for e in events[240:] if e.task not in ("t1", "t2")]
    np.testing.assert_allclose(run(reference, rest, 16), run(restored, rest, 16), rtol=0, atol=1e-12)
    np.testing.assert_allclose(restored.residency.stats_total(), reference.residency.stats_total(), rtol=1e-12)


def test_dropped_tasks_leave_memory_and_store_and_the_others_keep_their_state(engine_factory):
    events = make_stream(n_tasks=10, per_task=24, ends=False, delayed=0.3)
    engine = engine_factory(max_resident_tasks=4)
    run(engine, events, 16)
    resident = set(engine.tasks.index)
    stored = {k for k, _ in engine.residency.store.items()} - resident
    dropped = {sorted(resident)[0], sorted(stored)[0], sorted(stored)[1]}
    kept = sorted(set(resident | stored) - dropped)
    before = engine.handover.digest(kept)
    totals = {k: v for k, v in engine.report()["tasks"].items() if k not in dropped}
    engine.drop_tasks(dropped)
    assert engine.n_known == 7 and engine.residency.store.get(sorted(dropped)) == [None] * 3
    assert not any(k[0] in dropped for k in engine.arrivals.pending.keys)
    assert engine.handover.digest(kept) == before
    report = engine.report()
    assert report["tasks"] == totals
    errors = sum(t["cumulative_error"] * t["events"] for t in totals.values())
    assert report["methods"]["lifelong"]["cumulative_error"] * report["labelled"] == pytest.approx(errors)
    back = next(iter(dropped))
    engine.process([Event(back, "again", np.ones(5, np.float32), 1)])
    assert engine.report()["tasks"][back]["events"] == 1  # a dropped task that comes back starts afresh


def test_a_task_new_after_a_restore_and_a_drop_starts_afresh_in_the_row_left_behind(engine_factory):
    events = make_stream(n_tasks=6, per_task=20, ends=False)
    engine = engine_factory()
    run(engine, events, 16)
    tensors, meta = engine.state()
    dropped, kept = engine_factory(), engine_factory()
    dropped.load_state(tensors, meta)
    kept.load_state(tensors, meta)
    dropped.drop_tasks({"t5"})  # the last row: a new task takes it
    new = [Event("new", f"n{i}", np.full(5, 0.5, np.float32), i % 2) for i in range(3)]
    dropped.process(new), kept.process(new)
    assert dropped.report()["tasks"]["new"] == kept.report()["tasks"]["new"]
    assert dropped.handover.digest(["new"]) == kept.handover.digest(["new"])


def test_in_store_names_the_tasks_waiting_in_the_store(engine_factory):
    engine = engine_factory(max_resident_tasks=4)
    run(engine, make_stream(n_tasks=10, per_task=8, ends=False), 16)
    known = {f"t{i}" for i in range(10)}
    away = known - set(engine.tasks.index)
    held = engine.residency.in_store([*sorted(known), "never"])
    assert away and away <= held <= known  # a resident task may be in the store too, as it was last written


def test_an_engine_let_go_releases_its_task_store_at_once(engine_factory, tmp_path):
    """No reference cycle keeps an engine alive: dropping it closes its store (RocksDB's lock) without waiting
    for the garbage collector, so the next engine on the same directory opens it."""
    gc.disable()
    try:
        cfg = engine_factory(max_resident_tasks=2).cfg
        engine = Engine(cfg, store_dir=tmp_path / "tasks")
        run(engine, make_stream(n_tasks=6, per_task=8, ends=False), 16)
        assert engine.residency.store is not None
        del engine
        again = Engine(cfg, store_dir=tmp_path / "tasks")
        assert again.residency.open_store().count > 0
    finally:
        gc.enable()


def test_a_task_store_of_the_layout_before_the_shared_level_is_migrated(engine_factory, tmp_path):
    """A daemon's task store written before issue 31 (a per-task peak column, two top-level columns, no
    deviation or drift columns) is rewritten into the current layout when opened: each task keeps its
    learner and tables, and the shared learners join its top mixture at its loss so far."""
    from lifelong.storage import wire
    from lifelong.storage.task_store import pack_rows

    engine = engine_factory()
    engine.process(make_stream(n_tasks=5, per_task=8, ends=False))
    n, cols = engine.n_tasks, engine.residency.columns()
    old = {}
    for key, col in cols.items():
        if key in ("t.me_prec", "t.me_nat", "t.drift_at"):
            continue
        old[key] = col[:n, :2].clone() if key in ("t.L_top", "t.in_top") else col[:n].clone()
        if key == "t.stats":
            old["t.peak"] = torch.full((n, engine.cfg.dim), 3.0, dtype=torch.float64)
    layout = {k: (t, shape[1:]) for k, (t, shape) in wire.spec_of({k: v[:0] for k, v in old.items()}).items()}
    store = TaskStore(tmp_path / "tasks", layout)
    store.write(dict(zip(engine.tasks.names, pack_rows(old, torch.arange(n)), strict=True)), n)
    store.close()
    with pytest.raises(StateError, match="another shape of engine"):
        TaskStore(tmp_path / "tasks", engine.residency.layout())  # no migration: refused, as before
    fresh = engine_factory()
    fresh.residency.store_dir = tmp_path / "tasks"
    fresh.residency.open_store()
    fresh.residency.admit(list(engine.tasks.names))
    for name in engine.tasks.names:
        a, b = engine.tasks.index[name], fresh.tasks.index[name]
        for key in ("stats", "L_kb", "in_kb", "n_kb"):
            assert torch.equal(engine.tasks.cols[key][a], fresh.tasks.cols[key][b])
        assert torch.equal(engine.learners.params["mu"][a], fresh.learners.params["mu"][b])
        assert torch.equal(engine.tasks.cols["L_top"][a, :2], fresh.tasks.cols["L_top"][b, :2])
        assert fresh.tasks.cols["in_top"][b, 2:].all() and not fresh.tasks.cols["me_prec"][b].any()
        assert float(fresh.tasks.cols["L_top"][b, 3]) == float(engine.tasks.cols["stats"][a, 0])
    assert fresh.n_labelled[[fresh.tasks.index[m] for m in engine.tasks.names]].tolist() == engine.n_labelled.tolist()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0, 3, 5, 5, 9, 9]), min_size=1, max_size=40), st.integers(0, 45))
def test_the_least_recently_used_leave_first(used, k):
    """``TaskTable.least_used``: up to ``k`` rows, none used in this batch, none used later than a row left."""
    from lifelong.core.tasks import TaskTable

    table = TaskTable(1, (1, 1), torch.device("cpu"), 1000, False)
    table.add([f"t{i}" for i in range(len(used))], [])
    table.used[: len(used)], table.batch = used, 9  # rows used in batch 9: this batch's
    rows = table.least_used(k)
    idle = {i for i, u in enumerate(used) if u < 9}
    assert len(set(rows.tolist())) == len(rows) == min(max(k, 0), len(idle)) and set(rows.tolist()) <= idle
    left = idle - set(rows.tolist())
    assert not len(rows) or not left or max(used[r] for r in rows) <= min(used[r] for r in left)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=40) | st.lists(st.integers(0, 10**9), min_size=2, max_size=40))
def test_the_k_smallest_by_counts_or_by_partition(values):
    """``tasks.smallest``: k positions whose values are the k smallest, whether counted (few distinct batch
    numbers) or partitioned (a wide span)."""
    from lifelong.core.tasks import smallest

    for k in range(1, len(values)):
        rows = smallest(np.array(values), k)
        assert len(set(rows.tolist())) == k
        assert sorted(values[r] for r in rows) == sorted(values)[:k]


def test_rows_assigned_in_numpy_are_what_torch_would_assign():
    """``tasks.assign`` (a CPU table's rows set through numpy) by every kind of index admission uses: a slice, an
    int, a tensor of rows, with a column; a scalar or a (broadcast) tensor."""
    from lifelong.core.tasks import assign

    cases = [
        (slice(1, 3), torch.arange(4.0).expand(2, -1)),
        (2, 7.0),
        (torch.tensor([3, 0]), torch.ones(2, 4)),
        ((slice(2, 4), 0), True),
        ((torch.tensor([1]), slice(2, None)), -1.0),
    ]
    for rows, value in cases:
        ours, theirs = torch.zeros(5, 4), torch.zeros(5, 4)
        assign(ours, rows, value)
        theirs[rows] = value
        assert torch.equal(ours, theirs), rows
        assert ours.abs().sum() > 0
