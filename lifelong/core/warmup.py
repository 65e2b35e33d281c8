"""Process set-up before the first batch: torch's CPU threads, and the engine's compiled kernels."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from lifelong.config import EngineConfig, LabelsConfig
from lifelong.core.engine import FIRST_ESTIMATE, Engine
from lifelong.core.events import Event


def use_threads(cfg: EngineConfig) -> None:
    """Set this process's torch CPU threads to ``engine.threads`` (0 leaves torch's default)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def warm_up(cfg: EngineConfig, labels: LabelsConfig | None = None) -> float:
    """Compile the engine's kernels for ``cfg`` (a throwaway engine learns a few made-up events through every
    path: plain and pending labels, a control, snapshots, a publication and an estimate across tasks) so that
    the first real batch does not wait for them; the seconds it took. numba caches what it compiles on disk: a
    later start loads it."""
    t0 = time.perf_counter()
    scratch = Engine(dataclasses.replace(cfg, publish_every=8, snapshot_every=2, snapshot_at=()), labels)
    rng = np.random.default_rng(0)

    def label(i: int) -> int | float:
        if cfg.task == "regression":
            return float(cfg.target_range[0])
        return i % (cfg.n_classes if cfg.task == "multiclass" else 2)

    # as many as reach the first estimate across tasks (``Engine._estimate``), so that its kernels compile too
    plain = [Event(f"t{i % 2}", f"e{i}", rng.normal(size=cfg.dim), label(i)) for i in range(FIRST_ESTIMATE)]
    rest = [
        Event("t0", "p", rng.normal(size=cfg.dim), None),
        Event("t0", "p", None, label(1)),
        Event("t1", None, control="end"),
    ]
    scratch.process(plain)
    scratch.process(rest + plain[:2])
    return time.perf_counter() - t0
