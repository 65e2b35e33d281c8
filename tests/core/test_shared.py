"""The shared standardiser and the live shared level: features mean the same in every task, the pooled learner
predicts from the last event on, and the mixed-effects learner finds how much tasks differ."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.config import EngineConfig
from lifelong.core.engine import Engine
from lifelong.core.events import Event
from lifelong.core.features import LIMIT, Standardiser
from lifelong.core.hedge import prior_em
from lifelong.core.tasks import TOP


def test_a_raw_value_means_the_same_in_every_task():
    """Test scores 300-700 sent by two tasks: the same raw value reaches both tasks' learners as the same input,
    and every input a learner sees lies within ±LIMIT."""
    rng = np.random.default_rng(0)
    engine = Engine(EngineConfig(dim=1))
    scores = rng.uniform(300, 700, 200)
    engine.process([Event("ab"[i % 2], f"e{i}", np.array([s]), int(s > 500)) for i, s in enumerate(scores)])
    seen = engine.features.peek(np.array([[450.0], [450.0], [1e12]]))
    assert seen[0, 0] == seen[1, 0] and -1.0 < seen[0, 0] < 0.0
    assert seen[2, 0] == LIMIT
    # and what task a learned carries over: a new task predicts the rule from its first event
    new = engine.predict([Event("c", "q1", np.array([650.0])), Event("c", "q2", np.array([350.0]))])
    assert new.pred[0, 1] > 0.8 and new.pred[1, 1] < 0.2


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=25, max_size=60),
    cut=st.integers(1, 24),
    huge=st.sampled_from([1e300, -1e300, 1e15]),
)
def test_the_standardiser_is_batch_exact_and_an_outlier_moves_it_at_most_as_a_value_at_the_bound(values, cut, huge):
    x = np.array(values).reshape(-1, 1)
    whole, parts = Standardiser(1), Standardiser(1)
    a, b = x.copy(), x.copy()
    whole.scale(a)
    parts.scale(b[:cut])
    parts.scale(b[cut:])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.stats, parts.stats)
    assert np.abs(a).max() <= LIMIT
    n, mean, dev, _ = whole.stats[:, 0]
    out = np.array([[huge]])
    whole.scale(out)
    assert abs(out[0, 0]) == LIMIT
    bound = LIMIT * max(np.sqrt(np.pi / 2) * dev, 1.0)  # the winsorising bound, in raw units
    assert abs(whole.stats[1, 0] - mean) <= (bound + 1e-9 * abs(mean)) / (n + 1) + 1e-9 * max(1.0, abs(mean))


def test_the_pooled_learner_is_live():
    """Between publications the shared level already knows what every task taught: a task never seen predicts
    the rule others followed, with the KB still empty."""
    rng = np.random.default_rng(1)
    engine = Engine(EngineConfig(dim=2, publish_every=100_000))
    x = rng.normal(size=(300, 2))
    engine.process([Event(f"t{i % 30}", f"e{i}", x[i], int(x[i, 0] > 0)) for i in range(300)])
    assert engine.kb.size == 0
    fresh = engine.predict([Event("new", "q", np.array([2.0, 0.0]))])
    assert fresh.pred[0, 1] > 0.85


def random_intercepts(n_tasks=200, per_task=30, spread=0.7, seed=0, regression=False):
    """Tasks that share a slope and differ by an intercept ~ N(0, spread²)."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, spread, n_tasks)
    events = []
    for i in rng.permutation(np.repeat(np.arange(n_tasks), per_task)).tolist():
        x = rng.normal(size=2)
        logit = 1.5 * x[0] + offsets[i]
        y = float(logit + rng.normal(0, 0.5)) if regression else int(rng.random() < 1 / (1 + np.exp(-logit)))
        events.append(Event(f"t{i}", f"e{len(events)}", x, y))
    return events


def test_the_mixed_effects_learner_finds_how_much_tasks_differ():
    """Empirical Bayes: the prior of the deviations grows where tasks differ (the intercept, spread 0.7: variance
    0.49) and shrinks where they do not (the slopes); the mixed-effects learner beats the pooled one."""
    engine = Engine(EngineConfig(dim=2))
    events = random_intercepts()
    for i in range(0, len(events), 500):
        engine.process(events[i : i + 500])
    sigma = engine.shared.sigma[0]
    assert 0.2 < sigma[-1] < 1.0  # the intercept
    assert (sigma[:-1] < sigma[-1] / 4).all()  # the slopes
    n = engine.n_tasks
    totals = engine.tasks.cols["L_top"][:n].sum(0)
    assert totals[TOP.index("mixed")] < totals[TOP.index("pooled")] - 0.005 * len(events)


def test_the_top_prior_learns_which_level_tasks_need():
    """Tasks that differ only by an intercept: across tasks, the top level's prior moves to the shared level's
    learners, and a task that starts late trusts them from its first event."""
    engine = Engine(EngineConfig(dim=2))
    events = random_intercepts(seed=2)
    for i in range(0, len(events), 500):
        engine.process(events[i : i + 500])
    prior = engine.mixtures.top_prior.numpy()
    assert prior[TOP.index("mixed")] + prior[TOP.index("pooled")] > 0.6
    assert np.isclose(prior.sum(), 1.0)


@pytest.mark.parametrize("regression", [False, True])
def test_the_shared_level_is_the_same_in_torch_waves(regression):
    """The shared level runs in arrival order on the CPU for both paths: torch waves predict what the compiled
    path predicts."""
    events = random_intercepts(n_tasks=20, per_task=20, regression=regression)
    task = {"task": "regression", "target_range": (-6.0, 6.0)} if regression else {}
    compiled, waves = Engine(EngineConfig(dim=2, **task)), Engine(EngineConfig(dim=2, **task))
    waves.mixtures.compiled = False
    a = np.concatenate([compiled.process(events[i : i + 37]).pred for i in range(0, len(events), 37)])
    b = np.concatenate([waves.process(events[i : i + 37]).pred for i in range(0, len(events), 37)])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(compiled.shared.sigma, waves.shared.sigma, rtol=1e-6)


