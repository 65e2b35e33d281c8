import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.config import LabelsConfig
from lifelong.core.arrivals import LearnedWindow
from lifelong.core.engine import FIRST_ESTIMATE, Engine
from lifelong.core.events import Event
from lifelong.core.results import CONTROL, LABEL_JOINED, LABEL_UNMATCHED, LEARNED, PREDICTED
from lifelong.core.warmup import warm_up
from lifelong.errors import StateError
from lifelong.service import checkpoint

from conftest import make_stream

ALONE = {"snapshot_every": 0, "snapshot_at": (), "population": False}  # tasks share nothing: no KB, no prior
KINDS = [
    pytest.param({}, {}, id="binary-ekf"),
    pytest.param({"optimizer": "adagrad"}, {}, id="binary-adagrad"),
    pytest.param({"model": "mlp", "hidden": 4}, {}, id="binary-mlp"),
    pytest.param({"task": "multiclass", "n_classes": 3}, {"task": "multiclass", "n_classes": 3}, id="multiclass"),
    pytest.param({"task": "regression", "target_range": (0.0, 1.0)}, {"task": "regression"}, id="regression"),
    pytest.param({"mixing": "hedge"}, {}, id="hedge"),
    pytest.param({"kb_capacity": 16}, {"n_tasks": 12}, id="task-prior"),  # enough members for the task prior
]


def run(engine, events, batch):
    results = [engine.process(events[i : i + batch]) for i in range(0, len(events), batch)]
    return np.concatenate([r.pred for r in results]), np.concatenate([r.outcome for r in results])


@pytest.mark.parametrize(("cfg", "stream"), KINDS)
def test_batches_equal_event_by_event(engine_factory, cfg, stream):
    events = make_stream(delayed=0.2, **stream)
    one, batched = engine_factory(**cfg), engine_factory(**cfg)
    p1, o1 = run(one, events, 1)
    p2, o2 = run(batched, events, 37)
    assert (o1 == o2).all()
    np.testing.assert_allclose(p1, p2, atol=1e-9)
    one.settle(), batched.settle()  # tasks absent since the last publication meet the KB now
    for key in one.tasks.cols:
        torch.testing.assert_close(
            one.tasks.cols[key][: one.n_tasks], batched.tasks.cols[key][: batched.n_tasks], atol=1e-7, rtol=1e-9
        )
    assert one.kb.ids == batched.kb.ids
    assert one.report()["methods"]["lifelong"]["cumulative_error"] == pytest.approx(
        batched.report()["methods"]["lifelong"]["cumulative_error"], rel=1e-12
    )


@pytest.mark.parametrize(("cfg", "stream"), KINDS[:1] + KINDS[3:5] + KINDS[6:])
def test_compiled_cpu_path_equals_torch_waves(engine_factory, cfg, stream):
    """The compiled event-by-event path (CPU, EKF) and the torch waves (what CUDA runs) agree."""
    events = make_stream(delayed=0.2, **stream)
    compiled, waves = engine_factory(**cfg), engine_factory(**cfg)
    assert compiled.compiled
    waves.mixtures.compiled = False
    p1, o1 = run(compiled, events, 29)
    p2, o2 = run(waves, events, 29)
    assert (o1 == o2).all()
    np.testing.assert_allclose(p1, p2, atol=1e-9)
    compiled.settle(), waves.settle()
    for key in compiled.tasks.cols:
        torch.testing.assert_close(
            compiled.tasks.cols[key][: compiled.n_tasks], waves.tasks.cols[key][: waves.n_tasks], atol=1e-7, rtol=1e-9
        )
    for name, p in compiled.learners.params.items():
        torch.testing.assert_close(p[: compiled.n_tasks], waves.learners.params[name][: waves.n_tasks])
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
    for key in straight.tasks.cols:
        assert torch.equal(straight.tasks.cols[key][: straight.n_tasks], restored.tasks.cols[key][: restored.n_tasks])
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


