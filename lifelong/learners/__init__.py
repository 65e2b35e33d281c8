"""Current-task learners: one per task, created on the task's first event, held by a backend."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..config import EngineConfig


class Learners(Protocol):
    """What the engine needs from a backend that holds one learner per task.

    Predictions live in one space for every level: class probabilities ``[..., C]`` for classification,
    one value in the target range ``[..., 1]`` for regression. Rows of one call belong to distinct tasks.
    """

    n_pred: int
    linear: bool

    def ensure(self, n_tasks: int) -> None: ...
    def forward(self, idx: torch.Tensor, x1: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...
    def finish(self, raw: torch.Tensor) -> torch.Tensor: ...
    def new_store(self, capacity: int) -> Any: ...
    def write_member(self, store: Any, slot: int, task: int) -> None: ...
    def copy_member(self, store: Any, slot: int, one: Any) -> None: ...
    def member_vector(self, store: Any, slot: int) -> torch.Tensor: ...
    def member_predict(self, store: Any, x: torch.Tensor) -> torch.Tensor: ...
    def linear_weights(self, store: Any) -> torch.Tensor | None: ...
    def store_state(self, store: Any) -> dict[str, Any]: ...
    def load_store(self, state: dict[str, Any]) -> Any: ...
    def to_pred(self, logits: torch.Tensor) -> torch.Tensor: ...
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...


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
