"""KB staging: snapshots of task learners wait here for the next publication, with the population member (the
shared level's pooled learner, ``shared.py``) whose mean is also the prior new tasks start from.

Publication happens every ``publish_every`` engine events, a count that does not depend on how the stream is
cut into batches: ``ready`` gives each task's latest finite snapshot in arrival order, plus the population
member. Where the members go (straight into this engine's KB, or out to the knowledge log for every replica)
is the engine's choice (``Engine.publisher``), not this module's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lifelong.core.knowledge import Staged
from lifelong.core.learners.base import Learners
from lifelong.core.mixtures import POPULATION
from lifelong.core.shared import SharedLevel


class Staging:
    """Snapshots waiting for publication; counts in ``counters`` (the engine's). ``shared``: the shared level,
    whose pooled learner is published as a KB member and whose mean new tasks start from (None: no population)."""

    def __init__(self, learners: Learners, shared: SharedLevel | None, counters: dict[str, int]):
        self.learners = learners
        self.shared = shared
        self.counters = counters
        self.staged: list[Staged] = []

    def stage(self, task: int, name: str, learned: int, seq: int, store: Any) -> None:
        """Stage a snapshot (a one-slot member store) of task ``task`` taken right after its trigger."""
        if learned == 0:
            return
        self.staged.append(Staged(task, name, learned, seq, store))
        self.counters["snapshots"] += 1

    def ready(self, events_seen: int) -> list[Staged]:
        """What this publication publishes: each task's latest snapshot, in the order of the tasks' first
        triggers (arrival order, whatever the batching; an earlier snapshot of the same task would be replaced
        in its slot anyway), less those taken while their task was non-finite; and the population member, whose
        mean new tasks start from (``start_new``)."""
        if self.shared is not None and (mu := self.start_new()) is not None:
            member = self.learners.members_from_ekf(mu[None])[0]
            self.staged.append(Staged(-1, POPULATION, self.shared.learned, events_seen, member))
        if not self.staged:
            return []
        latest: dict[str, Staged] = {}  # by name: a task's row may hold another task by now (``_evict``)
        for st in sorted(self.staged, key=lambda st: st.seq):
            first = latest.get(st.task_name)
            latest[st.task_name] = (
                st if first is None else Staged(st.task, st.task_name, st.learned, first.seq, st.store)
            )
        self.staged = []
        snaps = list(latest.values())
        vectors = self.learners.member_vectors([st.store for st in snaps])
        finite = np.isfinite(vectors.cpu().numpy()).all(1)
        if not finite.all():  # a snapshot taken while its task was non-finite (reset since) never publishes
            self.counters["snapshots_not_finite"] += int((~finite).sum())
            return [st for st, ok in zip(snaps, finite.tolist(), strict=True) if ok]
        return snaps

    def start_new(self) -> np.ndarray | None:
        """New tasks' learners start from the pooled learner's mean as it is now (at each publication and each
        estimate: counts that do not depend on batching); that mean, or None before the pooled learner learned."""
        if self.shared is None or not self.shared.learned:
            return None
        mu = self.shared.w.copy()
        self.learners.prior_mu = torch.as_tensor(mu, dtype=self.learners.dtype, device=self.learners.device)
        return mu

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON metadata for a checkpoint: the staged snapshots and the new tasks' prior mean."""
        tensors: dict[str, torch.Tensor] = {}
        if self.learners.prior_mu is not None:
            tensors["population.prior_mu"] = self.learners.prior_mu.cpu()
        for i, st in enumerate(self.staged):
            for k, v in self.learners.store_state(st.store).items():
                tensors[f"staged.{i}.{k}"] = v
        return tensors, {"staged": [[s.task, s.task_name, s.learned, s.seq] for s in self.staged]}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what ``state`` returned."""
        if "population.prior_mu" in tensors:
            self.learners.prior_mu = tensors["population.prior_mu"].to(self.learners.device)
        self.staged = []
        for i, (task, name, learned, seq) in enumerate(meta["staged"]):
            prefix = f"staged.{i}."
            store = self.learners.load_store({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            self.staged.append(Staged(int(task), name, int(learned), int(seq), store))