def test_a_river_checkpoint_others_could_have_written_is_not_unpickled(engine_factory, tmp_path):
    engine = engine_factory(backend="river", river_model="river.linear_model.LogisticRegression")
    run(engine, make_stream(n_tasks=2, per_task=10), 8)
    path = checkpoint.save_engine(engine, tmp_path)
    path.chmod(0o664)  # writable by the group: its pickled models may be anybody's
    with pytest.raises(StateError, match="refusing to unpickle"):
        checkpoint.read(path)
    with pytest.raises(StateError, match="no usable checkpoint"):
        checkpoint.load_engine(tmp_path, engine.cfg, engine.labels)
    path.chmod(0o600)
    assert checkpoint.load_engine(tmp_path, engine.cfg, engine.labels).counters == engine.counters


def test_kb_never_exceeds_capacity_and_evicts(engine_factory):
    engine = engine_factory(kb_capacity=3, snapshot_every=5)
    for chunk in range(0, 2000, 100):
        engine.process(make_stream(n_tasks=10, per_task=10, seed=chunk)[:100])
        assert engine.kb.size <= 3
    assert engine.kb.counts["evicted"] > 0
    assert len({s for s in engine.kb.source if s}) == engine.kb.size  # one member per source task


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3), st.floats(0.95, 1.05)), min_size=1, max_size=9),
        min_size=1,
        max_size=3,
    )
)
def test_kb_membership_follows_its_rules(rounds):
    """Publications against the rule written plainly: a task's record replaces its own member; another task's
    joins the first empty slot, else the slot updated longest ago, unless its parameters are within
    ``duplicate_cosine`` of a member held at that moment (then it is dropped)."""
    from lifelong.config import EngineConfig
    from lifelong.core.knowledge import Staged

    engine = Engine(EngineConfig(dim=2, kb_capacity=3, basis=False, task_prior=False, dtype="float64"))
    directions = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [1.0, 0.001, 0], [0, 0, 1.0]], dtype=torch.float64)
    held: list[tuple[str, torch.Tensor] | None] = [None] * 3
    updated, applied, dropped = [-1] * 3, 0, 0
    for records in rounds:
        staged = []
        for task, way, scale in records:
            v = directions[way] * scale
            staged.append(Staged(task, f"t{task}", 1, 0, {"w": v[None, :2, None], "b": v[None, 2:]}))
            applied += 1
            mine = next((s for s, h in enumerate(held) if h and h[0] == f"t{task}"), None)
            cos = [float(v @ h[1] / v.norm() / h[1].norm()) for h in held if h]
            if mine is None and cos and max(cos) >= engine.cfg.duplicate_cosine:
                dropped += 1
                continue
            slot = mine if mine is not None else (held.index(None) if None in held else updated.index(min(updated)))
            held[slot], updated[slot] = (f"t{task}", v), applied
        engine.kb.publish(staged)
        assert engine.kb.source == [h and h[0] for h in held] and engine.kb.updated == updated
        assert engine.kb.counts["duplicates"] == dropped


def test_delayed_labels_join_expire_and_are_counted(engine_factory):
    engine = engine_factory(labels=LabelsConfig(pending_ttl_s=10.0, pending_max=2))
    x = np.ones(5, np.float32)
    events = [
        Event("a", "p1", x, None, ts=0.0),
        Event("a", "p2", x, None, ts=1.0),
        Event("a", "p1", None, 1, ts=2.0),  # joins
        Event("a", "nobody", None, 1, ts=2.0),  # no such prediction
        Event("a", "p3", x, None, ts=3.0),
        Event("a", "p4", x, None, ts=4.0),  # p2 evicted (count bound)
        Event("a", "p2", None, 1, ts=5.0),
        Event("a", "p3", None, 0, ts=30.0),  # too late (TTL)
    ]
    r = engine.process(events)
    assert list(r.outcome) == [
        PREDICTED,
        PREDICTED,
        LABEL_JOINED,
        LABEL_UNMATCHED,
        PREDICTED,
        PREDICTED,
        LABEL_UNMATCHED,
        LABEL_UNMATCHED,
    ]
    assert engine.counters["learned"] == 1
    assert engine.counters["label_expired"] == 3  # p2 by count, p3 and p4 by TTL
    assert not engine.arrivals.pending
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
    if mixing == "auto":  # the learned prior keeps every expert at PRIOR_FLOOR at least
        from lifelong.core.mixtures import PRIOR_FLOOR

        assert (reg["top_bound"] <= np.log(1 / PRIOR_FLOOR) + engine.tasks.drift + 1e-12).all()


