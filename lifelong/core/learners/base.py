"""The role every current-task learner backend plays: many tasks' learners held together, with batch and
sequential steps, KB member stores and their state."""

from __future__ import annotations

import abc
from typing import Any

import numba
import numpy as np
import torch

from lifelong.config import EngineConfig
from lifelong.core.hedge import EPS, smooth


class Learners(abc.ABC):
    """A backend holding one learner per task: what the engine needs from it.

    Predictions live in one space for every level: class probabilities ``[..., C]`` for classification,
    one value in the target range ``[..., 1]`` for regression. Rows of one call belong to distinct tasks.
    KB members are frozen copies of task learners kept in a backend-specific "store" of slots.
    """

    linear = False  # True when members are linear models (the basis expert needs their weights)
    shareable = False  # True when members and task state are plain arrays that replicas may exchange

    def __init__(self, cfg: EngineConfig, dim: int, device: torch.device):
        self.cfg = cfg
        self.dim = dim
        self.device = device
        self.dtype = getattr(torch, cfg.dtype)
        self.task = cfg.task
        self.n_out = cfg.n_classes if cfg.task == "multiclass" else 1
        self.n_pred = cfg.n_classes if cfg.task == "multiclass" else (2 if cfg.task == "binary" else 1)
        self.lo, self.hi = cfg.target_range
        # where new tasks' learners start (EKF: the population learner's mean, set by the engine at each
        # publication); None: the backend's own initialisation
        self.prior_mu: torch.Tensor | None = None
        self.prior_S: torch.Tensor | None = None  # EKF: the covariance new tasks start from (``task_prior``)

    def to_pred(self, logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Map logits ``[..., n_out]`` into the prediction space shared by all levels (float64 on the CPU),
        written into ``out`` when given."""
        if self.task == "binary":
            p = torch.sigmoid(logits)
        elif self.task == "multiclass":
            p = torch.softmax(logits, dim=-1)
        else:
            p = logits.clamp(0.0, 1.0)
        if p.device.type == "cpu":  # the rest in one compiled pass, straight to float64
            if out is None:
                out = torch.empty((*p.shape[:-1], self.n_pred), dtype=torch.float64)
            rows, target = p.detach().numpy(), out.numpy()  # [n, K, ...] or [n, ...]; views: ``out`` is written
            if p.dim() == 2:
                rows, target = rows[:, None], target[:, None]
            _finish_pred(rows, self.task == "binary", self.task == "regression", self.lo, self.hi, target)
            return out
        if self.task == "binary":
            pred = smooth(torch.cat([1 - p, p], dim=-1))
        else:
            pred = smooth(p) if self.task == "multiclass" else self.lo + (self.hi - self.lo) * p
        return pred if out is None else out.copy_(pred)

    def safe(self, pred: torch.Tensor) -> torch.Tensor:
        """``pred`` with each row that holds a non-finite value replaced by the uninformed prediction (uniform
        class probabilities, or the middle of the target range)."""
        if bool(torch.isfinite(pred).all()):
            return pred
        bad = ~torch.isfinite(pred).all(-1, keepdim=True)
        fill = (self.lo + self.hi) / 2 if self.task == "regression" else 1.0 / self.n_pred
        return torch.where(bad, torch.full_like(pred, fill), pred)

    def not_finite(self, tasks: np.ndarray) -> np.ndarray:
        """Which of ``tasks`` hold a non-finite parameter (backends without array state: none)."""
        return np.zeros(len(tasks), bool)

    @abc.abstractmethod
    def ensure(self, n_tasks: int) -> None:
        """Hold learners for tasks ``0 .. n_tasks - 1`` (new ones untrained)."""

    @abc.abstractmethod
    def forward(self, idx: torch.Tensor, x1: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Raw outputs for inputs with a trailing 1, before learning; with ``y``, each row then learns."""

    @abc.abstractmethod
    def forward_new(self, tasks: np.ndarray, x1: torch.Tensor) -> torch.Tensor:
        """``forward``'s raw outputs of untrained learners of tasks not created yet (their would-be indices
        ``tasks``, one per row), without creating them."""

    @abc.abstractmethod
    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """Predictions from ``forward``'s raw outputs."""

    @abc.abstractmethod
    def new_store(self, capacity: int) -> Any:
        """An empty store of ``capacity`` member slots."""

    @abc.abstractmethod
    def write_member(self, store: Any, slot: int, task: int) -> None:
        """Freeze task ``task``'s learner into ``slot`` of ``store``."""

    @abc.abstractmethod
    def copy_member(self, store: Any, slot: int, one: Any) -> None:
        """Copy the one member of the one-slot store ``one`` into ``slot`` of ``store``."""

    @abc.abstractmethod
    def member_vector(self, store: Any, slot: int) -> torch.Tensor:
        """A member's parameters as one vector (empty when they have no common form)."""

    def member_vectors(self, stores: list[Any]) -> torch.Tensor:
        """``member_vector`` of each one-slot store, stacked ``[m, D]``."""
        return torch.stack([self.member_vector(one, 0) for one in stores])

    def copy_members(self, store: Any, slots: list[int], stores: list[Any]) -> None:
        """``copy_member`` of each one-slot store into its slot (distinct slots)."""
        for slot, one in zip(slots, stores, strict=True):
            self.copy_member(store, slot, one)

    @abc.abstractmethod
    def member_predict(self, store: Any, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions ``[n, K, P]`` of every slot for inputs ``[n, d]`` (written into ``out`` when given)."""

    @property
    def can_sequence(self) -> bool:
        """True when ``sequence`` can run a whole segment event by event in compiled code."""
        return False

    def sequence(
        self, tasks: np.ndarray, x1: torch.Tensor, y: np.ndarray, labelled: np.ndarray, snap_row: np.ndarray
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Raw outputs of a segment in order, and the snapshots asked for (only when ``can_sequence``)."""
        raise NotImplementedError

    def members_from_ekf(self, mu: np.ndarray) -> list[Any]:
        """One-slot member stores from snapshots ``[m, C, d + 1]`` of ``sequence`` (only when ``can_sequence``)."""
        raise NotImplementedError

    def linear_weights(self, store: Any) -> torch.Tensor | None:
        """Members as ``[K, d + 1, C]`` (bias last) for linear backends, else None."""
        return None

    @abc.abstractmethod
    def store_state(self, store: Any) -> dict[str, Any]:
        """A store as tensors (checkpoints; plain arrays for shareable backends)."""

    @abc.abstractmethod
    def load_store(self, state: dict[str, Any]) -> Any:
        """A store back from ``store_state``."""

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        """One task's learner as arrays (for the changelog other replicas restore from)."""
        raise NotImplementedError(f"the {self.cfg.backend} backend cannot move task state between replicas")

    def load_task(self, task: int, state: dict[str, torch.Tensor] | None) -> None:
        """Set one task's learner from ``task_state`` output; None: back to untrained."""
        raise NotImplementedError(f"the {self.cfg.backend} backend cannot move task state between replicas")

    def columns(self) -> dict[str, torch.Tensor]:
        """Every per-task tensor (row i: task i), for moving tasks to and from the task store."""
        raise NotImplementedError(f"the {self.cfg.backend} backend keeps every task in memory")

    def reset(self, rows: torch.Tensor) -> None:
        """Tasks ``rows`` back to untrained (rows reused for new tasks)."""
        raise NotImplementedError(f"the {self.cfg.backend} backend keeps every task in memory")

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """Every task's learner as tensors (checkpoints)."""

    @abc.abstractmethod
    def load_state(self, state: dict[str, Any]) -> None:
        """Restore every task's learner from ``state``."""


@numba.njit(cache=True, error_model="numpy")
def _finish_pred(p: np.ndarray, binary: bool, regression: bool, lo: float, hi: float, out: np.ndarray) -> None:
    """``to_pred`` after the sigmoid, softmax or clamp: ``smooth`` for classes, the target range for values."""
    scale = 1.0 / (1.0 + EPS * out.shape[2])
    for i in range(p.shape[0]):
        for j in range(p.shape[1]):
            if regression:
                out[i, j, 0] = lo + (hi - lo) * np.float64(p[i, j, 0])
            elif binary:
                p1 = np.float64(p[i, j, 0])
                out[i, j, 0] = (1.0 - p1 + EPS) * scale
                out[i, j, 1] = (p1 + EPS) * scale
            else:
                for c in range(out.shape[2]):
                    out[i, j, c] = (np.float64(p[i, j, c]) + EPS) * scale


def rows_not_finite(tables: list[torch.Tensor], rows: np.ndarray) -> np.ndarray:
    """Which of ``rows`` hold a NaN or infinity in any of ``tables`` (tensors indexed by row first)."""
    if tables and tables[0].device.type == "cpu":  # compiled: no copies of the rows
        bad = np.zeros(len(rows), np.bool_)
        for table in tables:
            _rows_not_finite(table.numpy().reshape(len(table), -1), rows, bad)
        return bad
    idx = torch.as_tensor(rows, device=tables[0].device if tables else "cpu")
    out = torch.zeros(len(rows), dtype=torch.bool, device=idx.device)
    for table in tables:
        out |= ~torch.isfinite(table[idx].flatten(1)).all(1)
    return out.cpu().numpy()


@numba.njit(cache=True)
def _rows_not_finite(table: np.ndarray, rows: np.ndarray, bad: np.ndarray) -> None:
    for j in range(len(rows)):
        if not bad[j]:
            for v in table[rows[j]]:
                if not np.isfinite(v):
                    bad[j] = True
                    break
