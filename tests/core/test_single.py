"""The single-event path (``core/single.py``) gives what ``Engine.process`` and ``Engine.predict`` give."""

import numpy as np
import pytest
import torch

from lifelong.core.events import Event
from lifelong.core.single import OneEvent

from conftest import make_stream

KINDS = [
    pytest.param({}, {}, id="binary"),
    pytest.param({"task": "multiclass", "n_classes": 3}, {"task": "multiclass", "n_classes": 3}, id="multiclass"),
    pytest.param({"task": "regression", "target_range": (0.0, 1.0)}, {"task": "regression"}, id="regression"),
    pytest.param({"mixing": "hedge"}, {}, id="hedge"),
    pytest.param({"kb_capacity": 16}, {"n_tasks": 12}, id="task-prior"),
    pytest.param({"population": False, "basis": False}, {}, id="no-shared-level"),
    pytest.param({"basis": False}, {}, id="no-basis"),  # the KB level sleeps until the KB has a member
    pytest.param({"max_resident_tasks": 3}, {}, id="task-store"),  # tasks go to the store and come back
    pytest.param({}, {"n_tasks": 20, "per_task": 15, "block": 1}, id="tables-grow"),  # past their first 16 rows
]


def plain(events):
    """The stream as the River estimators send it: labelled events without ids, times or controls."""
    return [Event(e.task, None, e.x.astype(np.float64), e.y) for e in events if e.x is not None and e.y is not None]


def both(engine_factory, cfg, stream, per_task=60):
    """The same stream through the single-event path of one engine (the engine where it declines) and through
    ``process``/``predict`` of another, event by event: their predictions, and the single path's share."""
    events = plain(make_stream(**{"per_task": per_task, "ends": False, **stream}))
    fast, slow = engine_factory(**cfg), engine_factory(**cfg)
    one = OneEvent(fast)
    got, want = [], []
    for i, e in enumerate(events):
        if i % 3 < 2:  # predictions of a task never seen and of the event coming next, in either order
            for probe in (Event(f"new{i}", None, e.x), e)[:: 1 - 2 * (i % 3)]:
                p = one.predict(probe.task, probe.x)
                if p is None:
                    one.stale()
                got.append(fast.predict([probe]).pred[0] if p is None else p.copy())
                want.append(slow.predict([probe]).pred[0])
        p = one.learn(e.task, e.x, e.y)
        if p is None:
            one.stale()
            p = fast.process([e]).pred[0]
        got.append(p.copy())
        want.append(slow.process([e]).pred[0])
    one.stale()  # the rows it learned go to the engine's ``Recent`` (before ``state``)
    return fast, slow, np.array(got), np.array(want), one.taken / len(events)


@pytest.mark.parametrize(("cfg", "stream"), KINDS)
def test_single_event_path_equals_process_and_predict(engine_factory, cfg, stream):
    fast, slow, got, want, taken = both(engine_factory, cfg, stream)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert taken > 0.9  # new tasks, snapshots, KB entry, publications and estimates included
    assert fast.kb.size > 0 and fast.next_estimate > 64
    fast.settle(), slow.settle()  # predictions bring a task's KB entry forward: the same once all have met it
    (a, meta_a), (b, meta_b) = fast.state(), slow.state()
    assert meta_a.pop("drift") == pytest.approx(meta_b.pop("drift"), abs=1e-9) and meta_a == meta_b
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=1e-9, msg=key)


def test_a_non_finite_learner_restarts_as_process_restarts_it(engine_factory):
    fast, slow, *_ = both(engine_factory, {}, {}, per_task=20)
    for engine in (fast, slow):
        engine.learners.params["mu"][engine.tasks.index["t2"], 0, 0] = float("inf")
        engine.kb.mu[engine.tasks.index["t3"]] = float("nan")
    one = OneEvent(fast)
    for task in ("t2", "t3"):
        e = Event(task, None, np.ones(5), 1)
        got, want = one.learn(task, e.x, 1), slow.process([e]).pred[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert fast.counters == slow.counters and fast.counters["reset_learner"] == fast.counters["reset_code"] == 1
    assert torch.isfinite(fast.learners.params["mu"]).all() and torch.isfinite(fast.kb.mu).all()


def test_declines_what_it_does_not_do(engine_factory):
    engine = engine_factory(dtype="float32")
    one = OneEvent(engine)
    assert one.learn("a", np.ones(5), 1) is None and one.predict("a", np.ones(5)) is None
    engine = engine_factory()
    one = OneEvent(engine)
    engine.process([Event("a", "e1", np.ones(5), None)])  # a prediction waiting for its label
    assert one.learn("a", np.ones(5), 1) is None
    timed = engine_factory()
    timed.process([Event("a", None, np.ones(5), 1, ts=1.7e9)])  # event time: the expiry clock runs
    assert OneEvent(timed).learn("a", np.ones(5), 1) is None


def test_codes_from_a_basis_no_longer_kept_start_from_the_prior_as_process_starts_them(engine_factory, monkeypatch):
    monkeypatch.setattr("lifelong.core.knowledge.BASES_KEPT", 1)  # a task back after two refreshes lost its basis
    fast, slow, got, want, _ = both(engine_factory, {}, {"n_tasks": 12, "block": 5})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert len(fast.kb.bases) == 1 and fast.kb.basis_at > 0