def test_related_tasks_beat_independent_learners(engine_factory):
    from lifelong.core.events import Schema, from_dict
    from lifelong.tools.generate import stream

    schema = Schema(dim=10)
    events = [from_dict(e, schema) for e in stream("related", n_tasks=60, events=60, dim=10, seed=3)]
    engine = engine_factory(dim=10, kb_capacity=16, snapshot_every=20, publish_every=256, dtype="float32")
    cold = engine_factory(dim=10, kb_capacity=16, publish_every=256, dtype="float32", basis=False, **ALONE)
    run(engine, events, 256)
    run(cold, events, 256)
    rep, itl = engine.report(), cold.report()
    # 1.5 points: on these 60 tasks the task's own learner is the best expert, and the shared level's two
    # learners in the top mixture cost about half a point until the learned prior leaves them (2.0 before them)
    assert rep["methods"]["lifelong"]["cumulative_error"] < itl["methods"]["local"]["cumulative_error"] - 0.015
    assert rep["early"]["lifelong"] < itl["early"]["local"]
    assert rep["counters"]["learned"] == 60 * 60


# --- robustness: no number, however large, reaches a learner unsafely or another task ---


def scaled(events, factors):
    """The same events with each task's features multiplied by its factor (unscaled amounts, counts...)."""
    return [
        dataclasses.replace(e, x=None if e.x is None else e.x.astype(np.float64) * factors.get(e.task, 1.0))
        for e in events
    ]


@pytest.mark.parametrize(("cfg", "stream"), KINDS[:1] + KINDS[3:5])
def test_scaled_features_batch_and_path_exact(engine_factory, cfg, stream):
    events = scaled(make_stream(delayed=0.2, **stream), {"t0": 3e6, "t1": 1e12, "t2": 40.0})
    one, batched, waves = engine_factory(**cfg), engine_factory(**cfg), engine_factory(**cfg)
    waves.mixtures.compiled = False
    p1, _ = run(one, events, 1)
    p2, _ = run(batched, events, 37)
    p3, _ = run(waves, events, 37)
    assert np.isfinite(p1[[e.x is not None for e in events]]).all()
    np.testing.assert_allclose(p1, p2, atol=1e-9)
    np.testing.assert_allclose(p1, p3, atol=1e-7)
    # one standardiser for every task, the same however the stream was cut
    np.testing.assert_array_equal(one.features.stats, batched.features.stats)
    assert one.features.stats[0].max() == sum(e.x is not None for e in events)


@pytest.mark.parametrize("v", [1e2, 3e5, 3e6, 1e12, 1e300])
def test_unscaled_amounts_are_learned(v):
    """One task, x = [amount, 1], amount uniform on (0, v), label amount > v/2, default configuration."""
    from lifelong.config import EngineConfig
    from lifelong.core.engine import Engine

    for seed in range(3):
        rng = np.random.default_rng(seed)
        amounts = rng.uniform(0, v, 200)
        engine = Engine(EngineConfig(dim=2))
        result = engine.process(
            [Event("pay", f"e{i}", np.array([a, 1.0]), int(a > v / 2)) for i, a in enumerate(amounts)]
        )
        assert np.isfinite(result.pred).all()
        assert engine.report()["methods"]["lifelong"]["cumulative_error"] <= 0.25


def test_one_huge_value_poisons_nothing(engine_factory):
    """A value finite as float64 but not as float32 (1e300) in one task: every prediction, state and report
    stays finite, and other tasks (no KB: nothing shared) predict as without it."""
    events = make_stream(n_tasks=6, per_task=40)
    poisoned = list(events)
    at = next(i for i, e in enumerate(events) if e.task == "t2" and e.x is not None and i > 60)
    poisoned[at] = dataclasses.replace(events[at], x=np.array([1e300, -1e300, 1.0, 2.0, 3.0]))
    clean, dirty = engine_factory(**ALONE), engine_factory(**ALONE)
    p_clean, _ = run(clean, events, 64)
    p_dirty, _ = run(dirty, poisoned, 64)
    assert np.isfinite(p_dirty[[e.x is not None for e in events]]).all()
    others = np.array([e.task != "t2" and e.x is not None for e in events])
    np.testing.assert_allclose(p_clean[others], p_dirty[others], rtol=0, atol=1e-12)  # rounding only
    tensors, _ = dirty.state()
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    import json

    json.dumps(dirty.report(), allow_nan=False)


