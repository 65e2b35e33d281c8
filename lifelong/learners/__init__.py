"""Current-task learners: one per task, created on the task's first event, held by a backend."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch

from ..config import EngineConfig
from ..hedge import smooth


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

    def to_pred(self, logits: torch.Tensor) -> torch.Tensor:
        """Map logits ``[..., n_out]`` into the prediction space shared by all levels."""
        if self.task == "binary":
            p1 = torch.sigmoid(logits)
            return smooth(torch.cat([1 - p1, p1], dim=-1))
        if self.task == "multiclass":
            return smooth(torch.softmax(logits, dim=-1))
        return self.lo + (self.hi - self.lo) * logits.clamp(0.0, 1.0)

    def safe(self, pred: torch.Tensor) -> torch.Tensor:
        """``pred`` with each row that holds a non-finite value replaced by the uninformed prediction (uniform
        class probabilities, or the middle of the target range)."""
        bad = ~torch.isfinite(pred).all(-1, keepdim=True)
        if not bool(bad.any()):
            return pred
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

    @abc.abstractmethod
    def member_predict(self, store: Any, x: torch.Tensor) -> torch.Tensor:
        """Predictions ``[n, K, P]`` of every slot for inputs ``[n, d]``."""

    @property
    def can_sequence(self) -> bool:
        """True when ``sequence`` can run a whole segment event by event in compiled code."""
        return False

    def sequence(
        self, tasks: np.ndarray, x1: torch.Tensor, y: np.ndarray, labelled: np.ndarray, snap_row: np.ndarray
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Raw outputs of a segment in order, and the snapshots asked for (only when ``can_sequence``)."""
        raise NotImplementedError

    def member_from_ekf(self, mu: np.ndarray) -> Any:
        """A one-slot member store from a snapshot of ``sequence`` (only when ``can_sequence``)."""
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

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """Every task's learner as tensors (checkpoints)."""

    @abc.abstractmethod
    def load_state(self, state: dict[str, Any]) -> None:
        """Restore every task's learner from ``state``."""


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError("engine.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def make_learners(cfg: EngineConfig, dim: int, device: torch.device) -> Learners:
    """The backend named by ``engine.backend``."""
    if cfg.backend == "river":
        from .river import RiverLearners

        return RiverLearners(cfg, dim, device)
    from .stacked import TorchLearners

    return TorchLearners(cfg, dim, device)
