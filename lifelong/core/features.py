"""Feature standardisation shared by every task: a value means the same to every task's learner.

One running, outlier-robust standardiser per feature over every event of every task, in arrival order (so a
batched run scales exactly as an event-by-event run): a count, a running mean and a running mean absolute
deviation, and the largest magnitude. A feature whose values have all lain within ±``LIMIT`` (indicators,
one-hot categories, features already standardised) is shown as sent; once one has gone beyond, the feature
is shown as ``(x - mean) / scale`` clipped to ±``LIMIT``, where ``scale`` is the mean absolute deviation times
sqrt(π/2) (the standard deviation, for normal data), the statistics updated with the value first. (Centring
and scaling an indicator would turn a rare category into a value of ±LIMIT, which a task's learner with a
handful of events over-reads.) After ``WARMUP`` values of a feature, a value beyond ``LIMIT`` scales (and
beyond ``LIMIT`` itself) from the mean enters the statistics at that bound (winsorised), so one value, however
large (1e300), moves them at most as much as an ordinary value at the bound; and every value a learner sees
lies in [-LIMIT, LIMIT].
Money amounts, counts, years and test scores need no preprocessing, and what one task learns about a feature
carries to the next (a per-task scale would give the same raw value a different meaning in each task).

The statistics are engine state (checkpointed; in scale-out each replica keeps its own: a replica sees a
share of the tasks, whose features follow the same distribution, and a shared copy would need a merge rule
and a round trip through Kafka before each batch).
"""

from __future__ import annotations

import math

import numba
import numpy as np

LIMIT = 10.0  # in scales (standard deviations): the largest value a learner sees, and the winsorising bound
WARMUP = 20  # values of a feature before its statistics are robust enough to winsorise against
_SCALE = math.sqrt(math.pi / 2)  # standard deviation / mean absolute deviation, for normal data


@numba.njit(cache=True, error_model="numpy")
def _standardise(stats: np.ndarray, x: np.ndarray, update: bool) -> None:
    """Rows of ``x`` in order; ``stats`` = [count, mean, mean absolute deviation, largest magnitude] per
    feature (of the winsorised values). Without ``update``, each row is scaled as if it came next and ``stats``
    stay as they are."""
    for i in range(x.shape[0]):
        for f in range(x.shape[1]):
            n, mean, dev, peak = stats[0, f], stats[1, f], stats[2, f], stats[3, f]
            v = x[i, f]
            w = v
            if n >= WARMUP:  # within LIMIT of the mean, a value is never an outlier, even of a constant feature
                bound = LIMIT * max(_SCALE * dev, 1.0)
                w = min(max(v, mean - bound), mean + bound)
            n += 1.0
            mean = mean + w / n - mean / n  # not (w - mean) / n: that difference may overflow
            dev = dev + abs(w - mean) / n - dev / n
            if w == v:  # a winsorised value never turns a feature of small values into a standardised one
                peak = max(peak, abs(v))
            scale = _SCALE * dev
            if peak > LIMIT:
                v = (v - mean) / scale if scale > 0.0 else 0.0
            x[i, f] = min(max(v, -LIMIT), LIMIT)
            if update:
                stats[0, f], stats[1, f], stats[2, f], stats[3, f] = n, mean, dev, peak


class Standardiser:
    """The shared statistics and the two ways to apply them.

    >>> s = Standardiser(2)
    >>> x = np.array([[0.0, 300.0], [1.0, 500.0], [0.0, 400.0]])
    >>> s.scale(x)
    >>> x.round(3).tolist()  # an indicator as sent; test scores (beyond ±LIMIT) standardised
    [[0.0, 0.0], [1.0, 1.596], [0.0, 0.0]]
    >>> s = Standardiser(1)
    >>> s.scale(np.arange(30.0).reshape(-1, 1) % 3)  # 0, 1, 2, 0, 1, 2, ...
    >>> huge = np.array([[1e300]])
    >>> s.scale(huge)
    >>> huge.tolist(), s.stats[1].round(2).tolist()  # shown at the limit; the mean moved as by a value at the bound
    ([[10.0]], [1.32])
    """

    def __init__(self, dim: int):
        self.stats = np.zeros((4, dim), np.float64)

    def scale(self, x: np.ndarray) -> None:
        """Standardise rows of ``x [n, d]`` (float64, arrival order) in place; the statistics advance."""
        _standardise(self.stats, x, True)

    def peek(self, x: np.ndarray) -> np.ndarray:
        """``x`` standardised as ``scale`` would standardise each row if it came next (nothing moves)."""
        out = np.array(x, np.float64)
        _standardise(self.stats, out, False)
        return out