def test_a_non_finite_learner_is_reset_and_its_neighbours_untouched(engine_factory):
    events = make_stream(n_tasks=6, per_task=40, ends=False)
    half = len(events) // 2
    clean, dirty = engine_factory(**ALONE), engine_factory(**ALONE)
    run(clean, events[:half], 50)
    run(dirty, events[:half], 50)
    i = dirty.tasks.index["t4"]
    dirty.learners.params["mu"][i, 0, 0] = float("nan")
    dirty.kb.mu[dirty.tasks.index["t1"]] = float("inf")
    p_clean, _ = run(clean, events[half:], 50)
    p_dirty, _ = run(dirty, events[half:], 50)
    assert np.isfinite(p_dirty[[e.x is not None for e in events[half:]]]).all()
    assert dirty.counters["reset_learner"] == 1 and dirty.counters["reset_code"] == 1
    assert torch.isfinite(dirty.learners.params["mu"][: dirty.n_tasks]).all()
    untouched = np.array([e.task not in ("t4", "t1") and e.x is not None for e in events[half:]])
    np.testing.assert_allclose(p_clean[untouched], p_dirty[untouched], rtol=0, atol=1e-12)


def test_a_non_finite_snapshot_never_enters_the_kb(engine_factory):
    engine = engine_factory(snapshot_every=8, publish_every=16, snapshot_at=(), population=False)
    rng = np.random.default_rng(0)
    first = [Event("a", f"a{i}", rng.normal(size=5), i % 2) for i in range(7)]
    engine.process(first)
    engine.learners.params["mu"][engine.tasks.index["a"]] = float("nan")
    engine.process(
        [Event("a", "a7", rng.normal(size=5), 1)] + [Event("b", f"b{i}", rng.normal(size=5), i % 2) for i in range(20)]
    )
    assert engine.counters["snapshots_not_finite"] == 1 and engine.counters["reset_learner"] == 1
    assert "a" not in engine.kb.slot_of and engine.kb.size == 1  # only b's snapshot
    assert torch.isfinite(engine.kb.store["w"]).all()


def test_earlier_sums_stay_inside_their_group():
    from lifelong.core.mixtures import EarlierSum

    group = torch.tensor([0, 1, 0, 1, 2, 0])
    values = torch.tensor([[1.0], [2.0], [float("nan")], [3.0], [4.0], [5.0]], dtype=torch.float64)
    out = EarlierSum(group)(values)[:, 0]
    assert out[[0, 1, 2, 3, 4]].tolist() == [0.0, 0.0, 1.0, 2.0, 0.0]
    assert torch.isnan(out[5])  # after its own group's NaN only


def test_duplicate_deliveries_are_learned_once_and_counted(engine_factory):
    engine = engine_factory()
    x = np.ones(5)
    once = [
        Event("a", "e1", x, 1, ts=10.0),
        Event("a", "p1", x, None, ts=11.0),
        Event("a", "p1", x, None, ts=12.0),
        Event("a", "p1", None, 0, ts=13.0),
    ]
    again = [Event("a", "e1", x, 1, ts=14.0), Event("a", "p1", None, 0, ts=15.0)]
    engine.process(once)
    assert engine.counters["pending_replaced"] == 1
    result = engine.process(again)
    assert engine.counters["learned"] == 2 and engine.n_labelled[0] == 2
    assert engine.counters["duplicates"] == 2 and not result.records("binary")
    late = engine.process([Event("a", "e1", x, 1, ts=14.0 + LabelsConfig().pending_ttl_s + 1)])
    assert engine.counters["learned"] == 3 and len(late.records("binary")) == 1  # outside the window: new


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False),
            st.integers(-(10**400), 10**400),
            st.sampled_from([1e300, -1e300, 5e-324, 3.4e38, 1e12]),
        ),
        min_size=3,
        max_size=3,
    ),
    sparse=st.dictionaries(st.text(min_size=1, max_size=5), st.floats(allow_nan=False), max_size=6),
    label=st.one_of(st.integers(-2, 3), st.floats(), st.booleans(), st.none(), st.text(max_size=2)),
)
def test_fuzzed_numbers_are_refused_or_learned_finite(engine_factory, values, sparse, label):
    """Any payload is either an event the engine learns with finite results, or an ``InvalidEvent``."""
    import json

    from lifelong.core.events import Schema, decode
    from lifelong.errors import InvalidEvent

    schema = Schema(dim=3)
    engine = engine_factory(dim=3, dtype="float32")
    events = []
    for i, x in enumerate((values, sparse, [v / 7 for v in values if isinstance(v, float)][:3] or values)):
        payload = json.dumps({"task": f"t{i % 2}", "id": f"e{i}", "x": x, "y": label}).encode()
        try:
            events.append(decode(payload, schema))
        except InvalidEvent:
            continue
    events += [dataclasses.replace(e, id=f"again-{k}") for k, e in enumerate(events)]
    if events:
        result = engine.process(events)
        has_x = [e.x is not None for e in events]
        assert np.isfinite(result.pred[has_x]).all()
        json.dumps([rec for _, rec in result.records("binary")], allow_nan=False)
        json.dumps(engine.report(), allow_nan=False)


