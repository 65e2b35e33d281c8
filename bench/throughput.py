"""Engine throughput against River per-task logistic regression, side by side in one run; and the 10,000-task
memory check.

    python bench/throughput.py [--out bench/results] [--repeat 3]

Both methods start from the same decoded events (JSON decoding is excluded from both); the engine figure
includes the KB, the basis and population experts and both mixtures. Streams: the default related stream (300
tasks, 20-event blocks, ~40 tasks active at a time), a finely interleaved one (1,000 tasks, 5-event blocks,
~200 active), related tasks in blocks of random length 5-60 that recur (1,000 tasks x 100), and 200,000 users
of 1-6 events each (``personal``: many short tasks, never ended). Then 10,000 tasks x 20 events: peak memory
(RSS) and KB size against capacity. The engine runs with the torch CPU threads ``lifelong run`` sets
(``engine.threads``, default 1): with torch's default (one per core) its small operations wake threads that
the task store's background writes compete with (personal: about 0.75x as fast).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from lifelong.config import EngineConfig  # noqa: E402
from lifelong.core.engine import Engine  # noqa: E402
from lifelong.core.events import Schema, from_dict  # noqa: E402
from lifelong.core.warmup import use_threads, warm_up  # noqa: E402
from lifelong.tools.generate import stream, synthetic  # noqa: E402

from peers import river_per_task  # noqa: E402
from record import save  # noqa: E402

STREAMS = {
    "related-300 (20-event blocks)": lambda: stream("related", n_tasks=300, events=100, block=20),
    "related-1000 (5-event blocks)": lambda: stream("related", n_tasks=1000, events=100, block=5, spread=10.0),
    "related-1000 (random 5-60 blocks)": lambda: random_blocks(1000, 100),
    "personal-200000 (1-6 events)": lambda: stream("personal", n_tasks=200_000),
}


def random_blocks(n_tasks: int, events: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Related tasks whose events come in blocks of random length (5-60), each task recurring over a window
    of about eight task arrivals, so a few dozen tasks interleave at any time."""
    rng = np.random.default_rng(seed + 1)
    blocks = []
    for k, (name, x, y) in enumerate(synthetic("related", n_tasks, events, 20, 3, seed)):
        start = 0
        while start < len(y):
            stop = min(len(y), start + int(rng.integers(5, 61)))
            blocks.append((k + 8 * rng.random(), name, x[start:stop], y[start:stop], start))
            start = stop
    for _, name, x, y, first in sorted(blocks, key=lambda b: b[0]):
        for r in range(len(y)):
            yield {"task": name, "id": f"{name}-{first + r}", "x": x[r].tolist(), "y": int(y[r])}


def engine_pass(events: list, cfg: EngineConfig, batch: int = 1024) -> tuple[float, Engine]:
    engine = Engine(cfg)
    t0 = time.perf_counter()
    for i in range(0, len(events), batch):
        engine.process(events[i : i + batch])
    return time.perf_counter() - t0, engine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--repeat", type=int, default=3, help="passes per method; the best is kept")
    ap.add_argument("--memory-tasks", type=int, default=10_000)
    ap.add_argument(
        "--max-resident-tasks", type=int, default=EngineConfig.max_resident_tasks, help="engine.max_resident_tasks"
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = EngineConfig(dim=20, max_resident_tasks=args.max_resident_tasks)
    use_threads(cfg)  # as ``lifelong run`` and ``lifelong evaluate`` set them (``engine.threads``)
    warm_up(cfg)  # the kernels compiled (or loaded) before any pass is timed
    schema = Schema(dim=20)
    # first, while the process is small: ru_maxrss is the peak of the whole process so far
    n_tasks = args.memory_tasks
    events = [from_dict(e, schema) for e in stream("related", n_tasks=n_tasks, events=20, block=20)]
    seconds, engine = engine_pass(events, cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    memory = {
        "tasks": n_tasks,
        "events": len(events),
        "seconds": seconds,
        "events_per_s": len(events) / seconds,
        "peak_rss_mib": peak,
        "kb_size": engine.kb.size,
        "kb_capacity": engine.kb.capacity,
        "kb_added": engine.kb.counts["added"],
        "kb_evicted": engine.kb.counts["evicted"],
    }
    print(
        f"{n_tasks} tasks x 20 events: {memory['events_per_s']:,.0f} ev/s, peak RSS {peak:,.0f} MiB "
        f"(whole process), KB {engine.kb.size}/{engine.kb.capacity} after {memory['kb_added']} additions and "
        f"{memory['kb_evicted']} evictions"
    )
    rows = []
    for name, make in STREAMS.items():
        events = [from_dict(e, schema) for e in make()]
        n = len(events)
        eng_s = min(engine_pass(events, cfg)[0] for _ in range(args.repeat))
        riv_s = min(river_per_task(events)[1] for _ in range(args.repeat))
        rows.append(
            {
                "stream": name,
                "events": n,
                "engine_events_per_s": n / eng_s,
                "river_events_per_s": n / riv_s,
                "ratio": riv_s / eng_s,
            }
        )
    print(f"{'stream':<36}{'events':>8}{'lifelong ev/s':>15}{'river ev/s':>12}{'ratio':>7}")
    for r in rows:
        print(
            f"{r['stream']:<36}{r['events']:>8}{r['engine_events_per_s']:>15,.0f}{r['river_events_per_s']:>12,.0f}"
            f"{r['ratio']:>7.2f}"
        )

    save(out, "throughput", {"streams": rows, "memory": memory})
    print(f"wrote {out / 'throughput.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
