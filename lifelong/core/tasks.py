"""The engine's resident tasks as one table: each task's row, its mixture and statistics columns (named
tensors, one row per task) and, host side, what admission to and eviction from the task store go by.

Rows ``0 .. len - 1`` hold the resident tasks. A row freed by ``release`` (its task went to the store) takes a
task coming in; ``remove`` closes the holes tasks leave for good, so rows stay contiguous. The learners' and
basis codes' per-task columns live with the learners and the KB; ``Residency.columns`` lists every column.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# The per-task statistics columns (``TaskTable.cols["stats"]``).
STATS = (
    "loss",
    "loss_local",
    "loss_kb",
    "errors",
    "errors_local",
    "errors_kb",
    "early_errors",
    "early_errors_local",
    "early_n",
)
STAT = {name: i for i, name in enumerate(STATS)}  # column of each statistic
# The top level's experts (columns of ``L_top``, ``in_top``): the task's own learner, the KB level, and the live
# shared level's two learners (``shared.py``).
TOP = ("local", "kb", "pooled", "mixed")


def grown(n: int, cap: int, limit: int) -> int:
    """The rows a per-task table of ``cap`` rows grows to so as to hold ``n``: twice as many, but not past
    ``limit`` (``engine.max_resident_tasks``) while ``n`` is within it: memory follows the configuration."""
    return max(n, 16, 2 * cap if n > limit else min(2 * cap, limit))


def grow_rows(old: torch.Tensor, size: int, fill: float | None = None) -> torch.Tensor:
    """``old``'s rows in a tensor of ``size`` rows, the rest ``fill`` (None: left unset, for the caller to set
    up before use). Not zeros first: the old and the new table are not both whole in memory at a doubling."""
    new = old.new_empty((size, *old.shape[1:]))
    new[: len(old)] = old
    if fill is not None:
        new[len(old) :] = fill
    return new


def assign(table: torch.Tensor, rows: Any, value: Any) -> None:
    """``table[rows] = value``; for a CPU table in numpy (torch's cost per assignment of a scalar to a few rows is
    several times numpy's, ~4 µs against ~1 with the view taken; a tensor's rows gain nothing: its view costs
    as much)."""
    if table.device.type != "cpu":
        table[rows] = value
        return
    if isinstance(rows, tuple):
        rows = tuple(r.numpy() if isinstance(r, torch.Tensor) else r for r in rows)
    elif isinstance(rows, torch.Tensor):
        rows = rows.numpy()
    table.numpy()[rows] = value.numpy() if isinstance(value, torch.Tensor) else value


def smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of ``k`` (0 < k < len) smallest of ``values``, integers (batch numbers): counted value by value
    where they span few values (a few passes, ~5x faster than a partition over 100,000 rows), else partitioned."""
    low = int(values.min())
    if int(values.max()) - low > 4 * len(values):
        return np.argpartition(values, k - 1)[:k]
    kth = low + int(np.searchsorted(np.cumsum(np.bincount(values - low)), k))  # the k-th smallest value
    below = np.flatnonzero(values < kth)
    return np.concatenate([below, np.flatnonzero(values == kth)[: k - len(below)]])