@pytest.mark.parametrize(("cfg", "stream"), [*KINDS, pytest.param({"backend": "river"}, {}, id="river")])
def test_predict_is_what_process_predicts_next_and_changes_nothing(engine_factory, cfg, stream):
    events = make_stream(delayed=0.2, **stream)
    engine = engine_factory(**cfg)
    for i in range(0, len(events), 23):
        batch = events[i : i + 23]
        probe = [batch[0]] if batch[0].x is not None else []  # the next event: predict must foresee process
        probe.append(Event("never-seen", "q", np.ones(5)))
        before = engine.state()
        before = ({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in before[0].items()}, before[1])
        peeked = engine.predict(probe)
        after = engine.state()
        assert before[1] == after[1]
        for k, v in before[0].items():
            assert torch.equal(v, after[0][k]), k
        result = engine.process(batch)
        if len(probe) == 2:
            np.testing.assert_allclose(peeked.pred[0], result.pred[0], atol=1e-9)
            np.testing.assert_allclose(peeked.p_kb[0], result.p_kb[0], atol=1e-9)
    fresh = engine_factory(**cfg)
    new = Event("n", "q", np.ones(5))
    np.testing.assert_allclose(fresh.predict([new]).pred, fresh.process([new]).pred, atol=1e-9)


def test_knowledge_flows_from_every_task_even_one_event_long(engine_factory):
    """Users of 1-6 events around one concept, never ended: the population member and the warm start carry
    what every task taught, so even a user's first prediction is informed."""
    from lifelong.core.events import Schema, from_dict
    from lifelong.tools.generate import stream

    events = [from_dict(e, Schema(dim=5)) for e in stream("personal", n_tasks=2000, dim=5, seed=1)]
    lifelong, cold = engine_factory(publish_every=256), engine_factory(publish_every=256, basis=False, **ALONE)
    first = np.array([e.task not in seen and not seen.add(e.task) for seen in [set()] for e in events])
    p1, _ = run(lifelong, events, 100)
    p0, _ = run(cold, events, 100)
    y = np.array([e.y for e in events])
    err_first, err_cold_first = (p1[first].argmax(1) != y[first]).mean(), (p0[first].argmax(1) != y[first]).mean()
    assert err_first < 0.75 * err_cold_first  # a new user's first event, against a cold learner's coin flip
    rep = lifelong.report()
    assert rep["methods"]["lifelong"]["cumulative_error"] < 0.75 * cold.report()["methods"]["local"]["cumulative_error"]
    assert any(m and m.startswith("_population@") for m in lifelong.kb.ids)


def test_a_task_never_mixes_its_own_member(engine_factory):
    events = make_stream(n_tasks=8, per_task=40, ends=False)
    engine = engine_factory()
    run(engine, events, 50)
    engine.settle()
    owned = [(engine.tasks.index[src], s) for s, src in enumerate(engine.kb.source) if src in engine.tasks.index]
    assert owned
    for task, slot in owned:
        assert not bool(engine.tasks.cols["in_kb"][task, 1 + slot])
    others = [i for i in range(engine.n_tasks) if i != owned[0][0]]
    assert bool(engine.tasks.cols["in_kb"][others, 1 + owned[0][1]].all())  # everyone else does


