"""Offline prequential evaluation of a JSONL stream: the engine and its baselines in one pass each."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lifelong.config import Config
from lifelong.core.engine import Engine
from lifelong.core.events import Event, Schema, decode_many
from lifelong.core.warmup import use_threads
from lifelong.errors import LifelongError, require

READ_CHUNK = 65536  # lines decoded together (``decode_many``)


def read_events(path: str | Path, cfg: Config, infer: bool) -> tuple[Config, list[Event], int]:
    """Decode a JSONL file. With ``infer``, the task kind and dimension come from the data; otherwise
    only an unset ``engine.dim`` does. Returns the config to use, valid events and the count of bad lines."""
    lines = Path(path).read_bytes().splitlines()
    if not lines:
        raise LifelongError(f"{path} holds no events")
    engine = cfg.engine
    parsed = [json.loads(line) for line in lines[:5000] if line.strip().startswith(b"{")]
    if engine.dim == 0:
        first = next((d["x"] for d in parsed if isinstance(d, dict) and "x" in d), None)
        dim = len(first) if isinstance(first, list) else 256
        engine = dataclasses.replace(engine, dim=dim)
    if infer:
        ys = [d["y"] for d in parsed if isinstance(d, dict) and d.get("y") is not None]
        if ys and all(isinstance(y, int | bool) or float(y).is_integer() for y in ys):
            n_classes = int(max(ys)) + 1
            engine = dataclasses.replace(
                engine, task="binary" if n_classes <= 2 else "multiclass", n_classes=max(2, n_classes)
            )
        elif ys:
            engine = dataclasses.replace(engine, task="regression", target_range=(float(min(ys)), float(max(ys))))
    cfg = dataclasses.replace(cfg, engine=engine)
    schema = Schema(
        engine.dim,
        engine.task,
        engine.n_classes,
        engine.target_range,
        frozenset(engine.tasks),
        cfg.kafka.max_message_bytes,
    )
    lines = [line for line in lines if line.strip()]
    events, bad = [], 0
    collecting = gc.isenabled()
    gc.disable()  # a million new objects and no garbage: the collector would go over them again and again
    try:
        for start in range(0, len(lines), READ_CHUNK):
            for e in decode_many(lines[start : start + READ_CHUNK], schema):
                if isinstance(e, Event):
                    events.append(e)
                else:
                    bad += 1
    finally:
        if collecting:
            gc.enable()
    return cfg, events, bad


class Progress:
    """A one-line progress meter on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, total: int, label: str):
        self.total, self.label = max(1, total), label
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def update(self, done: int, extra: str = "") -> None:
        """Show progress after ``done`` events (at most once per percent, or per 10% off a terminal)."""
        frac = done / self.total
        step = int(frac * 100) if self.tty else int(frac * 10)
        if step == self.shown:
            return
        self.shown = step
        rate = done / max(1e-9, time.perf_counter() - self.start)
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        msg = f"{self.label} [{bar}] {frac:6.1%} {done}/{self.total} {rate:,.0f} ev/s {extra}"
        print(("\r" + msg) if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the progress line."""
        if self.tty:
            print(file=sys.stderr)


def run_engine(
    engine: Engine,
    events: list[Event],
    batch: int,
    label: str | None = None,
) -> tuple[float, np.ndarray]:
    """Process ``events`` in batches; return the seconds taken and the per-labelled-event errors [n, 3]."""
    progress = Progress(len(events), label) if label else None
    errors = []
    mistakes = labelled = 0.0
    t0 = time.perf_counter()
    for i in range(0, len(events), batch):
        result = engine.process(events[i : i + batch])
        errors.append(result.errors[~np.isnan(result.errors[:, 0])])
        if progress:
            mistakes, labelled = mistakes + errors[-1][:, 0].sum(), labelled + len(errors[-1])
            progress.update(min(len(events), i + batch), f"error {mistakes / max(labelled, 1):.4f}")
    seconds = time.perf_counter() - t0
    if progress:
        progress.close()
    return seconds, np.concatenate(errors) if errors else np.zeros((0, 3))


def evaluate(
    path: str | Path,
    cfg: Config,
    infer: bool = True,
    plot: str | Path | None = None,
    progress: bool = True,
    errors_out: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """One prequential pass of the engine, then the baselines: ``itl`` (cold-start independent learners, one
    per task: no KB, no population prior) and ``pooled`` (one such learner for all tasks); the report of
    ``lifelong evaluate``. ``local`` is the engine's own task level (warm-started from the population).
    ``errors_out`` receives each method's error per labelled event, in file order."""
    cfg, events, bad = read_events(path, cfg, infer)
    batch = cfg.batching.max_events
    use_threads(cfg.engine)
    engine = Engine(cfg.engine, cfg.labels)
    seconds, errors = run_engine(engine, events, batch, "lifelong" if progress else None)
    report = engine.report()
    alone = dataclasses.replace(
        cfg.engine, snapshot_every=0, snapshot_at=(), basis=False, population=False, task_prior=False, tasks=()
    )
    cold = Engine(alone, cfg.labels)
    _, cold_errors = run_engine(cold, events, batch, "itl" if progress else None)
    cold_report = cold.report()
    report["methods"]["itl"] = cold_report["methods"]["local"]
    report["early"]["itl"] = cold_report["early"]["local"]
    pooled = Engine(alone, cfg.labels)
    pooled_events = [dataclasses.replace(e, task="_pooled") for e in events if e.control is None]
    _, pooled_errors = run_engine(pooled, pooled_events, batch, "pooled" if progress else None)
    report["methods"]["pooled"] = pooled.report()["methods"]["local"]
    out = {
        "input": str(path),
        "events": len(events),
        "invalid_lines": bad,
        "seconds": seconds,
        "events_per_s": len(events) / max(seconds, 1e-9),
        "device": str(engine.device),
        "config": dataclasses.asdict(cfg.engine),
        **report,
    }
    per_event = {
        "lifelong": errors[:, 0],
        "itl": cold_errors[:, 1],
        "kb_only": errors[:, 2],
        "pooled": pooled_errors[:, 1],
    }
    if errors_out is not None:
        errors_out.update(per_event)
    if plot:
        write_plot(plot, per_event, str(path))
    return out


def write_plot(path: str | Path, errors: dict[str, np.ndarray], title: str) -> None:
    """Cumulative error against labelled events, one line per method."""
    matplotlib = require("matplotlib", "plot", "lifelong evaluate --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, err in errors.items():
        if len(err):
            ax.plot(np.arange(1, len(err) + 1), np.cumsum(err) / np.arange(1, len(err) + 1), label=name)
    ax.set_xlabel("labelled events")
    ax.set_ylabel("cumulative error")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
