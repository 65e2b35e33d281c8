"""``lifelong demo``: an embedded broker, a built-in related-task stream, the daemon, live progress, a summary."""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from lifelong.config import Config, load_config
from lifelong.core.tasks import STAT
from lifelong.core.warmup import warm_up
from lifelong.service.daemon import Daemon
from lifelong.tools.broker import EmbeddedBroker, free_port
from lifelong.tools.generate import stream

BAD_PAYLOADS = [
    b"not json",
    b"\xff\xfe",
    b'{"task": "", "x": [1]}',
    b'{"task": "t", "x": [1, 2], "y": 1}',
    b'{"task": "t", "control": "pause"}',
    b'{"task": "t", "x": "oops", "y": 0}',
]


def _produce(bootstrap: str, topic: str, events: list[dict[str, Any]], rate: float, stop: threading.Event) -> None:
    """Send the stream at ``rate`` events/s, with an invalid payload now and then (they go to the DLQ)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    rng = random.Random(0)  # noqa: S311 - a demo stream, not security
    start = time.monotonic()
    for i, e in enumerate(events):
        if stop.is_set():
            break
        producer.send(topic, key=e["task"].encode(), value=json.dumps(e, separators=(",", ":")).encode())
        if rng.random() < 0.002:
            producer.send(topic, key=b"bad", value=rng.choice(BAD_PAYLOADS))
        ahead = (i + 1) / rate - (time.monotonic() - start)
        if ahead > 0.01:
            time.sleep(ahead)
    producer.flush()
    producer.close()


def _snapshot(d: Daemon) -> dict[str, float]:
    with d.lock:
        e = d.engine
        n = e.n_tasks
        st = e.residency.stats_total().tolist()  # every task, resident or in the task store
        reg = e.regrets() if n else None
        labelled = max(1, e.counters["learned"])
        return {
            "processed": sum(d.positions.values()),
            "learned": e.counters["learned"],
            "error": st[STAT["errors"]] / labelled,
            "error_local": st[STAT["errors_local"]] / labelled,
            "error_kb": st[STAT["errors_kb"]] / labelled,
            "early": st[STAT["early_errors"]] / max(1.0, st[STAT["early_n"]]),
            "early_local": st[STAT["early_errors_local"]] / max(1.0, st[STAT["early_n"]]),
            "regret": float(reg["top"].sum()) if reg else 0.0,
            "bound": float(reg["top_bound"].sum()) if reg else 0.0,
            "kb_regret": float(reg["kb"].sum()) if reg else 0.0,
            "kb_bound": float(reg["kb_bound"].sum()) if reg else 0.0,
            "kb": e.kb.size,
            "tasks": n,
            "dead": d.dead_lettered,
            "lag": sum(d.status().lag.values()),
        }


def _config(bootstrap: str, work: Path, port: int) -> Config:
    """The demo's daemon: the embedded broker, its own topics and group, state under ``work``."""
    return load_config(
        env={},
        overrides={
            "kafka.bootstrap_servers": bootstrap,
            "kafka.session_timeout_ms": 6000,
            "kafka.events_topic": "demo-events",
            "kafka.predictions_topic": "demo-predictions",
            "kafka.dead_letter_topic": "demo-dlq",
            "kafka.group_id": "lifelong-demo",
            "engine.dim": 20,
            "checkpoint.dir": str(work / "state"),
            "checkpoint.interval_s": 2.0,
            "metrics.host": "127.0.0.1",
            "metrics.port": port,
            "shutdown_grace_s": 10.0,
        },
    )


HEADER = (
    f"{'time':>5} {'learned':>8} {'ev/s':>7} {'lag':>6} {'error':>7} {'task lvl':>8} {'KB':>4} "
    f"{'regret':>8} {'bound':>8}  (error: lifelong vs its task level; regret: sum over tasks)"
)


def _progress(s: dict[str, Any], elapsed: float, rate: float) -> str:
    """One line of live progress under ``HEADER``."""
    return (
        f"{elapsed:>4.0f}s {s['learned']:>8} {rate:>7,.0f} {s['lag']:>6} {s['error']:>7.4f} "
        f"{s['error_local']:>8.4f} {s['kb']:>4} {s['regret']:>8.2f} {s['bound']:>8.2f}"
    )


