"""Property tests of every regret bound the code claims, on adversarial sequences (hypothesis)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lifelong.core.hedge import LOSS_CODES, Mixing, mix_events, smooth, top_k

TOL = 1e-9


def run_mixture(
    mixing: Mixing,
    preds: list[list[float]],
    labels: list[float],
    entries: list[int],
    as_proba: bool,
    log_prior: torch.Tensor | None = None,
) -> tuple[float, list[float], int]:
    """Play the mixture with sleeping experts (an expert joins at its entry round with the mixture's
    cumulative loss). Returns the mixture's loss, each expert's loss, and how many experts took part."""
    k = len(entries)
    cum = torch.zeros(k, dtype=torch.float64)
    present = torch.zeros(k, dtype=torch.bool)
    total = 0.0
    for t, (row, y) in enumerate(zip(preds, labels, strict=True)):
        for e in range(k):
            if entries[e] == t:
                present[e] = True
                cum[e] = total
        if not present.any():
            continue
        p = torch.tensor(row, dtype=torch.float64)
        experts = smooth(torch.stack([1 - p, p], dim=-1)) if as_proba else p.unsqueeze(-1)
        w = mixing.weights(cum, present, torch.tensor(t + 1), log_prior)
        combined = mixing.mix(w, experts)
        target = torch.tensor(y)
        total += float(mixing.loss(combined, target))
        cum += mixing.loss(experts, target.expand(k, 1).squeeze(-1))
    return total, cum.tolist(), int(present.sum())


def sequences(value: st.SearchStrategy, label: st.SearchStrategy):
    return st.integers(1, 5).flatmap(
        lambda k: st.integers(1, 40).flatmap(
            lambda n: st.tuples(
                st.lists(st.lists(value, min_size=k, max_size=k), min_size=n, max_size=n),
                st.lists(label, min_size=n, max_size=n),
                st.lists(st.integers(0, n - 1), min_size=k, max_size=k).map(lambda e: [0, *e[1:]]),
            )
        )
    )


@settings(max_examples=300, deadline=None)
@given(sequences(st.floats(0, 1), st.integers(0, 1)))
def test_log_loss_mixture_regret_at_most_ln_n(seq):
    preds, labels, entries = seq
    mixing = Mixing("log")
    total, experts, n = run_mixture(mixing, preds, labels, entries, as_proba=True)
    for loss in experts:
        assert total - loss <= math.log(n) + TOL
    assert mixing.bound(len(labels), n) == math.log(n) or n == 1


@settings(max_examples=300, deadline=None)
@given(sequences(st.floats(-4, 5), st.floats(-2, 3)))
def test_squared_loss_aggregating_algorithm_regret(seq):
    """Vovk's substitution at η = 2 / (b-a)²: regret <= ln N (b-a)² / 2, with experts predicting beyond the range
    (clipped) and joining late."""
    preds, labels, entries = seq
    mixing = Mixing("squared", (-2.0, 3.0))
    total, experts, n = run_mixture(mixing, preds, labels, entries, as_proba=False)
    for loss in experts:
        assert total - loss <= mixing.bound(len(labels), n) + TOL
    assert abs(mixing.bound(10, 2) - math.log(2) * 5.0**2 / 2) < 1e-12


@settings(max_examples=300, deadline=None)
@given(sequences(st.floats(0, 1), st.integers(0, 1)), st.integers(2, 6))
def test_anytime_hedge_regret(seq, m):
    preds, labels, entries = seq
    mixing = Mixing("hedge", hedge_m=m)
    total, experts, n = run_mixture(mixing, preds, labels, entries, as_proba=True)
    for loss in experts:
        assert total - loss <= mixing.bound(len(labels), n) + TOL


def test_hedge_bound_grows_like_sqrt_n():
    mixing = Mixing("hedge", hedge_m=2)
    b100, b10000 = mixing.bound(100, 2), mixing.bound(10_000, 2)
    assert 8 < b10000 / b100 < 12  # sqrt(100) = 10: the average regret vanishes


@settings(max_examples=300, deadline=None)
@given(sequences(st.floats(0, 1), st.integers(0, 1)), st.lists(st.floats(0, 6), min_size=5, max_size=5))
def test_log_loss_mixture_with_a_prior_regret_at_most_ln_mass_over_weight(seq, log_prior):
    """Prior weights pi_k (the KB's shared experts): regret against expert k <= ln(M / pi_k), M = the prior
    weight of every expert that took part; at most ln M against any expert of weight >= 1."""
    preds, labels, entries = seq
    k = len(entries)
    prior = torch.tensor(log_prior[:k], dtype=torch.float64)
    mixing = Mixing("log")
    total, experts, n = run_mixture(mixing, preds, labels, entries, as_proba=True, log_prior=prior)
    took_part = [e for e in range(k) if entries[e] < len(labels)]
    mass = float(prior[took_part].exp().sum())
    for e in took_part:
        assert total - experts[e] <= math.log(mass) - float(prior[e]) + TOL
    assert mixing.bound(len(labels), n, mass) == math.log(mass) or n == 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 70), st.floats(1, 400)), min_size=1, max_size=20))
def test_bounds_of_many_tasks_equal_the_bound_of_each(rows):
    n, k, mass = (np.array(c) for c in zip(*rows, strict=True))
    mass = np.maximum(mass, k)
    for mixing in (Mixing("log"), Mixing("squared", (0.0, 2.0)), Mixing("hedge", hedge_m=3)):
        expected = [mixing.bound(int(a), int(b)) for a, b in zip(n, k, strict=True)]
        assert np.allclose(mixing.bounds(n, k), expected, rtol=1e-12, atol=0)
        if mixing.fixed_eta is not None:
            with_mass = [mixing.bound(int(a), int(b), float(m)) for a, b, m in zip(n, k, mass, strict=True)]
            assert np.allclose(mixing.bounds(n, k, mass), with_mass, rtol=1e-12, atol=0)


def reference_mix(kb_x, p_local, y, log_prior):
    """Both mixtures of one task's labelled events, one by one from cumulative losses (log loss, eta = 1)."""
    L_kb, L_top = np.zeros(kb_x.shape[1]), np.zeros(2)
    preds, heaviest = [], []
    for i in range(len(y)):
        logits = -L_kb + log_prior
        w = np.exp(logits - logits.max())
        w /= w.sum()
        top = np.stack([p_local[i], w @ kb_x[i]])
        v = np.exp(-L_top - (-L_top).max())
        v /= v.sum()
        preds.append(v @ top)
        heaviest.append(np.sort(w)[::-1][:3])
        L_kb -= np.log(kb_x[i, :, y[i]])
        L_top -= np.log(top[:, y[i]])
    return np.array(preds), np.array(heaviest), L_kb, L_top


@pytest.mark.parametrize("tiny", [1e-3, 1e-6])
def test_compiled_mixture_equals_cumulative_losses(tiny):
    """The compiled mixture (products of probabilities, kept in range) equals the mixture recomputed from
    cumulative log losses, also when an expert's product of probabilities underflows a double."""
    rng = np.random.default_rng(0)
    n, k = 1000, 5  # the best expert's product of probabilities leaves a double's range too
    p1 = rng.uniform(0.05, 0.95, (n, k))
    p1[:, 1] = tiny  # always (nearly) sure of the wrong class: exp(-L) < 1e-300 after a few dozen events
    y = np.ones(n, np.int64)
    kb_x = np.stack([1 - p1, p1], axis=-1)
    p_local = np.stack([np.full(n, 0.4), np.full(n, 0.6)], axis=-1)
    log_prior = np.array([5.0, 0, 0, 0, 0])
    want, heaviest, L_kb, L_top = reference_mix(kb_x, p_local, y, log_prior)

    tables = {
        "L_kb": np.zeros((1, k)),
        "in_kb": np.ones((1, k), bool),
        "L_top": np.zeros((1, 2)),
        "in_top": np.ones((1, 2), bool),
        "stats": np.zeros((1, 9)),
    }
    out = {name: np.full((n, 2), np.nan) for name in ("local", "kb", "pred")}
    slots, weights = np.zeros((n, 3), np.int64), np.zeros((n, 3))
    errors, losses, w_local = np.full((n, 3), np.nan), np.full((n, 3), np.nan), np.zeros(n)
    none = np.zeros((0, k, 2))
    zeros = np.zeros(n, np.int64)
    mix_events(
        zeros, zeros, np.ones(n, bool), np.ones(n, bool), np.arange(n), np.arange(n), y.astype(float),
        np.stack([p_local, p_local], axis=1), kb_x, np.full(n, -1), none, none[:, :2], none[:, 0], tables["L_kb"],
        tables["in_kb"], tables["L_top"], tables["in_top"], tables["stats"], log_prior, np.zeros(2),
        LOSS_CODES["log"], False, 1.0, float(k), 0.0, 1.0, 20,
        out["local"], out["kb"], out["pred"], w_local, slots, weights, errors, losses,
    )  # fmt: skip
    np.testing.assert_allclose(out["pred"], want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(tables["L_kb"][0], L_kb, rtol=1e-9)
    np.testing.assert_allclose(tables["L_top"][0], L_top, rtol=1e-9)
    np.testing.assert_allclose(weights, heaviest, rtol=1e-9, atol=1e-300)  # the three heaviest KB experts


def test_top_k_takes_the_heaviest_and_the_lower_index_on_ties():
    slots, weights = np.zeros(3, np.int64), np.zeros(3)
    top_k(np.array([0.1, 0.3, 0.3, 0.0, 0.3]), slots, weights)
    assert slots.tolist() == [1, 2, 4] and weights.tolist() == [0.3, 0.3, 0.3]
    top_k(np.array([0.0, 0.7, 0.2, 0.1]), slots, weights)
    assert slots.tolist() == [1, 2, 3]