def test_snapshot_at_lets_short_tasks_into_the_kb(engine_factory):
    rng = np.random.default_rng(0)
    events = [Event(f"t{i % 4}", f"e{i}", rng.normal(size=5), int(rng.random() < 0.5)) for i in range(40)]
    plain = engine_factory(population=False, snapshot_every=50)
    early = engine_factory(population=False, snapshot_every=50, snapshot_at=(5,))
    run(plain, events, 40)
    run(early, events, 40)
    assert plain.kb.size == 0 and early.kb.size == 4  # ten events per task: only snapshot_at reaches them


def test_duplicate_window_keeps_the_newest_keys_in_learning_order():
    window = LearnedWindow()
    window.add([("a", "1"), ("a", "2")], [1.0, 2.0], cap=3)
    window.add([("a", "1"), ("b", "1")], [3.0, 3.0], cap=3)  # "a/1" learned again keeps its place
    assert list(window) == [("a", "1"), ("a", "2"), ("b", "1")] and window[("a", "1")] == 3.0
    window.add([("b", "2")], [4.0], cap=3)  # the oldest leaves first
    assert list(window) == [("a", "2"), ("b", "1"), ("b", "2")]
    window.expire(3.5)
    assert list(window) == [("b", "2")]
    assert list(LearnedWindow(window.items()).order) == [("b", "2")]


class _Reference(dict):
    """The duplicate window's rules, plainly: a dict in learning order (a key learned again keeps its place)."""

    def add(self, keys, times, cap):
        self.update(zip(keys, times, strict=True))
        while len(self) > cap:
            del self[next(iter(self))]

    def expire(self, limit):
        while self and self[next(iter(self))] < limit:
            del self[next(iter(self))]


@pytest.mark.parametrize("seed", range(4))
def test_duplicate_window_follows_its_rules_and_comes_back_from_its_encoding(monkeypatch, seed):
    """Random learning (new and repeated keys), expiry, forgotten tasks and caps across many small chunks:
    the window equals the plain rules, and what a checkpoint holds (``encoded``) decodes to the same window."""
    monkeypatch.setattr(LearnedWindow, "CHUNK", 3)
    rng = np.random.default_rng(seed)
    window, ref, now = LearnedWindow(), _Reference(), 0.0
    for _ in range(400):
        kind = rng.choice(["add", "add_new", "expire", "forget", "check"], p=[0.4, 0.3, 0.1, 0.05, 0.15])
        if kind in ("add", "add_new"):
            now += 1.0
            keys = [(f"t{rng.integers(4)}", str(rng.integers(60))) for _ in range(rng.integers(1, 6))]
            if kind == "add_new":
                keys = [k for k in dict.fromkeys(keys) if k not in ref]
            times = [now + i / 10 for i in range(len(keys))]
            cap = int(rng.integers(5, 40))
            window.add(keys, times, cap, new=kind == "add_new")
            ref.add(keys, times, cap)
        elif kind == "expire":
            limit = now - float(rng.integers(0, 30))
            window.expire(limit)
            ref.expire(limit)
        elif kind == "forget":
            task = f"t{rng.integers(4)}"
            window.forget({task})
            for k in [k for k in ref if k[0] == task]:
                del ref[k]
        else:
            back = LearnedWindow.decoded(*window.encoded())
            assert list(back.items()) == list(ref.items())
        assert list(window.items()) == list(ref.items()) and len(window) == len(ref)
        assert all(k in window for k in ref) and set(window.keys()) == set(ref)


