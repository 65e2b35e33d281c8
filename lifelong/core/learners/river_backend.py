"""River backend: any River estimator, named by dotted path in the config, as the current-task learner.

Exact and event by event, so slower than the torch backend. Members of the knowledge base are frozen
copies of task estimators. State is pickled, so it is for local checkpoints only (never load it from the
network).
"""

from __future__ import annotations

import copy
import importlib
import pickle
from typing import Any

import numpy as np
import torch

from lifelong.config import EngineConfig
from lifelong.core.hedge import smooth
from lifelong.core.learners.base import Learners
from lifelong.errors import ConfigError


def load_estimator(path: str, params: dict[str, Any]) -> Any:
    """Instantiate ``path`` (e.g. ``river.linear_model.LogisticRegression``) with ``params``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name.startswith("river"):
        raise ConfigError(f"engine.river_model: expected a river.* estimator, got {path!r}")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
        return cls(**params)
    except (ImportError, AttributeError, TypeError) as exc:
        raise ConfigError(f"engine.river_model: cannot build {path}({params}): {exc}") from None


class RiverLearners(Learners):
    """One River estimator per task."""

    def __init__(self, cfg: EngineConfig, dim: int, device: torch.device):
        super().__init__(cfg, dim, device)
        self.prototype = load_estimator(cfg.river_model, cfg.river_params)
        self.models: list[Any] = []

    def ensure(self, n_tasks: int) -> None:
        """Clone the prototype estimator for new tasks."""
        while len(self.models) < n_tasks:
            self.models.append(self.prototype.clone())

    def _one(self, model: Any, x: dict[int, float]) -> list[float]:
        if self.task == "regression":
            y = model.predict_one(x)
            return [min(max(float(y if y is not None else self.lo), self.lo), self.hi)]
        proba = model.predict_proba_one(x)
        if self.task == "binary":
            p1 = float(proba.get(True, proba.get(1, 0.5 if not proba else 0.0)))
            return [1.0 - p1, p1]
        total = sum(proba.values()) or 1.0
        return [proba.get(c, 0.0) / total if proba else 1.0 / self.n_pred for c in range(self.n_pred)]

    def _rows(self, x: torch.Tensor) -> list[dict[int, float]]:
        return [dict(enumerate(row)) for row in x.cpu().tolist()]

    def _out(self, rows: list[list[float]]) -> torch.Tensor:
        out = torch.tensor(rows, dtype=self.dtype, device=self.device)
        return out if self.task == "regression" else smooth(out)

    def forward(self, idx: torch.Tensor, x1: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions before learning; with ``y``, each row then learns its label, one event at a time."""
        rows = self._rows(x1[:, :-1])
        out = self._out([self._one(self.models[i], r) for i, r in zip(idx.tolist(), rows, strict=True)])
        if y is not None:
            for i, row, target in zip(idx.tolist(), rows, y.tolist(), strict=True):
                label = (
                    bool(target) if self.task == "binary" else (int(target) if self.task == "multiclass" else target)
                )
                self.models[i].learn_one(row, label)
        return out

    def forward_new(self, tasks: np.ndarray, x1: torch.Tensor) -> torch.Tensor:
        """Predictions of the untrained prototype."""
        return self._out([self._one(self.prototype, r) for r in self._rows(x1[:, :-1])])

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """River's outputs already are predictions."""
        return raw

    def new_store(self, capacity: int) -> list[Any]:
        """``capacity`` empty slots."""
        return [None] * capacity

    def write_member(self, store: list[Any], slot: int, task: int) -> None:
        """A deep copy of the task's estimator."""
        store[slot] = copy.deepcopy(self.models[task])

    def copy_member(self, store: list[Any], slot: int, one: list[Any]) -> None:
        """Take the one member of ``one``."""
        store[slot] = one[0]

    def member_vector(self, store: list[Any], slot: int) -> torch.Tensor:
        """River estimators have no common parameter vector: members are never near-duplicates."""
        # River estimators have no common parameter vector: members are never near-duplicates.
        return torch.zeros(0)

    def store_state(self, store: list[Any]) -> dict[str, Any]:
        """The pickled members (local checkpoints only)."""
        return {"pickle": _pickled(store)}

    def load_store(self, state: dict[str, Any]) -> list[Any]:
        """Members from a local checkpoint."""
        return list(_unpickled(state["pickle"]))

    def member_predict(self, store: list[Any], x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Every member's prediction for every row (empty slots predict zeros; they never take part)."""
        rows = self._rows(x)
        filler = [0.0] * self.n_pred if self.task != "regression" else [self.lo]
        preds = [[self._one(m, r) if m is not None else filler for m in store] for r in rows]
        pred = torch.tensor(preds, dtype=self.dtype, device=self.device).reshape(len(rows), len(store), -1)
        pred = pred if self.task == "regression" else smooth(pred)
        return pred if out is None else out.copy_(pred)

    def state(self) -> dict[str, Any]:
        """The pickled estimators (local checkpoints only)."""
        return {"pickle": _pickled(self.models)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Estimators from a local checkpoint."""
        self.models = _unpickled(state["pickle"])


def _pickled(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _unpickled(data: torch.Tensor) -> Any:
    # Local checkpoint files only, never bytes from the network: ``checkpoint.read`` checks the checksum and refuses
    # a file holding pickles that is not this user's or is writable by others, and records from other replicas
    # are refused for this backend before decoding (``wire.check_shareable``); it keeps no task store.
    return pickle.loads(data.numpy().tobytes())  # noqa: S301
