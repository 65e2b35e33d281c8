"""The sequential part of a segment: each task's learner and basis code predict, then learn, event by event in
arrival order. Two strategies, one signature and the same results to float tolerance (tested):

- ``compiled``: event by event in compiled code (CPU, EKF learners);
- ``waves``: in torch, wave k holding the k-th event of each task (CUDA, AdaGrad, MLP and River learners).
  Events of different tasks are independent given the KB, so a wave is computed at once.

Each returns the raw local and basis outputs and the KB snapshots its triggers took (``Snapshot``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from lifelong.core.knowledge import KnowledgeBase
from lifelong.core.learners.base import Learners
from lifelong.core.plan import Plan


class Snapshot(NamedTuple):
    """A task's learner as a one-slot member store, taken right after its trigger: ``learned`` labelled events
    in, the trigger's row ``at`` within the segment."""

    task: int
    learned: int
    at: int
    store: Any


Step = tuple[torch.Tensor, torch.Tensor, list[Snapshot]]


def compiled(
    learners: Learners, kb: KnowledgeBase, plan: Plan, labelled: np.ndarray, x1: torch.Tensor, y: torch.Tensor
) -> Step:
    """The sequential part event by event in arrival order, compiled (CPU, EKF learners): the same steps
    as the waves without their per-wave cost."""
    # A segment ends at most in one publication, which keeps each task's latest snapshot (``Engine._publish``):
    # snapshot only each task's last trigger here, ordered by its first.
    tasks = plan.tasks
    spans: dict[int, tuple[int, int]] = {}
    for j in np.flatnonzero(plan.trigger).tolist():
        spans[int(tasks[j])] = (spans.get(int(tasks[j]), (j, j))[0], j)
    snap_row = np.full(len(tasks), -1, np.int64)
    for row, (_, last) in enumerate(spans.values()):
        snap_row[last] = row
    y_np = y.numpy()
    raw_local, snaps = learners.sequence(tasks, x1, y_np, labelled, snap_row)
    raw_basis = kb.sequence_basis(tasks, x1 @ kb.B, y_np, labelled)
    stores = learners.members_from_ekf(snaps[: len(spans)])
    snapshots = [
        Snapshot(task, int(plan.n_before[last] + labelled[last]), first, store)
        for store, (task, (first, last)) in zip(stores, spans.items(), strict=True)
    ]
    return raw_local, raw_basis, snapshots


def waves(
    learners: Learners, kb: KnowledgeBase, plan: Plan, labelled: np.ndarray, x1: torch.Tensor, y: torch.Tensor
) -> Step:
    """The sequential part in waves: wave k holds the k-th event of each task. Rows are sorted by (wave,
    labelled), so that every call takes contiguous slices."""
    tasks, dev = plan.tasks, x1.device
    n = len(tasks)
    idx = torch.as_tensor(tasks, device=dev)
    z = x1 @ kb.B
    # wave k: the k-th row of its task in the segment
    by_task = np.argsort(tasks, kind="stable")
    ranked = tasks[by_task]
    first = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    wave = np.empty(n, np.int64)
    wave[by_task] = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))
    key = wave * 2 + labelled
    order = np.argsort(key, kind="stable")
    perm = torch.as_tensor(order, device=dev)
    idx_p, x1_p, z_p, y_p = idx[perm], x1[perm], z[perm], y[perm]
    raw_local, raw_basis, snapshots = [], [], []
    cuts = [0, *(np.flatnonzero(np.diff(key[order])) + 1).tolist(), n]
    # KB snapshots are taken right after the group holding their trigger has learned.
    triggers: dict[int, list[int]] = {}
    for pos in np.flatnonzero(plan.trigger[order]).tolist():
        triggers.setdefault(int(np.searchsorted(cuts, pos, side="right")) - 1, []).append(int(order[pos]))
    is_labelled = labelled[order[cuts[:-1]]].tolist()
    for group, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        gy = y_p[a:b] if is_labelled[group] else None
        raw_local.append(learners.forward(idx_p[a:b], x1_p[a:b], gy))
        raw_basis.append(kb.forward_basis(idx_p[a:b], z_p[a:b], gy))
        for j in triggers.get(group, ()):
            store = learners.new_store(1)
            learners.write_member(store, 0, int(tasks[j]))
            snapshots.append(Snapshot(int(tasks[j]), int(plan.n_before[j] + labelled[j]), j, store))
    out_local, out_basis = torch.cat(raw_local), torch.cat(raw_basis)
    local, basis = torch.empty_like(out_local), torch.empty_like(out_basis)
    local[perm], basis[perm] = out_local, out_basis
    return local, basis, snapshots
