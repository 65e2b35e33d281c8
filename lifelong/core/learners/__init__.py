"""Current-task learners: one per task, created on the task's first event, held by a backend."""

from __future__ import annotations

import torch

from lifelong.config import EngineConfig
from lifelong.core.learners.base import Learners


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from lifelong.errors import ConfigError

        raise ConfigError("engine.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def make_learners(cfg: EngineConfig, dim: int, device: torch.device) -> Learners:
    """The backend named by ``engine.backend``."""
    if cfg.backend == "river":
        from lifelong.core.learners.river_backend import RiverLearners

        return RiverLearners(cfg, dim, device)
    from lifelong.core.learners.stacked import TorchLearners

    return TorchLearners(cfg, dim, device)
