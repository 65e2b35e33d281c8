import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong import checkpoint
from lifelong.config import LabelsConfig
from lifelong.engine import LABEL_JOINED, LABEL_UNMATCHED, PREDICTED
from lifelong.events import Event

from conftest import make_stream

KINDS = [
    pytest.param({}, {}, id="binary-ekf"),
    pytest.param({"optimizer": "adagrad"}, {}, id="binary-adagrad"),
    pytest.param({"model": "mlp", "hidden": 4}, {}, id="binary-mlp"),
    pytest.param({"task": "multiclass", "n_classes": 3}, {"task": "multiclass", "n_classes": 3}, id="multiclass"),
    pytest.param({"task": "regression", "target_range": (0.0, 1.0)}, {"task": "regression"}, id="regression"),
    pytest.param({"mixing": "hedge"}, {}, id="hedge"),
]


def run(engine, events, batch):
    results = [engine.process(events[i:i + batch]) for i in range(0, len(events), batch)]
    return np.concatenate([r.pred for r in results]), np.concatenate([r.outcome for r in results])


@pytest.mark.parametrize(("cfg", "stream"), KINDS)
def test_batches_equal_event_by_event(engine_factory, cfg, stream):
    events = make_stream(delayed=0.2, **stream)
    one, batched = engine_factory(**cfg), engine_factory(**cfg)
    p1, o1 = run(one, events, 1)
    p2, o2 = run(batched, events, 37)
    assert (o1 == o2).all()
    np.testing.assert_allclose(p1, p2, atol=1e-9)
    for key in one.t:
        torch.testing.assert_close(one.t[key][:one.n_tasks], batched.t[key][:batched.n_tasks], atol=1e-7, rtol=1e-9)
    assert one.kb.ids == batched.kb.ids
    assert one.report()["methods"]["lifelong"]["cumulative_error"] == pytest.approx(
        batched.report()["methods"]["lifelong"]["cumulative_error"], rel=1e-12)


@pytest.mark.parametrize(("cfg", "stream"), KINDS[:1] + KINDS[3:5])
def test_compiled_cpu_path_equals_torch_waves(engine_factory, cfg, stream):
    """The compiled event-by-event path (CPU, EKF) and the torch waves (what CUDA runs) agree."""
    events = make_stream(delayed=0.2, **stream)
    compiled, waves = engine_factory(**cfg), engine_factory(**cfg)
    assert compiled.compiled
    waves.compiled = False
    p1, o1 = run(compiled, events, 29)
    p2, o2 = run(waves, events, 29)
    assert (o1 == o2).all()
    np.testing.assert_allclose(p1, p2, atol=1e-9)
    for key in compiled.t:
        torch.testing.assert_close(compiled.t[key][:compiled.n_tasks], waves.t[key][:waves.n_tasks], atol=1e-7,
                                   rtol=1e-9)
    for name, p in compiled.learners.params.items():
        torch.testing.assert_close(p[:compiled.n_tasks], waves.learners.params[name][:waves.n_tasks])
    assert compiled.kb.ids == waves.kb.ids and compiled.kb.basis_ready


@pytest.mark.parametrize(("cfg", "stream"), KINDS)
def test_save_load_continue_equals_continue(engine_factory, tmp_path, cfg, stream):
    events = make_stream(delayed=0.2, **stream)
    half = len(events) // 2
    straight = engine_factory(**cfg)
    run(straight, events[:half], 16)
    checkpoint.save_engine(straight, tmp_path)
    restored = checkpoint.load_engine(tmp_path, straight.cfg, straight.labels)
    p1, _ = run(straight, events[half:], 16)
    p2, _ = run(restored, events[half:], 16)
    np.testing.assert_array_equal(p1, p2)
    for key in straight.t:
        assert torch.equal(straight.t[key][:straight.n_tasks], restored.t[key][:restored.n_tasks])
    assert straight.report() == restored.report()


def test_river_backend_learns_and_round_trips(engine_factory, tmp_path):
    events = make_stream(n_tasks=3, per_task=20)
    cfg = {"backend": "river", "river_model": "river.linear_model.LogisticRegression"}
    engine = engine_factory(**cfg)
    run(engine, events[:40], 8)
    checkpoint.save_engine(engine, tmp_path)
    restored = checkpoint.load_engine(tmp_path, engine.cfg, engine.labels)
    p1, _ = run(engine, events[40:], 8)
    p2, _ = run(restored, events[40:], 8)
    np.testing.assert_array_equal(p1, p2)
    assert engine.kb.size > 0
    assert engine.counters["learned"] == sum(1 for e in events if e.y is not None)


