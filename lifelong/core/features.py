"""Per-task feature scaling: every value a learner sees lies within ±``LIMIT``, whatever was sent.

Each task keeps the largest magnitude seen so far of each of its features (its own events only, the current
one included). A feature whose magnitude has exceeded ``LIMIT`` is divided by ``peak / LIMIT``; smaller
features pass unchanged, so standardised or small features are learned exactly as sent, while money
amounts, counts or timestamps need no preprocessing. The peaks are updated event by event in arrival order
(so a batched run scales exactly as an event-by-event run) and are part of each task's state; no value of
one task changes another task's scale.
"""

from __future__ import annotations

import numba
import numpy as np

LIMIT = 10.0


@numba.njit(cache=True)
def _scale(peak: np.ndarray, rows: np.ndarray, x: np.ndarray, limit: float) -> None:
    for i in range(x.shape[0]):
        r = rows[i]
        for f in range(x.shape[1]):
            a = abs(x[i, f])
            if a > peak[r, f]:
                peak[r, f] = a
            if peak[r, f] > limit:
                x[i, f] *= limit / peak[r, f]


def scale(peak: np.ndarray, rows: np.ndarray, x: np.ndarray) -> None:
    """Scale ``x [n, d]`` (float64, in arrival order) in place; row i belongs to the task whose peaks are
    ``peak[rows[i]]``, updated in place.

    >>> peak = np.zeros((1, 2))
    >>> x = np.array([[3e6, 1.0], [1.5e6, -2.0]])
    >>> scale(peak, np.array([0, 0]), x)
    >>> x.tolist(), peak.tolist()
    ([[10.0, 1.0], [5.0, -2.0]], [[3000000.0, 2.0]])
    """
    _scale(peak, rows.astype(np.int64), x, LIMIT)


def peek(peak: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``x [n, d]`` scaled as ``scale`` would scale each row if it came next (rows independent, nothing updated).

    >>> peek(np.array([[3e6, 2.0]]), np.array([[1.5e6, -2.0]])).tolist()
    [[5.0, -2.0]]
    """
    top = np.maximum(peak, np.abs(x))
    return x * np.where(top > LIMIT, LIMIT / np.where(top > LIMIT, top, 1.0), 1.0)
