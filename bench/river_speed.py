"""The River estimators at River's speed? ``LifelongClassifier(by="task")`` against River's ``LogisticRegression``
per task, both in ``river.evaluate.progressive_val_score`` on the same stream, side by side in one run.

    python bench/river_speed.py [--events 100000] [--repeat 3] [--chunk 5000] [--streams 'random blocks,...']

(Not ``river.py``: a script of that name would shadow the ``river`` package it imports.)

Two streams (``--streams``), as River dicts (``task`` and ``x0``, ``x1``, …: no two features share a hash bucket):
``random blocks``, ``bench/throughput.py``'s related tasks in recurring blocks of random length 5-60 (1,000 tasks
x 100 events; issue 32's target: >= 0.5), and ``many short tasks``, the first events of ``lifelong generate
--kind personal`` (200,000 users of 1-6 events; about 28,700 tasks in 100,000 events). Prints each method's
events/s and error, the speed ratio and ``lifelong evaluate``'s error on the same events (hashed as the
estimator hashes them; target: within 0.1 point of the estimator's). The kernels are compiled (or loaded from
numba's cache) on a short stream first. Each of ``--repeat`` runs takes a fresh model of each method through the
stream in turns of ``--chunk`` events (River's model on a chunk, then ours on the same chunk, each continuing
where it left off: ``progressive_val_score`` on each chunk with the model's own metric gives what one call on the
whole stream gives), so that this machine's speed, which drifts by a fifth within minutes, weighs on both alike;
each method's events/s is the median over runs, the ratio the median of each run's ratio of the two.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from river import base, evaluate, linear_model, metrics

sys.path.insert(0, str(Path(__file__).parent))

from throughput import random_blocks  # noqa: E402

from lifelong.config import load_config  # noqa: E402
from lifelong.estimators import LifelongClassifier  # noqa: E402
from lifelong.tools.evaluate import evaluate as lifelong_evaluate  # noqa: E402
from lifelong.tools.generate import stream  # noqa: E402

from record import save  # noqa: E402


class PerTask(base.Classifier):
    """River's ``LogisticRegression`` (defaults), one per value of the ``task`` feature."""

    def __init__(self) -> None:
        self.models: dict[str, linear_model.LogisticRegression] = {}

    def _model(self, x: dict[str, Any]) -> linear_model.LogisticRegression:
        task = x["task"]
        if task not in self.models:
            self.models[task] = linear_model.LogisticRegression()
        return self.models[task]

    def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
        return self._model(x).predict_proba_one({k: v for k, v in x.items() if k != "task"})

    def learn_one(self, x: dict[str, Any], y: bool) -> None:
        self._model(x).learn_one({k: v for k, v in x.items() if k != "task"}, y)


def side_by_side(models: list[Any], stream: list[tuple[dict[str, Any], bool]], chunk: int) -> list[tuple[float, float]]:
    """River's ``progressive_val_score`` loop (predict, then learn) of each model, the models taking turns chunk by
    chunk: (events/s, error) of each."""
    seconds, accuracy = [0.0] * len(models), [metrics.Accuracy() for _ in models]
    for start in range(0, len(stream), chunk):
        for i, model in enumerate(models):
            t0 = time.perf_counter()
            evaluate.progressive_val_score(stream[start : start + chunk], model, accuracy[i])
            seconds[i] += time.perf_counter() - t0
    return [(len(stream) / s, 1.0 - a.get()) for s, a in zip(seconds, accuracy, strict=True)]


STREAMS = {  # name -> the first ``n`` events, as raw dicts
    "random blocks": lambda n: list(random_blocks(1000, 100))[:n],
    "many short tasks": lambda n: list(itertools.islice(stream("personal", n_tasks=200_000), n)),
}


def as_river(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bool]]:
    """Events as River's (x, y): ``task`` and ``x0``, ``x1``, …"""
    return [({"task": r["task"], **{f"x{i}": v for i, v in enumerate(r["x"])}}, bool(r["y"])) for r in rows]


def measure(rows: list[dict[str, Any]], repeat: int, chunk: int) -> dict[str, Any]:
    """Both methods on one stream, side by side ``repeat`` times (medians), and ``lifelong evaluate``'s error."""
    data = as_river(rows)
    runs = []
    for _ in range(repeat):  # each a fresh model of each method; x0 … x19 fall apart in dim 64
        (river_rate, river_error), (ours_rate, ours_error) = side_by_side(
            [PerTask(), LifelongClassifier(by="task")], data, chunk
        )
        runs.append((river_rate, ours_rate))
    river_rate, ours_rate = (float(np.median(r)) for r in zip(*runs, strict=True))
    ratios = [ours / river for river, ours in runs]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stream.jsonl"
        hashed = LifelongClassifier(by="task")  # the features as the estimator hashes them
        path.write_text(
            "".join(
                json.dumps({"task": x["task"], "x": hashed._event(x).x.tolist(), "y": int(y)}) + "\n" for x, y in data
            )
        )
        report = lifelong_evaluate(path, load_config(env={}), progress=False, passes=("lifelong",))
    return {
        "events": len(data),
        "tasks": len({r["task"] for r in rows}),
        "river_events_per_s": river_rate,
        "river_error": river_error,
        "lifelong_events_per_s": ours_rate,
        "lifelong_error": ours_error,
        "speed_ratio": float(np.median(ratios)),
        "ratio_range": f"{min(ratios):.3f}-{max(ratios):.3f}",
        "evaluate_error": report["methods"]["lifelong"]["cumulative_error"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000, help="the first N events of each stream")
    ap.add_argument("--repeat", type=int, default=3, help="runs of both methods side by side (medians reported)")
    ap.add_argument("--chunk", type=int, default=5000, help="events each method takes in turn")
    ap.add_argument("--streams", default=",".join(STREAMS), help=f"comma-separated, of: {', '.join(STREAMS)}")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    names = args.streams.split(",")
    if unknown := set(names) - set(STREAMS):
        ap.error(f"unknown streams {sorted(unknown)}; known: {', '.join(STREAMS)}")
    t0 = time.perf_counter()  # the kernels compile on the first run after an install (then load from the cache)
    side_by_side([LifelongClassifier(by="task")], as_river(STREAMS["random blocks"](1000)), 1000)
    warmup_s = time.perf_counter() - t0
    results = [{"stream": name, **measure(STREAMS[name](args.events), args.repeat, args.chunk)} for name in names]
    print(
        f"{'stream (progressive_val_score)':<22}{'tasks':>8}{'River ev/s':>12}{'lifelong ev/s':>15}{'ratio':>7}"
        f"{'River err':>11}{'lifelong err':>14}{'evaluate err':>14}"
    )
    for r in results:
        print(
            f"{r['stream']:<22}{r['tasks']:>8,}{r['river_events_per_s']:>12,.0f}{r['lifelong_events_per_s']:>15,.0f}"
            f"{r['speed_ratio']:>7.3f}{r['river_error']:>11.4f}{r['lifelong_error']:>14.4f}{r['evaluate_error']:>14.4f}"
        )
    print(
        f"\nratio: lifelong / River per task (issue 32's target on random blocks: >= 0.5); medians of {args.repeat} "
        f"runs, the methods taking turns every {args.chunk:,} events (each run's ratio: "
        f"{'; '.join(r['ratio_range'] for r in results)}); compiling or loading "
        f"the kernels first took {warmup_s:.1f} s. evaluate err: `lifelong evaluate` on the same events (target: "
        "within 0.1 point of the estimator's)."
    )
    save(Path(args.out), "river_speed", {"warmup_s": warmup_s, "streams": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
