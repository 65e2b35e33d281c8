"""Peer methods for the benchmarks, run on the same decoded events (optional dependencies: river, vowpalwabbit).

Each returns per-labelled-event errors and log losses (predict, then learn, in file order) and the seconds
the pass took, events already decoded for all methods.
"""

from __future__ import annotations

import math
import time

import numpy as np

from lifelong.core.events import Event


def _score(p1: float, y: int) -> tuple[float, float]:
    p1 = min(max(p1, 1e-15), 1 - 1e-15)
    return float((p1 > 0.5) != bool(y)), -math.log(p1 if y else 1 - p1)


def _regression_score(pred: float, y: float, lo: float, hi: float) -> tuple[float, float]:
    pred = min(max(pred, lo), hi) if math.isfinite(pred) else (lo + hi) / 2  # a diverged peer predicts the middle
    return (pred - y) ** 2, (pred - y) ** 2


def river_per_task(
    events: list[Event], scaled: bool = False, target_range: tuple[float, float] | None = None
) -> tuple[np.ndarray, float]:
    """One River linear model (defaults) per task: ``LogisticRegression``, or ``LinearRegression`` when a
    ``target_range`` is given (its predictions clipped to the range); ``scaled``: behind a ``StandardScaler``.
    All events under one task name make it the pooled peer."""
    from river import linear_model, preprocessing

    def make() -> object:
        model = linear_model.LinearRegression() if target_range else linear_model.LogisticRegression()
        return preprocessing.StandardScaler() | model if scaled else model

    models: dict[str, object] = {}
    out = []
    t0 = time.perf_counter()
    for e in events:
        if e.x is None or e.y is None:
            continue
        model = models.get(e.task)
        if model is None:
            model = models[e.task] = make()
        x = dict(enumerate(e.x.tolist()))
        if target_range:
            out.append(_regression_score(model.predict_one(x), float(e.y), *target_range))  # type: ignore[attr-defined]
            model.learn_one(x, float(e.y))  # type: ignore[attr-defined]
        else:
            out.append(_score(model.predict_proba_one(x).get(True, 0.5), int(e.y)))  # type: ignore[attr-defined]
            model.learn_one(x, bool(e.y))  # type: ignore[attr-defined]
    return np.array(out).reshape(-1, 2), time.perf_counter() - t0


def vw_multitask(events: list[Event], target_range: tuple[float, float] | None = None) -> tuple[np.ndarray, float]:
    """Vowpal Wabbit with a task x feature interaction (``-q tf``): logistic regression, or squared loss when a
    ``target_range`` is given (predictions clipped to it)."""
    from vowpalwabbit import pyvw

    loss = "--loss_function squared" if target_range else "--loss_function logistic --link logistic"
    vw = pyvw.Workspace(f"{loss} -q tf --quiet")
    out = []
    t0 = time.perf_counter()
    for e in events:
        if e.x is None or e.y is None:
            continue
        feats = " ".join(f"{j}:{v:.6g}" for j, v in enumerate(e.x.tolist()) if v)
        label = float(e.y) if target_range else (1 if e.y else -1)
        ex = vw.parse(f"{label} |t {e.task.replace(' ', '_').replace(':', '_')} |f {feats}")
        p = vw.predict(ex)
        out.append(_regression_score(p, float(e.y), *target_range) if target_range else _score(p, int(e.y)))
        vw.learn(ex)
        vw.finish_example(ex)
    vw.finish()
    return np.array(out).reshape(-1, 2), time.perf_counter() - t0


def lifelong_in_river(events: list[Event]) -> tuple[float, float]:
    """``LifelongClassifier`` in River's ``progressive_val_score`` (features named ``x0``, ``x1``, ...: no two
    share a bucket of the default ``dim``); its error and the seconds the pass took."""
    from river import evaluate, metrics

    from lifelong.estimators import LifelongClassifier

    rows = [
        ({"task": e.task, **{f"x{j}": v for j, v in enumerate(e.x.tolist())}}, bool(e.y))
        for e in events
        if e.x is not None and e.y is not None
    ]
    t0 = time.perf_counter()
    accuracy = evaluate.progressive_val_score(rows, LifelongClassifier(by="task"), metrics.Accuracy())
    return 1.0 - accuracy.get(), time.perf_counter() - t0


def bayes_personal(events: list[Event], seed: int) -> np.ndarray:
    """The learner no method can do much better than on average on ``personal`` streams: each user's Bayesian
    logistic regression (the engine's EKF steps, ``ekf.forward``) whose prior is the generator's own
    distribution of users (the true common weights and spread, ``generate.personal_prior``). Its 0/1 error per
    labelled event."""
    import torch

    from lifelong.core.learners import ekf
    from lifelong.tools.generate import personal_prior

    labelled = [e for e in events if e.x is not None and e.y is not None]
    users = {name: i for i, name in enumerate(dict.fromkeys(e.task for e in labelled))}
    mu0, s0 = (torch.as_tensor(a) for a in personal_prior(seed=seed))
    mu = mu0.expand(len(users), 1, -1).clone()
    s = s0.expand(len(users), 1, -1, -1).clone()
    out = []
    for e in labelled:
        z = torch.as_tensor(np.append(e.x, 1.0)).unsqueeze(0)
        raw = ekf.forward(mu, s, torch.tensor([users[e.task]]), z, torch.tensor([int(e.y)]), "binary")
        out.append(float((float(raw[0, 0]) > 0) != bool(e.y)))  # the probit correction never moves the sign
    return np.array(out)


def early_error(events: list[Event], errors: np.ndarray, first_n: int = 20) -> float:
    """Error over each task's first ``first_n`` labelled events (errors in labelled-event order)."""
    seen: dict[str, int] = {}
    mask = []
    for e in events:
        if e.x is None or e.y is None:
            continue
        k = seen.get(e.task, 0)
        seen[e.task] = k + 1
        mask.append(k < first_n)
    return float(errors[np.array(mask, bool)].mean())