@pytest.mark.parametrize("labels", [LabelsConfig(), LabelsConfig(pending_max=20, pending_ttl_s=3.0)])
def test_plain_segments_take_the_short_road_to_the_same_state(engine_factory, monkeypatch, labels):
    """Segments of labelled events and controls (the common case) skip the per-event loop; with it forced,
    outcomes, counts, the duplicate window and every table are the same."""
    rng = np.random.default_rng(1)
    events = [e for e in make_stream(n_tasks=8, per_task=24) if e.x is not None]
    stamped = [dataclasses.replace(e, ts=None if i % 3 == 0 else float(i) / 4) for i, e in enumerate(events)]
    stamped[40:40] = [stamped[37], dataclasses.replace(stamped[38], ts=float(rng.integers(50)))]  # duplicates
    short, loop = engine_factory(labels=labels), engine_factory(labels=labels)
    monkeypatch.setattr(loop.arrivals, "plain", lambda evs, index, expiry: None)
    p1, o1 = run(short, stamped, 16)
    p2, o2 = run(loop, stamped, 16)
    assert (o1 == o2).all() and short.counters == loop.counters and short.counters["duplicates"] >= 1
    np.testing.assert_array_equal(p1, p2)
    assert (
        list(short.arrivals.learned.items()) == list(loop.arrivals.learned.items())
        and short.arrivals.now_ts == loop.arrivals.now_ts
    )
    assert short.n_labelled.tolist() == loop.n_labelled.tolist() and short.tasks.names == loop.tasks.names


def test_new_tasks_start_from_the_members_weight_distribution(engine_factory):
    """With enough members, a new task's learner starts from their weight covariance (shrunk towards the plain
    prior); ``task_prior: false`` keeps the plain prior."""
    events = make_stream(n_tasks=12, per_task=24)
    warm, plain = engine_factory(kb_capacity=16), engine_factory(kb_capacity=16, task_prior=False)
    run(warm, events, 32)
    run(plain, events, 32)
    assert warm.kb.size >= 8 and warm.learners.prior_S is not None and plain.learners.prior_S is None
    w = warm.learners.linear_weights(warm.kb.store)[warm.kb.valid].permute(2, 0, 1).double()
    cov = torch.cov(w[0].T)
    shrink = max(0.1, 1 - w.shape[1] / w.shape[2])
    expected = (1 - shrink) * cov + shrink * warm.cfg.prior_var * torch.eye(w.shape[2], dtype=torch.float64)
    torch.testing.assert_close(warm.learners.prior_S[0].double(), expected)
    warm.process([Event("new", "n0", np.ones(5), None)])  # predicted, not learned yet: the learner as it starts
    torch.testing.assert_close(warm.learners.params["S"][warm.tasks.index["new"], 0].double(), expected)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "waves"])