def _summary(say: Callable[[str], None], s: dict[str, Any], elapsed: float) -> None:
    """The table printed when the stream is done."""
    say("")
    say("summary (prequential: every event predicted before its label was learned)")
    say(f"  {'events learned':<34}{s['learned']:>12,}")
    say(f"  {'tasks / KB members':<34}{s['tasks']:>7} / {s['kb']:<4}")
    say(f"  {'dead-lettered (bad payloads)':<34}{s['dead']:>12}")
    say(f"  {'wall time (incl. group join)':<34}{elapsed:>11.1f}s")
    say(f"  {'':<34}{'error':>12}{'first 20/task':>15}")
    say(f"  {'lifelong (two levels)':<34}{s['error']:>12.4f}{s['early']:>15.4f}")
    say(f"  {'task level (warm-started)':<34}{s['error_local']:>12.4f}{s['early_local']:>15.4f}")
    say(f"  {'knowledge base only':<34}{s['error_kb']:>12.4f}")
    say(f"  {'regret vs better level (sum)':<34}{s['regret']:>12.2f}  bound {s['bound']:.2f}")
    say(f"  {'KB regret vs best member (sum)':<34}{s['kb_regret']:>12.2f}  bound {s['kb_bound']:.2f}")


def run_demo(
    tasks: int = 300,
    events_per_task: int = 100,
    rate: float = 5000.0,
    keep_running: bool = False,
    metrics_port: int | None = None,
    timeout: float = 110.0,
    out: Any = sys.stdout,
) -> int:
    """Run the demo; returns the exit code. Everything listens on 127.0.0.1 only."""

    def say(msg: str, end: str = "\n") -> None:
        print(msg, file=out, flush=True, end=end)

    work = Path(tempfile.mkdtemp(prefix="lifelong-demo-"))
    broker = EmbeddedBroker(log=work / "broker.log").start()
    port = metrics_port or free_port()
    cfg = _config(broker.bootstrap, work, port)
    events = list(stream("related", n_tasks=tasks, events=events_per_task, seed=int(time.time()) % 1000))
    total_x = sum(1 for e in events if "x" in e)
    daemon = Daemon(cfg)
    result: dict[str, int] = {}
    runner = threading.Thread(target=lambda: result.update(code=daemon.run()), name="lifelong-daemon")
    stop_producer = threading.Event()
    producer = threading.Thread(
        target=_produce, args=(broker.bootstrap, cfg.kafka.events_topic, events, rate, stop_producer), daemon=True
    )
    say(
        f"lifelong demo: broker tansu on {broker.bootstrap}, {tasks} related tasks x {events_per_task} events "
        f"({len(events)} events at {rate:,.0f}/s), state in {work}"
    )
    say(f"metrics: http://127.0.0.1:{daemon.http.port}/metrics   health: /healthz /readyz")
    say("compiling the engine (about 15 s on the first run after an install, then cached) ...", end=" ")
    say(f"done in {warm_up(cfg.engine, cfg.labels):.1f} s")
    say(HEADER)
    t0 = time.monotonic()
    runner.start()
    producer.start()
    code = 0
    try:
        last, last_t = 0.0, t0
        while True:
            time.sleep(1.0)
            s = _snapshot(daemon)
            now = time.monotonic()
            rate_now = (s["processed"] - last) / (now - last_t)
            last, last_t = s["processed"], now
            if not daemon.ready()[0] and not s["processed"]:
                say(f"{now - t0:>4.0f}s joining the consumer group ...")
                continue
            say(_progress(s, now - t0, rate_now))
            if daemon.engine.counters["predicted"] >= total_x and not producer.is_alive():
                break
            if not runner.is_alive() or now - t0 > timeout:
                say("the daemon stopped early" if not runner.is_alive() else f"timed out after {timeout:.0f}s")
                code = 1
                break
        s = _snapshot(daemon)
        elapsed = time.monotonic() - t0
        _summary(say, s, elapsed)
        if keep_running and code == 0:
            url = f"http://127.0.0.1:{daemon.http.port}/metrics"
            say(f"\nstill running: {url} (broker {broker.bootstrap}); Ctrl-C to stop")
            while runner.is_alive():
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop_producer.set()
        daemon.stop()
        runner.join(cfg.shutdown_grace_s + 5)
        broker.stop()
    return code or result.get("code", 1)
