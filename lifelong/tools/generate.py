"""Streams for evaluation and demos: synthetic related/unrelated tasks and digit pairs, as schema v1 events.

Tasks arrive one after another and overlap: task k's events come in blocks spread over a window that
starts at k, so several tasks are active at once, each recurs several times, and new tasks keep arriving
while the knowledge base grows (the lifelong setting). A ``control: end`` event follows a task's last
block, except in the two shapes of many short tasks that real systems see most, which never end:
``short`` (3,000 related tasks of 5-40 events) and ``personal`` (20,000 users of 1-6 events around one
common concept).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lifelong.errors import require

KINDS = ("related", "unrelated", "digits", "short", "personal")
DEFAULT_TASKS = {"short": 3000, "personal": 20000}
LENGTHS = {"short": (5, 40), "personal": (1, 6)}  # events per task, uniform in this range
PERSONAL_SD = 0.75  # personal: each user's deviation from the common weights, over all features
BIAS_SD = 0.5  # each task's bias


def _interleave(
    tasks: list[tuple[str, np.ndarray, np.ndarray]],
    block: int,
    spread: float,
    rng: np.random.Generator,
    ends: bool = True,
) -> Iterator[dict[str, Any]]:
    keys, blocks = [], []
    for k, (name, x, y) in enumerate(tasks):
        n_blocks = max(1, -(-len(y) // block))
        for j in range(n_blocks):
            keys.append(k + (j + rng.random()) * spread)
            blocks.append((name, x[j * block : (j + 1) * block], y[j * block : (j + 1) * block], j, n_blocks))
    ts = 1_700_000_000.0
    for i in np.argsort(keys, kind="stable"):
        name, x, y, j, n_blocks = blocks[i]
        for r in range(len(y)):
            ts += 0.01
            yield {
                "task": name,
                "id": f"{name}-{j * block + r}",
                "x": [round(float(v), 5) for v in x[r]],
                "y": int(y[r]),
                "ts": round(ts, 2),
            }
        if ends and j == n_blocks - 1:
            yield {"task": name, "control": "end", "ts": round(ts, 2)}


def synthetic(kind: str, n_tasks: int, events: int, dim: int, rank: int, seed: int) -> list[tuple[str, Any, Any]]:
    """Logistic tasks. ``related`` and ``short``: weights ``m + U c`` share a mean and a rank-``rank``
    subspace; ``unrelated``: independent weights of the same scale; ``personal``: one common weight vector
    plus a small personal deviation. ``short`` and ``personal`` tasks have ``LENGTHS`` events, not ``events``."""
    rng = np.random.default_rng(seed)
    mean, basis, common = _concepts(kind, dim, rank, rng)
    tasks = []
    for k in range(n_tasks):
        if kind in ("related", "short"):
            w = mean + basis @ rng.normal(0, 1, rank)
        elif kind == "personal":
            w = common + rng.normal(0, 1, dim) / np.sqrt(dim) * PERSONAL_SD
        else:
            w = rng.normal(0, 1, dim) / np.sqrt(dim) * np.sqrt(1.5**2 + rank * 2.5**2)
        b = rng.normal(0, BIAS_SD)
        n = int(rng.integers(LENGTHS[kind][0], LENGTHS[kind][1] + 1)) if kind in LENGTHS else events
        x = rng.normal(0, 1, (n, dim))
        y = (rng.random(n) < 1 / (1 + np.exp(-(x @ w + b)))).astype(int)
        tasks.append((f"{kind}-{k:05d}", x, y))
    return tasks


def _concepts(kind: str, dim: int, rank: int, rng: np.random.Generator) -> tuple[Any, Any, Any]:
    """What a stream's tasks share: a mean, a subspace, and (personal) the common weights."""
    mean = rng.normal(0, 1, dim) / np.sqrt(dim) * 1.5
    basis = rng.normal(0, 1, (dim, rank)) / np.sqrt(dim) * 2.5
    common = rng.normal(0, 1, dim) / np.sqrt(dim) * 3.0 if kind == "personal" else mean
    return mean, basis, common


def personal_prior(dim: int = 20, rank: int = 3, seed: int = 0) -> tuple[Any, Any]:
    """Mean and covariance of the weights (bias last) ``personal`` users are drawn from: the truth a learner
    can at best know in advance (``bench/peers.py`` plays the Bayes learner that knows it)."""
    _, _, common = _concepts("personal", dim, rank, np.random.default_rng(seed))
    return np.append(common, 0.0), np.diag([PERSONAL_SD**2 / dim] * dim + [BIAS_SD**2])


def digit_pairs(seed: int) -> list[tuple[str, Any, Any]]:
    """One binary task per pair of digits (i < j) from scikit-learn's bundled digits; y = 1 for digit j."""
    data = require("sklearn.datasets", "data", "lifelong generate --kind digits").load_digits()
    rng = np.random.default_rng(seed)
    x_all, y_all = data.data / 16.0, data.target
    tasks = []
    pairs = [(i, j) for i in range(10) for j in range(i + 1, 10)]
    for p in rng.permutation(len(pairs)):
        i, j = pairs[p]
        sel = np.flatnonzero((y_all == i) | (y_all == j))
        sel = rng.permutation(sel)
        tasks.append((f"digits-{i}-{j}", x_all[sel], (y_all[sel] == j).astype(int)))
    return tasks


def stream(
    kind: str,
    n_tasks: int | None = None,
    events: int = 100,
    dim: int = 20,
    rank: int = 3,
    block: int = 20,
    seed: int = 0,
    spread: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Events of one generated stream, in order. Task k's blocks are spread over ``[k, k + spread x blocks]``,
    so about ``spread x blocks per task`` tasks are active at once.

    >>> evs = list(stream("related", n_tasks=3, events=10, dim=4, block=5))
    >>> len([e for e in evs if "y" in e]), len([e for e in evs if e.get("control") == "end"])
    (30, 3)
    >>> users = list(stream("personal", n_tasks=100, dim=4))
    >>> len({e["task"] for e in users}), 100 <= len(users) <= 600, any("control" in e for e in users)
    (100, True, False)
    """
    if kind not in KINDS:
        raise ValueError(f"unknown stream kind {kind!r} (known: {', '.join(KINDS)})")
    if kind == "digits":
        tasks = digit_pairs(seed)
        if n_tasks:
            tasks = tasks[:n_tasks]
    else:
        tasks = synthetic(kind, n_tasks or DEFAULT_TASKS.get(kind, 300), events, dim, rank, seed)
    if kind in LENGTHS:  # many short tasks, never ended: blocks of up to 5 events, ~40 tasks active at once
        return _interleave(tasks, 5, 5.0 if spread is None else spread, np.random.default_rng(seed + 1), ends=False)
    if spread is None:
        spread = 8.0 if kind != "digits" else 2.0
    return _interleave(tasks, block, spread, np.random.default_rng(seed + 1))


def write_jsonl(events: Iterator[dict[str, Any]], path: str | Path) -> int:
    """Write events to ``path``, one JSON object per line; the count written."""
    n = 0
    with open(path, "w") as f:
        for e in events:
            f.write(json.dumps(e, separators=(",", ":")) + "\n")
            n += 1
    return n