def test_kb_never_exceeds_capacity_and_evicts(engine_factory):
    engine = engine_factory(kb_capacity=3, snapshot_every=5)
    for chunk in range(0, 2000, 100):
        engine.process(make_stream(n_tasks=10, per_task=10, seed=chunk)[:100])
        assert engine.kb.size <= 3
    assert engine.kb.counts["evicted"] > 0
    assert len({s for s in engine.kb.source if s}) == engine.kb.size  # one member per source task


def test_delayed_labels_join_expire_and_are_counted(engine_factory):
    engine = engine_factory(labels=LabelsConfig(pending_ttl_s=10.0, pending_max=2))
    x = np.ones(5, np.float32)
    events = [
        Event("a", "p1", x, None, ts=0.0), Event("a", "p2", x, None, ts=1.0),
        Event("a", "p1", None, 1, ts=2.0),  # joins
        Event("a", "nobody", None, 1, ts=2.0),  # no such prediction
        Event("a", "p3", x, None, ts=3.0), Event("a", "p4", x, None, ts=4.0),  # p2 evicted (count bound)
        Event("a", "p2", None, 1, ts=5.0),
        Event("a", "p3", None, 0, ts=30.0),  # too late (TTL)
    ]
    r = engine.process(events)
    assert list(r.outcome) == [PREDICTED, PREDICTED, LABEL_JOINED, LABEL_UNMATCHED, PREDICTED, PREDICTED,
                               LABEL_UNMATCHED, LABEL_UNMATCHED]
    assert engine.counters["learned"] == 1
    assert engine.counters["label_expired"] == 3  # p2 by count, p3 and p4 by TTL
    assert not engine.pending_keys
    assert r.errors[2, 0] in (0.0, 1.0) and np.isnan(r.errors[0, 0])


def test_records_follow_the_prediction_format(engine_factory):
    engine = engine_factory()
    result = engine.process(make_stream(n_tasks=3, per_task=40))
    records = result.records("binary")
    assert records
    _, rec = records[-1]
    assert set(rec) == {"task", "id", "y_pred", "proba", "p_local", "p_kb", "w_local", "kb_top", "model_version"}
    assert abs(sum(rec["proba"]) - 1) < 1e-5 and 0 <= rec["w_local"] <= 1
    assert all(isinstance(name, str) and 0 < w <= 1 for name, w in rec["kb_top"])
    assert any(r["kb_top"] for _, r in records)


def test_state_error_on_mismatched_config(engine_factory, tmp_path):
    from lifelong.errors import StateError

    engine = engine_factory()
    engine.process(make_stream(n_tasks=2, per_task=5))
    checkpoint.save_engine(engine, tmp_path)
    with pytest.raises(StateError, match="kb_capacity"):
        checkpoint.load_engine(tmp_path, dataclasses.replace(engine.cfg, kb_capacity=9))


@st.composite
def adversarial_streams(draw):
    n = draw(st.integers(1, 120))
    tasks = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=n, max_size=n))
    xs = draw(st.lists(st.lists(st.floats(-3, 3), min_size=2, max_size=2), min_size=n, max_size=n))
    ys = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    ends = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    events = []
    for i, (t, x, y, end) in enumerate(zip(tasks, xs, ys, ends, strict=True)):
        events.append(Event(t, f"e{i}", np.array(x, np.float32), y))
        if end and i % 7 == 0:
            events.append(Event(t, None, control="end"))
    return events, draw(st.integers(1, 50))


@pytest.mark.parametrize("mixing", ["auto", "hedge"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=adversarial_streams())
def test_engine_regret_within_bounds_on_every_task(engine_factory, mixing, stream):
    # The factory builds a fresh engine per example, so sharing the fixture across examples is safe.
    events, batch = stream
    engine = engine_factory(dim=2, kb_capacity=2, snapshot_every=3, publish_every=4, mixing=mixing)
    run(engine, events, batch)
    reg = engine.regrets()
    assert (reg["top"] <= reg["top_bound"] + 1e-7).all(), (reg["top"], reg["top_bound"])
    assert (reg["kb"] <= reg["kb_bound"] + 1e-7).all(), (reg["kb"], reg["kb_bound"])
    if mixing == "auto":
        assert (reg["top_bound"] <= np.log(2) + 1e-12).all()


def test_related_tasks_beat_independent_learners(engine_factory):
    from lifelong.events import Schema, from_dict
    from lifelong.generate import stream

    schema = Schema(dim=10)
    events = [from_dict(e, schema) for e in stream("related", n_tasks=60, events=60, dim=10, seed=3)]
    engine = engine_factory(dim=10, kb_capacity=16, snapshot_every=20, publish_every=256, dtype="float32")
    run(engine, events, 256)
    rep = engine.report()
    assert rep["methods"]["lifelong"]["cumulative_error"] < rep["methods"]["itl"]["cumulative_error"] - 0.02
    assert rep["early"]["lifelong"] < rep["early"]["itl"]
    assert rep["counters"]["learned"] == 60 * 60