def test_prior_em_moves_to_the_expert_tasks_need_and_keeps_absent_shares():
    losses = np.array([[5.0, 1.0, 9.0], [4.0, 2.0, 8.0], [6.0, 0.5, 7.0]])
    present = np.ones((3, 3), bool)
    pi = np.full(3, 1 / 3)
    once = prior_em(losses, present, pi.copy(), 1.0, 1)
    many = prior_em(losses, present, pi.copy(), 1.0, 50)
    assert np.isclose(once.sum(), 1.0) and np.isclose(many.sum(), 1.0)
    assert pi[1] < once[1] < many[1] and many[1] > 0.95
    same = prior_em(np.ones((3, 3)), present, pi.copy(), 1.0, 10)
    np.testing.assert_allclose(same, pi)
    absent = present.copy()
    absent[:, 2] = False  # no task had expert 2: its share stays
    assert np.isclose(prior_em(losses, absent, pi.copy(), 1.0, 10)[2], pi[2])


@settings(max_examples=60, deadline=None)
@given(
    probs=st.lists(st.lists(st.floats(0.01, 0.99), min_size=4, max_size=4), min_size=1, max_size=60),
    labels=st.lists(st.integers(0, 1), min_size=60, max_size=60),
    moves=st.lists(st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4), min_size=60, max_size=60),
    every=st.integers(1, 20),
)
def test_a_mixture_under_a_moving_prior_stays_within_its_bound(probs, labels, moves, every):
    """The top level's bound (log loss, η = 1): whatever the losses and however the prior moves between rounds,
    L_mix - L_k ≤ ln(1 / π_k at the end) + Σ_t ln max_j π_{t+1, j} / π_{t, j} against every expert k."""
    p = np.array(probs)
    n, k = p.shape
    L, mix_loss, drift = np.zeros(k), 0.0, 0.0
    pi = np.full(k, 1 / k)
    for t in range(n):
        if t and t % every == 0:
            new = np.array(moves[t]) / np.sum(moves[t])
            drift += max(0.0, float(np.log(new / pi).max()))
            pi = new
        w = pi * np.exp(-(L - L.min()))
        w /= w.sum()
        q = p[t] if labels[t] else 1 - p[t]  # each expert's probability of the label
        mix_loss -= np.log(w @ q)
        L -= np.log(q)
    assert (mix_loss - L <= -np.log(pi) + drift + 1e-9).all()


def test_without_a_population_no_shared_expert_takes_part():
    engine = Engine(dataclasses.replace(EngineConfig(dim=2), population=False))
    engine.process(random_intercepts(n_tasks=5, per_task=10))
    assert engine.shared is None
    assert not engine.tasks.cols["in_top"][: engine.n_tasks, 2:].any()


def test_a_state_saved_before_the_shared_level_loads_and_the_shared_learners_join():
    """A checkpoint of the two-level engine (top tables of two columns, pending predictions with two levels, no
    standardiser, shared level or top prior): it loads, its pending labels are scored, and every task's top
    mixture takes the shared learners in at the mixture's loss so far."""
    events = random_intercepts(n_tasks=6, per_task=40)
    delayed = [dataclasses.replace(e, y=None) for e in events[:200]] + [
        Event(e.task, e.id, None, e.y) for e in events[150:200]
    ]
    engine = Engine(EngineConfig(dim=2))
    engine.process(delayed)
    tensors, meta = engine.state()
    old = {k: v for k, v in tensors.items() if not k.startswith(("shared.", "recent.", "features.", "mixtures."))}
    for k in ("task.me_prec", "task.me_nat", "task.drift_at"):
        del old[k]
    for k in ("task.L_top", "task.in_top", "pending.top"):
        old[k] = old[k][:, :2].clone()
    old["task.n_top"] = old["task.in_top"].sum(1)
    restored = Engine(EngineConfig(dim=2))
    restored.load_state(old, {k: v for k, v in meta.items() if k not in ("recent", "drift", "next_estimate")})
    n = restored.n_tasks
    assert restored.tasks.cols["in_top"][:n, 2:].all()
    loss = restored.tasks.cols["stats"][:n, 0]
    assert torch.equal(restored.tasks.cols["L_top"][:n, 3], loss)
    learned = restored.counters["learned"]
    result = restored.process([Event(e.task, e.id, None, e.y) for e in events[:150]] + events[200:])
    assert restored.counters["learned"] == learned + 150 + len(events) - 200
    assert np.isfinite(result.pred[~np.isnan(result.pred[:, 0])]).all()


def test_a_new_task_starts_from_the_pooled_learner_as_of_the_last_estimate(engine_factory):
    """Not only from the last publication (every 1,024 events by default): the early tasks of a stream, which
    are most of a short stream's, start from what the pooled learner knows after 32 events."""
    engine = engine_factory(publish_every=1024)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5))
    engine.process([Event(f"t{i % 8}", None, row, int(row[0] > 0)) for i, row in enumerate(x)])  # an estimate
    assert engine.kb.size == 0 and engine.shared.learned == 32  # nothing published yet
    engine.residency.admit(["new"])
    mu = engine.learners.params["mu"][engine.tasks.index["new"]].numpy()
    np.testing.assert_array_equal(mu, engine.shared.w)
    assert mu[0, 0] > 0.5  # the pooled learner has learned that the first feature says "true"