class TaskTable:
    """Resident tasks: ``names[row]``, ``index[name]``, the columns ``cols`` (``empty``) and per row, host side:
    ``counts`` (labelled events learned), ``used`` (the ``batch`` that last used it: the least recently used
    leave first), ``in_store`` (the task store holds the task), ``dirty`` (changed since it was last written)."""

    def __init__(self, n_experts: int, deviation: tuple[int, int], device: torch.device, limit: int, shared: bool):
        self.n_experts, self.deviation, self.device, self.limit = n_experts, deviation, device, limit
        self.shared = shared  # the shared level's experts take part in new tasks' top mixtures
        self.drift = 0.0  # how far the top level's prior has moved so far (``Mixtures.learn_prior``)
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.cols = self.empty(0)
        self.counts = np.zeros(16, np.int64)
        self.used = np.zeros(16, np.int64)
        self.in_store = np.zeros(16, np.bool_)
        self.dirty = np.zeros(16, np.bool_)
        self.batch = 0  # the batch being processed (``used``)
        self.high = 0  # rows ever set up: those at or past ``len`` (after ``remove``) still hold old values

    def empty(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` rows of every column, zeros (what ``start`` sets up)."""
        dev, k, f64 = self.device, self.n_experts, torch.float64
        return {
            "L_top": torch.zeros(n, len(TOP), dtype=f64, device=dev),  # cumulative losses of the top's experts
            "in_top": torch.zeros(n, len(TOP), dtype=torch.bool, device=dev),
            "n_top": torch.zeros(n, dtype=torch.long, device=dev),
            "L_kb": torch.zeros(n, k, dtype=f64, device=dev),  # of the KB experts: the basis, then each member
            "in_kb": torch.zeros(n, k, dtype=torch.bool, device=dev),
            "n_kb": torch.zeros(n, dtype=torch.long, device=dev),
            "stats": torch.zeros(n, len(STATS), dtype=f64, device=dev),
            # the data's part of the mixed-effects deviation's posterior (``shared.py``): precision, natural mean
            "me_prec": torch.zeros(n, *self.deviation, dtype=f64, device=dev),
            "me_nat": torch.zeros(n, *self.deviation, dtype=f64, device=dev),
            "drift_at": torch.zeros(n, dtype=f64, device=dev),  # the top prior's drift when the task started
            "kb_seen": torch.zeros(n, dtype=torch.long, device=dev),  # KB log position last met (``KbEntry.meet``)
            "code_at": torch.zeros(n, dtype=torch.long, device=dev),  # the basis its code is in (``basis_at``)
        }

    def start(self, cols: dict[str, torch.Tensor], rows: slice | int | torch.Tensor, basis_at: int) -> None:
        """New tasks' rows (zeros): the local level (and the shared level's learners) in the top mixture, the
        code in basis ``basis_at``, the top prior's drift so far; KB experts join when the task next meets the
        KB."""
        assign(cols["in_top"], (rows, 0), True)
        if self.shared:
            assign(cols["in_top"], (rows, slice(2, None)), True)
        assign(cols["n_top"], rows, 3 if self.shared else 1)
        assign(cols["code_at"], rows, basis_at)
        assign(cols["drift_at"], rows, self.drift)

    def join_shared(self, cols: dict[str, torch.Tensor], rows: slice | torch.Tensor) -> None:
        """Tasks ``rows`` of ``cols`` that learned before the shared level existed (an older checkpoint or task
        store): its learners join their top mixtures now, at the mixture's loss so far (sleeping experts)."""
        if self.shared:
            cols["L_top"][rows, 2:] = cols["stats"][rows, STAT["loss"], None]
            cols["in_top"][rows, 2:] = True
            cols["n_top"][rows] += len(TOP) - 2

    def __len__(self) -> int:
        return len(self.names)

    def view(self) -> dict[str, torch.Tensor]:
        """The resident rows of every column."""
        n = len(self.names)
        return {k: v[:n] for k, v in self.cols.items()}

    def rows(self, names: list[str]) -> np.ndarray:
        """The row of each of ``names`` (all resident)."""
        return np.fromiter(map(self.index.__getitem__, names), np.int64, len(names))

    def add(self, names: list[str], free: list[int]) -> list[int]:
        """Rows for tasks ``names`` (none resident), in order: rows freed by ``release`` first, taken from the end
        of ``free`` (and removed from it), then new rows at the end (columns grow, zeros). A row's host values
        start over: nothing learned, used in this batch, not stored, changed."""
        k = min(len(free), len(names))
        reused = free[len(free) - k :][::-1]
        del free[len(free) - k :]
        first = len(self.names)
        rows = reused + list(range(first, first + len(names) - k))
        for row, name in zip(reused, names, strict=False):
            self.names[row] = name
        self.names.extend(names[k:])
        self.index.update(zip(names, rows, strict=True))
        n = len(self.names)
        if n > len(self.counts):
            grow = grown(n, len(self.counts), self.limit)
            self.counts, self.used, self.in_store, self.dirty = (
                np.concatenate([a, np.zeros(grow - len(a), a.dtype)])
                for a in (self.counts, self.used, self.in_store, self.dirty)
            )
        cap = self.cols["stats"].shape[0]
        if n > cap:
            size = grown(n, cap, self.limit)
            self.cols = {key: grow_rows(old, size, 0) for key, old in self.cols.items()}
        at = np.array(rows, np.int64)
        self.counts[at], self.used[at], self.in_store[at], self.dirty[at] = 0, self.batch, False, True
        return rows

    def least_used(self, k: int) -> np.ndarray:
        """Up to ``k`` rows not used in this batch, the least recently used."""
        n = len(self.names)
        if 0 < k < n:  # the k least recently used, if none of them is used in this batch: one pass
            rows = smallest(self.used[:n], k)
            if self.used[rows].max() < self.batch:
                return rows
        idle = np.flatnonzero(self.used[:n] < self.batch)
        if k <= 0 or len(idle) <= k:
            return idle if k > 0 else idle[:0]
        return np.asarray(idle[smallest(self.used[idle], k)], np.int64)

    def release(self, rows: np.ndarray) -> None:
        """Tasks ``rows`` are no longer resident: their rows wait for ``add`` to give them to tasks coming in."""
        for name in map(self.names.__getitem__, rows.tolist()):
            del self.index[name]

    def remove(self, rows: list[int]) -> tuple[list[int], list[int]]:
        """Tasks ``rows`` (increasing) are gone: the last resident tasks move into the rows they leave. Returns
        the rows moved (``src``) and where to (``dst``): the caller moves every other per-task column alike."""
        n, m, hole = len(self.names), len(rows), set(rows)
        src = [r for r in range(n - m, n) if r not in hole]
        dst = [h for h in rows if h < n - m]
        for a in (self.counts, self.used, self.in_store, self.dirty):
            a[dst] = a[src]
        for h in rows:
            del self.index[self.names[h]]
        for s, d in zip(src, dst, strict=True):
            self.names[d] = self.names[s]
            self.index[self.names[d]] = d
        del self.names[n - m :]
        return src, dst

    def load(self, names: list[str], cols: dict[str, torch.Tensor], counts: np.ndarray) -> None:
        """Tasks ``names`` in rows ``0 ..``, with the columns in ``cols`` (one missing stays zeros) and the labelled
        counts ``counts``; every row counts as changed."""
        n, size = len(names), max(16, len(names))
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.cols = self.empty(size)
        for k, v in cols.items():
            # a checkpoint from before the shared level held two top-level columns: theirs go first
            target = self.cols[k][:n] if v.dim() == 1 else self.cols[k][:n, ..., : v.shape[-1]]
            target.copy_(v.to(self.device))
        self.counts, self.used = np.zeros(size, np.int64), np.zeros(size, np.int64)
        self.in_store, self.dirty = np.zeros(size, np.bool_), np.ones(size, np.bool_)
        self.counts[:n] = counts
        self.high = n
