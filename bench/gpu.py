"""GPU batching: many concurrent MLP learners (one per task) on a well-mixed stream, CPU vs CUDA.

    python bench/gpu.py [--tasks 10000] [--events 200000] [--batch 4096] [--model mlp] [--out bench/results]

Prints events/s of the torch backend on the CPU and, when CUDA is present, on the GPU with the speed-up;
writes gpu.json. Events are generated in memory (related logistic tasks, each event's task drawn uniformly),
so every micro-batch holds thousands of tasks and most of its events fall in the first waves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lifelong.config import EngineConfig
from lifelong.core.engine import Engine
from lifelong.core.events import Event

from record import save


def well_mixed(n_tasks: int, n_events: int, dim: int, seed: int = 0) -> list[Event]:
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=dim) / np.sqrt(dim) * 2
    w = shared + rng.normal(size=(n_tasks, dim)) / np.sqrt(dim)
    tasks = rng.integers(0, n_tasks, n_events)
    x = rng.normal(size=(n_events, dim)).astype(np.float32)
    y = rng.random(n_events) < 1 / (1 + np.exp(-(x * w[tasks]).sum(1)))
    return [Event(f"task-{t}", f"e{i}", x[i], int(y[i])) for i, t in enumerate(tasks.tolist())]


def run(events: list[Event], cfg: EngineConfig, batch: int) -> tuple[float, float]:
    engine = Engine(cfg)
    engine.process(events[:batch])  # warm-up: allocations, CUDA context
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(batch, len(events), batch):
        engine.process(events[i : i + batch])
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return (len(events) - batch) / seconds, engine.report()["methods"]["lifelong"]["cumulative_error"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--model", choices=("mlp", "logistic"), default="mlp")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    events = well_mixed(args.tasks, args.events, args.dim)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        cfg = EngineConfig(
            dim=args.dim, model=args.model, hidden=32, device=device, publish_every=args.batch, snapshot_every=20
        )
        rate, error = run(events, cfg, args.batch)
        rows.append({"device": device, "events_per_s": rate, "error": error})
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"{args.tasks} {args.model} learners, {args.events} events, batch {args.batch}; GPU: {name}")
    print(f"{'device':<8}{'events/s':>12}{'error':>8}{'speed-up':>10}")
    for r in rows:
        speedup = r["events_per_s"] / rows[0]["events_per_s"]
        print(f"{r['device']:<8}{r['events_per_s']:>12,.0f}{r['error']:>8.4f}{speedup:>9.1f}x")
    if len(rows) == 1:
        print("no CUDA device here: CPU figure only")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save(out, "gpu", {"args": vars(args), "gpu": name, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
