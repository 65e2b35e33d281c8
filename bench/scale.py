"""Task state at scale: events/s, peak memory and checkpoints on streams of very many tasks (issue 11).

    python bench/scale.py [--events 1000000] [--many 350000] [--few 1000] [--batch 1024] [--seed 0] [--resident N]
    python bench/scale.py --daemon [--events 400000] [--many 200000] [--restarts 1]

Two streams of the same length and generator, each run in its own process (so that each peak RSS is its own):
``few`` spreads the events over ``--few`` tasks drawn uniformly; ``many`` is shaped like users or devices:
30% of the events from 1,000 popular tasks (Zipf weights), 70% from a long tail, so that about ``--many``
distinct tasks appear, most of them once or twice and a few very often. Tasks are related logistic tasks (a
common weight vector plus a per-task offset), dim 20, every event labelled. Events are generated batch by batch
(no event list held), and the engine runs the default configuration. Prints events/s, peak RSS and the ratio
many/few. ``--resident N``: ``engine.max_resident_tasks`` N instead of the default (400,000: every task of
``many`` in memory, what the task store costs).

With ``--daemon``: ``lifelong run`` (a subprocess, standalone, default configuration, checkpoint.interval_s 10)
through the embedded broker on the same two shapes of stream, backlog pre-produced: events/s from the
prediction records' timestamps, the daemon's peak RSS (VmHWM), its checkpoints (count, slowest bucket, bytes
per task written, from /metrics), then SIGTERM to exit, and a restart on the same state to /readyz 200
(``--restarts N``: N restarts in turn, each stopped by SIGTERM once ready; the table shows the slowest).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lifelong.config import EngineConfig
from lifelong.core.engine import Engine
from lifelong.core.events import Event
from lifelong.core.warmup import quiet_collector, use_threads, warm_up
from lifelong.tools.broker import free_port

from record import save

DIM = 20


def task_ids(kind: str, n_events: int, n_tasks: int, seed: int) -> np.ndarray:
    """Each event's task: uniform over ``n_tasks`` (few), or a popular head and a long tail giving about
    ``n_tasks`` distinct tasks (many)."""
    rng = np.random.default_rng(seed)
    if kind == "few":
        return rng.integers(0, n_tasks, n_events)
    # 30% of events from 1,000 popular tasks (Zipf weights), 70% uniform over a tail of T tasks, T chosen so that
    # about n_tasks distinct ones appear (T (1 - exp(-m / T)) = n_tasks - 1000): most tail tasks once or twice
    hot = rng.random(n_events) < 0.3
    w = 1 / np.arange(1, 1001)
    m, want = int((~hot).sum()), max(1, n_tasks - 1000)
    lo, hi = want, 100 * want
    for _ in range(60):
        T = (lo + hi) / 2
        lo, hi = (T, hi) if T * (1 - np.exp(-m / T)) < want else (lo, T)
    ids = np.where(hot, rng.choice(1000, n_events, p=w / w.sum()), 1000 + rng.integers(0, int(T), n_events))
    return ids


def batches(kind: str, n_events: int, n_tasks: int, batch: int, seed: int) -> Iterator[list[Event]]:
    tasks = task_ids(kind, n_events, n_tasks, seed)
    rng = np.random.default_rng(seed + 1)
    common = rng.normal(size=DIM) * 2 / np.sqrt(DIM)
    # a task's offset comes from its id through two prime-sized tables (no per-task table): same task, same weights
    t1, t2 = rng.normal(size=(4093, DIM)) / np.sqrt(2 * DIM), rng.normal(size=(4091, DIM)) / np.sqrt(2 * DIM)
    for a in range(0, n_events, batch):
        t = tasks[a : a + batch]
        x = rng.normal(size=(len(t), DIM)).astype(np.float32)
        off = t1[t % 4093] + t2[t % 4091]
        y = rng.random(len(t)) < 1 / (1 + np.exp(-(x * (common + off)).sum(1)))
        yield [Event(f"u{i}", f"e{a + j}", x[j], int(y[j])) for j, i in enumerate(t.tolist())]


def one(kind: str, args: argparse.Namespace) -> dict[str, float]:
    cfg = EngineConfig(dim=DIM, max_resident_tasks=args.resident)
    use_threads(cfg)
    warm_up(cfg)
    engine = Engine(cfg)
    gen_s, t0 = 0.0, time.perf_counter()
    it = batches(kind, args.events, args.many if kind == "many" else args.few, args.batch, args.seed)
    with quiet_collector():  # as `lifelong run` and `evaluate` run their loops
        while True:
            g = time.perf_counter()
            evs = next(it, None)
            gen_s += time.perf_counter() - g
            if evs is None:
                break
            engine.process(evs)
    seconds = time.perf_counter() - t0 - gen_s
    return {
        "tasks": engine.n_known,
        "events_per_s": args.events / seconds,
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def metric_lines(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # noqa: S310 - loopback
        body = r.read().decode()
    out = {}
    for line in body.splitlines():
        if line.startswith("lifelong_") and " " in line:
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def ready(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:  # noqa: S310 - loopback
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def daemon_run(kind: str, args: argparse.Namespace, broker: Any, work: Path) -> dict[str, float]:
    from daemon import produce, rate_of, read_all, start_daemon

    payloads = [
        event_line(e)
        for evs in batches(kind, args.events, args.many if kind == "many" else args.few, 4096, args.seed)
        for e in evs
    ]
    tag, port, state = f"scale-{kind}", free_port(), work / f"state-{kind}"
    produce(broker.bootstrap, f"ev-{tag}", payloads)
    proc = start_daemon(broker.bootstrap, tag, work, shared=False, state=state, port=port, interval_s=10.0)
    try:
        rate = rate_of(read_all(broker.bootstrap, f"pred-{tag}", len(payloads), timeout=1800))
        time.sleep(12)  # one more checkpoint interval: the last one holds every task
        m = metric_lines(port)
        status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        rss = int(next(line.split()[1] for line in status if line.startswith("VmHWM")))
    finally:
        t0 = time.monotonic()
        proc.terminate()
        proc.wait(120)
        sigterm_s = time.monotonic() - t0
    restarts = []
    for _ in range(args.restarts):
        t0 = time.monotonic()
        proc = start_daemon(broker.bootstrap, tag, work, shared=False, state=state, port=port, interval_s=10.0)
        try:
            while not ready(port) and time.monotonic() - t0 < 120:
                time.sleep(0.1)
            restarts.append(time.monotonic() - t0)
        finally:
            proc.terminate()
            proc.wait(120)
    count = m.get("lifelong_checkpoint_seconds_count", 0.0)
    return {
        "tasks": m.get("lifelong_tasks", 0.0),
        "events_per_s": rate,
        "peak_rss_mib": rss / 1024,
        "checkpoints": count,
        "checkpoints_within_1s": m.get('lifelong_checkpoint_seconds_bucket{le="1.0"}', 0.0),
        "checkpoint_mean_s": m.get("lifelong_checkpoint_seconds_sum", 0.0) / max(1.0, count),
        "bytes_per_task_written": m.get("lifelong_checkpoint_bytes_total", 0.0)
        / max(1.0, m.get("lifelong_checkpoint_tasks_total", 0.0)),
        "tasks_written": m.get("lifelong_checkpoint_tasks_total", 0.0),
        "sigterm_s": sigterm_s,
        "restart_ready_s": max(restarts),
        "restarts": restarts,
    }


def event_line(e: Event) -> bytes:
    return json.dumps({"task": e.task, "id": e.id, "x": [round(float(v), 5) for v in e.x], "y": e.y}).encode()


def daemon_main(args: argparse.Namespace) -> int:
    from lifelong.tools.broker import EmbeddedBroker

    sys.path.insert(0, str(Path(__file__).parent))
    work = Path(tempfile.mkdtemp(prefix="lifelong-scale-"))
    with EmbeddedBroker(log=work / "tansu.log") as broker:
        rows = {kind: daemon_run(kind, args, broker, work) for kind in ("few", "many")}
    print(f"lifelong run through the embedded broker, {args.events:,} events, default configuration")
    cols = ("tasks", "events/s", "RSS MiB", "ckpts", "<=1s", "mean s", "B/task", "SIGTERM s", "ready s")
    print("".join(f"{c:>11}" for c in ("stream", *cols)))
    for kind, r in rows.items():
        vals = (
            f"{r['tasks']:,.0f}",
            f"{r['events_per_s']:,.0f}",
            f"{r['peak_rss_mib']:,.0f}",
            f"{r['checkpoints']:.0f}",
            f"{r['checkpoints_within_1s']:.0f}",
            f"{r['checkpoint_mean_s']:.2f}",
            f"{r['bytes_per_task_written']:,.0f}",
            f"{r['sigterm_s']:.1f}",
            f"{r['restart_ready_s']:.1f}",
        )
        print("".join(f"{v:>11}" for v in (kind, *vals)))
    ratio = rows["many"]["events_per_s"] / rows["few"]["events_per_s"]
    print(f"many/few events/s: {ratio:.2f} (target >= 0.7)")
    save(args.out, "scale-daemon", {"streams": [{"stream": k, **r} for k, r in rows.items()], "many_over_few": ratio})
    if args.restarts > 1:
        for kind, r in rows.items():
            print(f"{kind}: restarts to /readyz 200 (s): {' '.join(f'{s:.1f}' for s in r['restarts'])}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, help="default 1,000,000 (engine), 400,000 (--daemon)")
    ap.add_argument("--many", type=int, help="default 350,000 (engine), 200,000 (--daemon)")
    ap.add_argument("--few", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resident", type=int, default=EngineConfig.max_resident_tasks, help="engine.max_resident_tasks")
    ap.add_argument("--daemon", action="store_true", help="lifelong run through the embedded broker")
    ap.add_argument("--restarts", type=int, default=1, help="with --daemon: restarts timed after each run")
    ap.add_argument("--one", choices=("few", "many"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    args.events = args.events or (400_000 if args.daemon else 1_000_000)
    args.many = args.many or (200_000 if args.daemon else 350_000)
    if args.daemon:
        return daemon_main(args)
    if args.one:
        print(json.dumps(one(args.one, args)))
        return 0
    rows = {}
    for kind in ("few", "many"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", kind], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    default = args.resident == EngineConfig.max_resident_tasks
    setting = "default configuration" if default else f"engine.max_resident_tasks {args.resident:,}"
    print(f"engine, {args.events:,} events, {setting}")
    print(f"{'stream':<8}{'tasks':>10}{'events/s':>12}{'peak RSS MiB':>14}")
    for kind, r in rows.items():
        print(f"{kind:<8}{r['tasks']:>10,}{r['events_per_s']:>12,.0f}{r['peak_rss_mib']:>14,.0f}")
    ratio = rows["many"]["events_per_s"] / rows["few"]["events_per_s"]
    print(
        f"many/few events/s: {ratio:.2f} (target >= 0.8); many peak RSS {rows['many']['peak_rss_mib']:,.0f} MiB "
        f"(target <= 1536)"
    )
    save(args.out, "scale", {"streams": [{"stream": k, **r} for k, r in rows.items()], "many_over_few": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
