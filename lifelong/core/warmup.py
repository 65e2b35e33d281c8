"""Process set-up before the first batch: torch's CPU threads, the engine's compiled kernels, the garbage collector."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Iterator

import numpy as np
import torch

from lifelong.config import EngineConfig, LabelsConfig
from lifelong.core.engine import FIRST_ESTIMATE, Engine
from lifelong.core.events import Event

# The loop makes thousands of short-lived objects per batch (records, events, predictions): Python's default
# (a young collection every 700 of them, a full one every 100 young ones at most) collected several times per
# batch and every few tenths of a second in full; collecting every 50,000 is faster and lowers the p99 latency.
GC_THRESHOLDS = (50_000, 20, 100)


def use_threads(cfg: EngineConfig) -> int:
    """Set this process's torch CPU threads to ``engine.threads`` (0 leaves them as they are); the count before."""
    before = torch.get_num_threads()
    if cfg.threads > 0 and cfg.threads != before:
        torch.set_num_threads(cfg.threads)
    return before


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


@contextlib.contextmanager
def quiet_collector() -> Iterator[None]:
    """What the process holds on entry (torch, numba, the clients: ~270,000 objects after a warm-up) is never
    garbage: left out of the collector's full passes from then on (``gc.freeze``; a full pass over it takes ~100 ms,
    and a 700,000-event ``evaluate`` made 21 of them), and inside, young collections every ``GC_THRESHOLDS[0]``
    new objects; the thresholds as they were on exit."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
