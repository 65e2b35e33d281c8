"""Lazy KB entry: a KB expert that entered (a published member, a refreshed basis) joins a task's mixtures when
the task next meets the KB, not at the publication: a publication never sweeps over every task, and entry gives
what it would have given at the publication, since the task's losses have not moved in between."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lifelong.core.hedge import enter_experts
from lifelong.core.knowledge import KnowledgeBase
from lifelong.core.tasks import STAT, TaskTable


class KbEntry:
    """Brings tasks' mixture tables and basis codes up to the KB as it is now."""

    def __init__(self, tasks: TaskTable, kb: KnowledgeBase):
        self.tasks, self.kb = tasks, kb

    def meet(
        self,
        rows: np.ndarray,
        tables: dict[str, torch.Tensor] | None = None,
        since: Any = None,
        names: dict[str, int] | None = None,
    ) -> None:
        """KB experts that entered since tasks ``rows`` (increasing) of ``tables`` last met the KB join their
        mixtures (``hedge.enter_experts``). A publication never sweeps over every task: a task catches up when
        it next meets the KB, where entry gives what it would have given at the publication (its losses have
        not moved since). ``since``: the log position each expert entered at, for a task moved from another KB;
        ``names``: the row of each task in ``tables`` other than the engine's own (own members stay out)."""
        kb, dev = self.kb, self.kb.device
        cols = self.tasks.cols if tables is None else tables
        if not len(rows) or kb.applied == 0:
            return
        keys = ("kb_seen", "L_kb", "in_kb", "n_kb", "L_top", "in_top", "n_top", "stats")
        on_cpu = dev.type == "cpu"
        idx = torch.as_tensor(rows, device=dev)
        a = {k: cols[k].numpy() if on_cpu else cols[k][idx].cpu().numpy() for k in keys}
        own = np.full(1 + kb.capacity, -1, np.int64)  # each expert's own task here (its row in ``a``), or -1
        lookup = self.tasks.index if tables is None else names
        if lookup is not None:
            for s, src in enumerate(kb.source):
                i = lookup.get(src, -1) if src is not None else -1
                j = i if on_cpu else int(np.searchsorted(rows, i))
                own[1 + s] = j if i >= 0 and (on_cpu or (j < len(rows) and rows[j] == i)) else -1
        enter_experts(
            rows if on_cpu else np.arange(len(rows)),
            a["kb_seen"],
            np.array([kb.basis_since, *kb.entered], np.int64) if since is None else since,
            own,
            kb.applied,
            a["L_kb"],
            a["in_kb"],
            a["n_kb"],
            a["L_top"],
            a["in_top"],
            a["n_top"],
            a["stats"][:, STAT["loss_kb"]],
            a["stats"][:, STAT["loss"]],
        )
        if not on_cpu:
            for k in keys:
                cols[k][idx] = torch.as_tensor(a[k], device=dev)

    def carry_codes(self, rows: np.ndarray) -> None:
        """Tasks ``rows``' basis codes, learned in an earlier basis, carried into the current one
        (``KnowledgeBase.carried``): a basis refresh never sweeps over every task either."""
        at = self.tasks.cols["code_at"][torch.as_tensor(rows, device=self.kb.device)].cpu().numpy()
        stale = at != self.kb.basis_at
        if stale.any():
            moved = torch.as_tensor(rows[stale], device=self.kb.device)
            self.kb.mu[moved], self.kb.S[moved] = self.kb.carried(moved, at[stale])
            self.tasks.cols["code_at"][moved] = self.kb.basis_at
