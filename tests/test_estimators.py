"""The River estimators: River's own estimator checks, and the same results as the engine."""

from typing import Any

import numpy as np
import pytest
from river import checks

from lifelong.config import EngineConfig
from lifelong.core.engine import Engine
from lifelong.core.events import Event
from lifelong.estimators import LifelongClassifier, LifelongRegressor


def river_checks():
    for model in (LifelongClassifier(), LifelongClassifier(n_classes=7), LifelongRegressor(target_range=(0.0, 100.0))):
        for check in checks.yield_checks(model):
            if check.__name__ not in model._unit_test_skips():
                yield pytest.param(model, check, id=f"{model}-{check.__name__}")


@pytest.mark.parametrize(("model", "check"), list(river_checks()))
def test_river_estimator_checks(model, check):
    check(model.clone())


def related_rows(n_tasks=30, events=80, seed=0):
    from lifelong.tools.generate import stream

    for d in stream("related", n_tasks=n_tasks, events=events, dim=6, block=5, seed=seed):
        if "x" in d:
            yield {"task": d["task"], **{f"f{j}": v for j, v in enumerate(d["x"])}}, bool(d["y"])


@pytest.mark.parametrize("batch", [1, 64])
def test_progressive_validation_equals_the_engine_on_the_same_stream(batch):
    """predict_proba_one then learn_one, row by row (the single-event path), gives what the engine predicts on
    the same events in batches (the estimator hashes the same features into the same buckets)."""
    model = LifelongClassifier(dim=16)
    rows = list(related_rows())
    river_proba = []
    for x, y in rows:
        river_proba.append(model.predict_proba_one(x)[True])
        model.learn_one(x, y)
    engine = Engine(EngineConfig(dim=16, device="cpu", dtype="float64"))
    events = [Event(x["task"], None, model._event(x).x, int(y)) for x, y in rows]
    engine_proba = np.concatenate(
        [engine.process(events[i : i + batch]).pred[:, 1] for i in range(0, len(events), batch)]
    )
    np.testing.assert_allclose(river_proba, engine_proba, rtol=0, atol=1e-9)
    assert model._one.taken > 0.9 * len(rows)  # one event at a time by the single-event path (core/single.py)
    assert model._engine.report()["methods"]["lifelong"] == pytest.approx(engine.report()["methods"]["lifelong"])
    assert model._engine.kb.size > 0  # knowledge flowed between the tasks


def test_labels_task_feature_and_strings():
    model = LifelongClassifier(n_classes=3, dim=8)
    assert model.predict_proba_one({"task": "a", "f": 1.0}) == {}
    for i in range(30):
        model.learn_one({"task": "a", "colour": ["red", "green", "blue"][i % 3]}, ["r", "g", "b"][i % 3])
    proba = model.predict_proba_one({"task": "a", "colour": "green"})
    assert set(proba) == {"r", "g", "b"} and max(proba, key=proba.get) == "g"
    assert set(model._engine.tasks.index) == {"a"}
    model.learn_one({"colour": "red"}, "r")  # no task feature: the default task
    assert set(model._engine.tasks.index) == {"a", "default"}
    with pytest.raises(ValueError, match="n_classes"):
        model.learn_one({"task": "a"}, "fourth")
    with pytest.raises(ValueError, match="True/False"):
        LifelongClassifier().learn_one({"f": 1.0}, "yes")


def test_features_hashed_as_documented():
    """Numbers as they are (colliding names add up), strings as indicators, missing values skipped: the same
    buckets whatever the order of the names or the mix of types."""
    from lifelong.core.events import hash_index

    model = LifelongClassifier(dim=4)
    numbers = {f"n{i}": 0.5 * i - 2 for i in range(10)} | {"i": 3, "b": True}  # 12 names in 4 buckets: collisions
    want = np.zeros(4)
    for name, value in numbers.items():
        want[hash_index(name, 4)] += float(value)
    np.testing.assert_allclose(model._event({"task": "a", **numbers}).x, want, rtol=1e-15)
    np.testing.assert_allclose(model._event(dict(reversed(list(numbers.items())))).x, want, rtol=1e-15)
    mixed = {**numbers, "colour": "red", "gone": None, "nan": float("nan"), "inf": float("inf")}
    want[hash_index("colour=red", 4)] += 1.0
    np.testing.assert_allclose(model._event(mixed).x, want, rtol=1e-15)


def test_a_pickled_model_goes_on_as_the_original():
    """The single-event path reads the engine's arrays as views: a pickled copy reads its own engine's."""
    import pickle

    rows = list(related_rows(n_tasks=10, events=40))
    model = LifelongRegressor(dim=16, target_range=(0.0, 1.0))
    for x, y in rows[:200]:
        model.learn_one(x, float(y))
    model.predict_one({**rows[0][0], "task": "not seen yet"})  # a new task's rows, kept for the next one
    copy = pickle.loads(pickle.dumps(model))  # noqa: S301 (our own bytes)
    for x, y in rows[200:]:
        assert copy.predict_one(x) == model.predict_one(x)
        copy.learn_one(x, float(y)), model.learn_one(x, float(y))
    assert copy._one.taken > 150 and copy._engine.counters == model._engine.counters


def test_one_at_a_time_and_many_at_once_mix_freely():
    """learn_many / predict_proba_many between learn_one calls: the single-event path reads the engine afresh."""
    import pandas as pd

    rows = list(related_rows(n_tasks=8, events=40))
    model = LifelongClassifier(dim=16)
    engine = Engine(EngineConfig(dim=16, device="cpu", dtype="float64"))
    for i in range(0, len(rows), 40):
        chunk = rows[i : i + 40]
        if i % 80:
            frame = pd.DataFrame([x for x, _ in chunk])
            model.predict_proba_many(frame)
            model.learn_many(frame, pd.Series([y for _, y in chunk]))
        else:
            for x, y in chunk:
                model.learn_one(x, y)
        engine.process([Event(x["task"], None, model._event(x).x, int(y)) for x, y in chunk])
    x = rows[-1][0]
    want = engine.predict([Event(x["task"], None, model._event(x).x)]).pred[0, 1]
    assert model.predict_proba_one(x)[True] == pytest.approx(want, abs=1e-9)
    assert model._engine.counters == engine.counters


def test_a_regressor_that_learned_nothing_predicts_the_middle_of_its_range():
    assert LifelongRegressor(target_range=(0.0, 10.0)).predict_one({"task": "a", "f": 3.0}) == pytest.approx(5.0)


def test_the_engine_works_on_its_own_threads_and_leaves_the_callers():
    """A notebook's torch keeps its thread setting; the engine's small torch operations (a publication: 4x slower
    on two threads than on one here) run on ``engine.threads``, one by default, or on the caller's with 0."""
    import torch

    rows = list(related_rows(n_tasks=6, events=30))
    before = torch.get_num_threads()
    try:
        for threads, want in ((1, 1), (0, 3)):
            torch.set_num_threads(3)
            model = LifelongClassifier(dim=8, engine={"publish_every": 16, "threads": threads})
            seen: list[int] = []

            def publish(seen: list[int] = seen, then: Any = model._engine._publish) -> None:
                seen.append(torch.get_num_threads())
                then()

            model._engine._publish = publish  # type: ignore[method-assign]
            for x, y in rows:
                model.predict_proba_one(x)
                model.learn_one(x, y)
            assert len(seen) == len(rows) // 16 and set(seen) == {want}
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
