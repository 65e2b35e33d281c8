"""Offline prequential evaluation of a JSONL stream: the engine and its baselines side by side, the file read once
in chunks."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from lifelong.config import Config
from lifelong.core.engine import Engine
from lifelong.core.events import Event, Schema, decode_many
from lifelong.core.warmup import quiet_collector, use_threads, warm_up
from lifelong.errors import LifelongError, require

READ_CHUNK = 8192  # lines read and decoded together (``decode_many``), then fed to every pass


def configure(path: str | Path, cfg: Config, infer: bool) -> Config:
    """The config to evaluate ``path`` with, from its first 5,000 lines: with ``infer``, the task kind and
    dimension come from the data; otherwise only an unset ``engine.dim`` does."""
    head = []
    with open(path, "rb") as f:
        for line in islice(f, 5000):
            with contextlib.suppress(ValueError):  # an invalid line is counted when the events are read
                head.append(json.loads(line))
    if not head:
        raise LifelongError(f"{path} holds no events")
    engine = cfg.engine
    if engine.dim == 0:
        first = next((d["x"] for d in head if isinstance(d, dict) and "x" in d), None)
        engine = dataclasses.replace(engine, dim=len(first) if isinstance(first, list) else 256)
    if infer:
        ys = [d["y"] for d in head if isinstance(d, dict) and d.get("y") is not None]
        if ys and all(isinstance(y, int | bool) or float(y).is_integer() for y in ys):
            n_classes = int(max(ys)) + 1
            engine = dataclasses.replace(
                engine, task="binary" if n_classes <= 2 else "multiclass", n_classes=max(2, n_classes)
            )
        elif ys:
            engine = dataclasses.replace(engine, task="regression", target_range=(float(min(ys)), float(max(ys))))
    return dataclasses.replace(cfg, engine=engine)


def read_chunks(path: str | Path, cfg: Config) -> Iterator[tuple[list[Event], int, int]]:
    """The file's valid events, ``READ_CHUNK`` lines at a time: (events, invalid lines, bytes read so far)."""
    engine = cfg.engine
    schema = Schema(
        engine.dim,
        engine.task,
        engine.n_classes,
        engine.target_range,
        frozenset(engine.tasks),
        cfg.kafka.max_message_bytes,
    )
    done = 0
    with open(path, "rb") as f:
        while lines := list(islice(f, READ_CHUNK)):
            done += sum(map(len, lines))
            decoded = decode_many([line for line in lines if line.strip()], schema)
            events = [e for e in decoded if isinstance(e, Event)]
            yield events, len(decoded) - len(events), done


def read_events(path: str | Path, cfg: Config, infer: bool) -> tuple[Config, list[Event], int]:
    """The whole file decoded (``configure``, ``read_chunks``): the config to use, valid events and the count
    of invalid lines."""
    cfg = configure(path, cfg, infer)
    events, bad = [], 0
    collecting = gc.isenabled()
    gc.disable()  # a million new objects and no garbage: the collector would go over them again and again
    try:
        for chunk, invalid, _ in read_chunks(path, cfg):
            events += chunk
            bad += invalid
    finally:
        if collecting:
            gc.enable()
    return cfg, events, bad


