"""A segment's plan: per event, the bookkeeping every later step of the segment reads (which prediction a label
joins, its task's labelled count before it, its task's row, whether a KB snapshot follows it)."""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


@dataclass
class Plan:
    """Per event of a segment: its task's row, the row of the prediction a label joins (-1: stored earlier), the task's
    labelled count before it, its task's row among the segment's tasks, and whether a KB snapshot follows it."""

    tasks: np.ndarray  # the event's task's row
    ref: np.ndarray
    n_before: np.ndarray
    group: np.ndarray  # the event's task's row among the segment's tasks ``touched`` (0 .. len(touched) - 1)
    touched: np.ndarray  # the segment's tasks, in increasing order
    trigger: np.ndarray


@numba.njit(cache=True)
def count_labelled(
    tasks: np.ndarray,
    labelled: np.ndarray,
    control: np.ndarray,
    counts: np.ndarray,
    every: int,
    at: np.ndarray,
    n_before: np.ndarray,
    trigger: np.ndarray,
) -> None:
    """Each event's task's labelled count before it (``counts`` advance), and whether a KB snapshot follows
    it: a control, or a labelled event that brings its task's count to a multiple of ``every`` or into ``at``."""
    for j in range(len(tasks)):
        c = counts[tasks[j]]
        n_before[j] = c
        trigger[j] = control[j]
        if labelled[j]:
            c += 1
            counts[tasks[j]] = c
            trigger[j] = every > 0 and c % every == 0
            for a in at:
                trigger[j] = trigger[j] or c == a
