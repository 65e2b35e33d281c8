"""The tasks active since the last estimate of the shared priors, each with its latest columns.

The empirical-Bayes estimates across tasks (the mixed-effects prior Σ, ``shared.py``; the top level's prior over
its experts, ``mixtures.py``) read the tasks that learned since the last estimate, each as it was after its
last event: what they read then depends neither on how the stream was cut into batches nor on which tasks
were resident (a task may have gone to the task store since), and their cost follows the events in between.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

KEYS = ("me_prec", "me_nat", "L_top", "in_top")  # the task-table columns the estimates read


class Recent:
    """Rows of the tasks that learned since the last ``take`` (a later row of a task replaces its earlier one)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, names: list[str], cols: dict[str, torch.Tensor], rows: np.ndarray) -> None:
        """Tasks ``names`` (rows ``rows`` of the table ``cols``) as they are now."""
        if not len(rows):
            return
        self.names.extend(names)
        if cols["L_top"].device.type == "cpu":  # numpy's fancy indexing: several times cheaper on small batches
            self.parts.append({k: cols[k].numpy()[rows] for k in KEYS})
        else:
            at = torch.as_tensor(rows, device=cols["L_top"].device)
            self.parts.append({k: cols[k][at].cpu().numpy() for k in KEYS})

    def take(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """Each task's latest row (columns ``KEYS``) and the tasks' names; nothing is held any more."""
        if not self.parts:
            return [], {}
        last = dict(zip(self.names, range(len(self.names)), strict=True))  # the last row of each name
        names = sorted(last)  # by name, not by row: sums over tasks must not depend on where tasks were
        keep = np.fromiter(map(last.__getitem__, names), np.int64, len(names))
        out = {k: np.concatenate([p[k] for p in self.parts])[keep] for k in KEYS}
        self.names, self.parts = [], []
        return names, out

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata for a checkpoint (one row per task)."""
        names, rows = self.take()
        if rows:
            self.add_rows(names, rows)
        return {f"recent.{k}": torch.from_numpy(v) for k, v in rows.items()}, {"recent": names}

    def add_rows(self, names: list[str], rows: dict[str, np.ndarray]) -> None:
        """Rows given as arrays (``take``'s output for ``names``)."""
        self.names.extend(names)
        self.parts.append(rows)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what ``state`` gave (an older checkpoint: nothing recent)."""
        self.names, self.parts = [], []
        if meta.get("recent"):
            self.add_rows(list(meta["recent"]), {k: tensors[f"recent.{k}"].numpy() for k in KEYS})