class Progress:
    """A one-line progress meter on stderr, by bytes of the file read (a line per 10% off a terminal)."""

    def __init__(self, total: int, label: str):
        self.total, self.label = max(1, total), label
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def update(self, done: int, events: int, extra: str = "") -> None:
        """Show progress after ``done`` bytes and ``events`` events (at most once per percent, or per 10% off a
        terminal)."""
        frac = min(1.0, done / self.total)
        step = int(frac * 100) if self.tty else int(frac * 10)
        if step == self.shown:
            return
        self.shown = step
        took = max(1e-9, time.perf_counter() - self.start)
        eta = took * (1.0 - frac) / max(frac, 1e-9)
        bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
        msg = f"{self.label} [{bar}] {frac:6.1%} {events:,} events {events / took:,.0f} ev/s ETA {eta:,.0f}s {extra}"
        print(("\r" + msg) if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the progress line."""
        if self.tty:
            print(file=sys.stderr)


class Curve:
    """Cumulative error against labelled events in bounded memory: the running sum every ``stride`` events,
    the stride doubling (and every other point dropped) whenever ``POINTS`` are kept."""

    POINTS = 4096

    def __init__(self) -> None:
        self.stride, self.n, self.total = 1, 0, 0.0
        self.at: list[int] = []
        self.sums: list[float] = []

    def add(self, errors: np.ndarray) -> None:
        """Errors of the next labelled events, in order."""
        cum = self.total + np.cumsum(errors)
        n = self.n + np.arange(1, len(errors) + 1)
        keep = n % self.stride == 0
        self.at += n[keep].tolist()
        self.sums += cum[keep].tolist()
        self.n, self.total = self.n + len(errors), float(cum[-1]) if len(errors) else self.total
        while len(self.at) > self.POINTS:
            self.stride *= 2
            self.at, self.sums = self.at[1::2], self.sums[1::2]


class Pass:
    """One method over the stream, chunk by chunk: its engine, its seconds, its error curve and its error at
    each task's k-th labelled event (k = 1 … ``BY_EVENT``), all in memory independent of the stream's length
    (``errors`` keeps every event's error when asked: ``evaluate(errors_out=...)``)."""

    BY_EVENT = 50

    def __init__(self, name: str, engine: Engine, column: int, batch: int, pooled: bool, keep: bool):
        self.name, self.engine, self.column, self.batch, self.pooled = name, engine, column, batch, pooled
        self.seconds = 0.0
        self.curve = Curve()
        self.seen: dict[str, int] = {}  # the pooled pass: labelled events per task so far
        self.by_event = np.zeros((3, self.BY_EVENT))  # count, sum, sum of squares of the k-th event's error
        self.errors: list[np.ndarray] | None = [] if keep else None

    def feed(self, events: list[Event]) -> None:
        """Predict and learn ``events`` in order."""
        if self.pooled:
            events = [e for e in events if e.control is None]
        for i in range(0, len(events), self.batch):
            part = events[i : i + self.batch]
            run = [dataclasses.replace(e, task="_pooled") for e in part] if self.pooled else part
            t0 = time.perf_counter()
            result = self.engine.process(run)
            self.seconds += time.perf_counter() - t0
            scored = ~np.isnan(result.errors[:, 0])
            err = result.errors[scored, self.column]
            self.curve.add(err)
            if self.errors is not None:
                self.errors.append(err)
            self._count(part, scored, err, result.learned_before[scored] + 1)

    def _count(self, events: list[Event], scored: np.ndarray, err: np.ndarray, k: np.ndarray) -> None:
        """Add the errors ``err`` of the ``scored`` events to the error at their task's k-th event (the pooled
        pass counts the events of the task each came from itself; the others read the engine's count)."""
        if self.pooled:
            for j, e in enumerate(e for e, s in zip(events, scored.tolist(), strict=True) if s):
                k[j] = self.seen[e.task] = self.seen.get(e.task, 0) + 1
        early = k <= self.BY_EVENT
        at = k[early] - 1
        for row, values in enumerate((np.ones(len(at)), err[early], err[early] ** 2)):
            np.add.at(self.by_event[row], at, values)

    @property
    def error(self) -> float:
        """Cumulative error so far."""
        return self.curve.total / max(1, self.curve.n)


PASSES = ("lifelong", "itl", "pooled")


def evaluate(
    path: str | Path,
    cfg: Config,
    infer: bool = True,
    plot: str | Path | None = None,
    progress: bool = True,
    errors_out: dict[str, np.ndarray] | None = None,
    passes: tuple[str, ...] = PASSES,
    report_json: str | Path | None = None,
) -> dict[str, Any]:
    """Prequential evaluation, the report of ``lifelong evaluate``: the engine (``lifelong``; ``local`` and
    ``kb_only`` are its own levels) and the baselines ``itl`` (cold-start independent learners, one per task:
    no KB, no shared level) and ``pooled`` (one such learner for all tasks), the ``passes`` asked for, side by
    side over the file read once in chunks: memory does not grow with the file's length. ``events_per_s`` is the
    engine's rate after its kernels are compiled (``warm_up``, ``warmup_s``). ``errors_out`` receives each
    method's error per labelled event, in file order. With ``report_json`` the report is written there, its
    per-task figures (``tasks``) a block of tasks at a time, and left out of the returned dict."""
    unknown = set(passes) - set(PASSES)
    if unknown or not passes:
        raise LifelongError(f"passes: choose from {', '.join(PASSES)} (got {', '.join(passes) or 'none'})")
    cfg = configure(path, cfg, infer)
    use_threads(cfg.engine)
    warmup_s = warm_up(cfg.engine, cfg.labels)
    batch = cfg.batching.max_events
    alone = dataclasses.replace(
        cfg.engine, snapshot_every=0, snapshot_at=(), basis=False, population=False, task_prior=False, tasks=()
    )
    keep = errors_out is not None
    runs = {
        "lifelong": lambda: Pass("lifelong", Engine(cfg.engine, cfg.labels), 0, batch, False, keep),
        "itl": lambda: Pass("itl", Engine(alone, cfg.labels), 1, batch, False, keep),
        "pooled": lambda: Pass("pooled", Engine(alone, cfg.labels), 1, batch, True, keep),
    }
    chosen = [runs[name]() for name in PASSES if name in passes]
    meter = Progress(Path(path).stat().st_size, "evaluate") if progress else None
    events = bad = 0
    with quiet_collector():
        for chunk, invalid, done in read_chunks(path, cfg):
            events, bad = events + len(chunk), bad + invalid
            for run in chosen:
                run.feed(chunk)
            if meter:
                meter.update(done, events, "  ".join(f"{r.name} {r.error:.4f}" for r in chosen))
    if meter:
        meter.close()
    by_name = {r.name: r for r in chosen}
    first = chosen[0]
    out = {
        "input": str(path),
        "events": events,
        "invalid_lines": bad,
        "passes": [r.name for r in chosen],
        "seconds": first.seconds,
        "events_per_s": events / max(first.seconds, 1e-9),
        "warmup_s": warmup_s,
        "device": str(first.engine.device),
        "config": dataclasses.asdict(cfg.engine),
        **_reports(by_name),
        "by_event": {r.name: _by_event(r) for r in chosen},
    }
    lifelong = by_name["lifelong"].engine if "lifelong" in by_name else None
    if report_json:
        write_report(report_json, out, lifelong)
    elif lifelong:
        out["tasks"] = dict(lifelong.task_figures())
    if errors_out is not None:
        errors_out.update({r.name: np.concatenate(r.errors or [np.zeros(0)]) for r in chosen})
    if plot:
        write_plot(plot, chosen, Path(path).name)
    return out


def write_report(path: str | Path, report: dict[str, Any], engine: Engine | None) -> None:
    """``report`` as strict JSON, with ``engine``'s per-task figures as its ``tasks`` written one by one: the
    file may hold hundreds of thousands of tasks, memory one block of them."""
    head = json.dumps(report, indent=1, allow_nan=False)
    with open(path, "w") as f:
        if engine is None:
            f.write(head)
            return
        f.write(head[:-2] + ',\n "tasks": {')
        for i, (name, figures) in enumerate(engine.task_figures()):
            f.write(("," if i else "") + f"\n  {json.dumps(name)}: {json.dumps(figures, allow_nan=False)}")
        f.write("\n }\n}\n")


def _reports(runs: dict[str, Pass]) -> dict[str, Any]:
    """The lifelong engine's report (when it ran) with the baselines' methods and early errors added."""
    report: dict[str, Any] = (
        runs["lifelong"].engine.report(per_task=False) if "lifelong" in runs else {"methods": {}, "early": {}}
    )
    for name in ("itl", "pooled"):
        if name in runs:
            alone = runs[name].engine.report(per_task=False)
            report["methods"][name] = alone["methods"]["local"]
            report["early"][name] = alone["early"]["local"]
            report["early"]["first_n"] = alone["early"]["first_n"]
    return report


def _by_event(run: Pass) -> dict[str, list[float]]:
    """Error at a task's k-th labelled event, k = 1 …: mean over the tasks that reached k, their count, and the
    half-width of a 95% confidence band of the mean."""
    n, total, squares = run.by_event
    reached = n > 0
    mean = np.divide(total, n, out=np.zeros_like(total), where=reached)
    var = np.maximum(np.divide(squares, n, out=np.zeros_like(total), where=reached) - mean**2, 0.0)
    half = 1.96 * np.sqrt(var / np.maximum(n - 1, 1))
    k = int(reached.sum())
    return {"tasks": n[:k].astype(int).tolist(), "mean": mean[:k].tolist(), "band": half[:k].tolist()}


def write_plot(path: str | Path, runs: list[Pass], title: str) -> None:
    """Two panels: cumulative error against labelled events for every method, and the error at a task's k-th
    labelled event (k = 1 … 50, mean over the tasks that reached k, with its 95% band)."""
    matplotlib = require("matplotlib", "plot", "lifelong evaluate --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cum, first) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        if run.curve.at:
            at = np.asarray(run.curve.at)
            line = cum.plot(at, np.asarray(run.curve.sums) / at, label=run.name)[0]
            k = _by_event(run)
            x = np.arange(1, len(k["mean"]) + 1)
            mean, band = np.asarray(k["mean"]), np.asarray(k["band"])
            first.plot(x, mean, color=line.get_color(), label=run.name)
            first.fill_between(x, mean - band, mean + band, color=line.get_color(), alpha=0.2)
    cum.set_xlabel("labelled events")
    cum.set_ylabel("cumulative error")
    cum.set_title(title)
    first.set_xlabel("a task's k-th labelled event")
    first.set_ylabel("error (mean over tasks, 95% band)")
    first.set_title("what knowledge from earlier tasks buys a new task")
    for ax in (cum, first):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