def test_tasks_meet_the_kb_at_their_next_event_as_if_at_each_publication(engine_factory, compiled):
    """A publication touches no task's tables; a task meets the experts that entered while it was away (its own
    member excepted) when it next comes, with the predictions and tables of meeting them at every publication."""
    events = make_stream(n_tasks=16, per_task=24, ends=False, delayed=0.2)
    lazy, eager = engine_factory(kb_capacity=3), engine_factory(kb_capacity=3)
    lazy.mixtures.compiled = eager.mixtures.compiled = compiled
    preds = {}
    for engine in (lazy, eager):
        out = []
        for i in range(0, len(events), 16):  # one publication per batch
            before = {k: v[: engine.n_tasks].clone() for k, v in engine.tasks.cols.items()}
            result = engine.process(events[i : i + 16])
            out.append(result.pred)
            if engine is eager:
                engine.settle()
                continue
            away = np.setdiff1d(np.arange(len(before["stats"])), result.task_index)
            for k, v in before.items():  # tasks absent from the batch: untouched by its publication
                assert torch.equal(engine.tasks.cols[k][away], v[away])
        preds[engine is lazy] = np.concatenate(out)
    np.testing.assert_allclose(preds[True], preds[False], atol=1e-12)
    lazy.settle()
    for key in set(lazy.tasks.cols) - {"n_kb"}:
        torch.testing.assert_close(
            lazy.tasks.cols[key][: lazy.n_tasks], eager.tasks.cols[key][: eager.n_tasks], rtol=0, atol=1e-12
        )
    # an expert evicted before the task came back never took part for it: the KB bound counts fewer experts
    assert (lazy.tasks.cols["n_kb"] <= eager.tasks.cols["n_kb"]).all() and (
        lazy.tasks.cols["n_kb"] < eager.tasks.cols["n_kb"]
    ).any()
    reg = lazy.regrets()
    assert (reg["kb"] <= reg["kb_bound"] + 1e-9).all()
    owned = [(lazy.tasks.index[src], 1 + s) for s, src in enumerate(lazy.kb.source) if src in lazy.tasks.index]
    assert owned and not any(bool(lazy.tasks.cols["in_kb"][i, k]) for i, k in owned)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_code_carried_into_the_current_basis_is_turned_into_it_and_takes_the_prior_where_it_knew_nothing(
    engine_factory, dtype
):
    """A task's basis code, learned in an older basis, is carried when the task comes back: turned by
    B_new' B_old, with the current prior on the directions the old basis lacked (``perp = I - rot rot'``); from
    a basis no longer kept, the prior."""
    engine = engine_factory(dtype=dtype)
    events = make_stream(n_tasks=8, per_task=60, ends=False)
    for i in range(0, len(events), 16):
        engine.process(events[i : i + 16])
    kb = engine.kb
    kept = sorted(kb.bases)
    assert len(kept) >= 3 and kb.basis_at == kept[-1]
    rows = torch.arange(4)
    at = np.array([kept[0], kept[-2], kept[-1], kept[0] - 1], np.int64)  # the last: a basis never kept
    mu, S = kb.carried(rows, at)  # in numpy on the CPU; in torch elsewhere, the same:
    tol = 1e-5 if dtype == "float32" else 1e-12
    for got, want in zip((mu, S), kb._carry(rows, at, in_numpy=False), strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    eye = torch.eye(kb.B.shape[1], dtype=kb.B.dtype)
    for i, a in enumerate(at.tolist()):
        if a not in kb.bases:
            want_mu, want_S = kb.prior_mu.expand_as(mu[i]), kb.prior_S.expand_as(S[i])
        else:
            rot = kb.B.T @ kb.bases[a]
            perp = eye - rot @ rot.T
            want_mu = kb.mu[i] @ rot.T + kb.prior_mu @ perp.T
            want_S = rot @ kb.S[i] @ rot.T + perp @ kb.prior_S @ perp.T
        torch.testing.assert_close(mu[i], want_mu, rtol=tol, atol=tol)
        torch.testing.assert_close(S[i], want_S, rtol=tol, atol=tol)
        if dtype == "float64":  # the single-event path's one row (float64 only): the same
            for got, want in zip(kb.carried_row(i, a), (mu[i], S[i]), strict=True):
                np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-12)
    assert not torch.equal(mu[0], kb.mu[0])  # carrying changed the code


@pytest.mark.parametrize(("cfg", "stream"), KINDS)
def test_warm_up_runs_every_path_of_every_kind_and_changes_nothing(engine_factory, monkeypatch, cfg, stream):
    """The daemon compiles the kernels before it joins its group: a throwaway engine, whatever the kind, goes
    through every outcome, a snapshot and a publication; the daemon's own engine is untouched."""
    engine = engine_factory(**cfg)
    before = engine.state()[1]
    scratch: list[Engine] = []
    outcomes: set[int] = set()

    class Recording(Engine):
        def process(self, events):
            scratch.append(self)
            result = super().process(events)
            outcomes.update(result.outcome.tolist())
            return result

    monkeypatch.setattr("lifelong.core.warmup.Engine", Recording)
    warm_up(engine.cfg, engine.labels)
    assert {PREDICTED, LEARNED, LABEL_JOINED, CONTROL} <= outcomes
    assert scratch[-1].counters["snapshots"] > 0 and scratch[-1].kb.size > 0
    assert scratch[-1].next_estimate > FIRST_ESTIMATE  # the estimates across tasks ran (their kernels compiled)
    assert engine.state()[1] == before and engine.counters["learned"] == 0


@pytest.mark.parametrize("kind", [{}, {"optimizer": "adagrad"}, {"model": "mlp"}], ids=["ekf", "adagrad", "mlp"])
def test_an_untrained_regression_engine_predicts_the_middle_of_the_target_range(engine_factory, kind):
    """Not the range's low end: the least an uninformed prediction can miss by (every level starts there)."""
    engine = engine_factory(task="regression", target_range=(10.0, 30.0), **kind)
    pred = engine.predict([Event("new", None, np.zeros(5))]).pred  # zeros: an MLP's random hidden layer adds none
    assert pred[0, 0] == pytest.approx(20.0)
