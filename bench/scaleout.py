"""Scale-out figures through a real broker (embedded tansu on loopback), with `lifelong run` subprocesses.

    python bench/scaleout.py [--events 40000] [--tasks 1000] [--out bench/results]

1. Throughput of one and of two replicas in one group on the same backlog (4 partitions, events keyed by
   task, knowledge and changelog topics on): rate from the prediction records' timestamps, first to last.
2. Take-over: one replica learns ``--tasks`` tasks in 2 partitions and stops (SIGTERM: checkpoint, changelog,
   commit); a fresh replica with an empty state directory then gains both partitions. Reported: the
   restore time it logs (changelog read and task restore, summed over partitions) and the wall time from
   its start to /readyz answering 200 (Python start-up, KB catch-up and the group join included).
   Also the replicas' CPU time per event (all their threads, from /proc): what a replica costs per event
   whatever the cores, so what separate machines would add.
3. Changelog bytes per task: the mean record size (value + key + headers) in the changelog topic.
The broker and every replica share this machine's 2 cores: more replicas cannot add CPU here, so the
two-replica figure shows the cost of coordination, not the gain on separate machines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from lifelong.tools.broker import EmbeddedBroker, free_port
from lifelong.tools.generate import stream

sys.path.insert(0, str(Path(__file__).parent))
from daemon import kafka_section, rate_of, read_all  # noqa: E402
from record import save  # noqa: E402


def produce(bootstrap: str, topic: str, events: list[dict]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", batch_size=256 * 1024)
    for e in events:
        producer.send(topic, key=e["task"].encode(), value=json.dumps(e).encode())
    producer.flush()
    producer.close()


def start(bootstrap: str, tag: str, work: Path, name: str, partitions: int) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    cfg = {
        "kafka": {**kafka_section(bootstrap, tag), "partitions": partitions},
        "engine": {"dim": 20},
        "checkpoint": {"dir": str(work / f"state-{tag}-{name}"), "interval_s": 5.0},
        "metrics": {"port": port},
        "logging": {"level": "INFO", "json": True},
    }
    path = work / f"{tag}-{name}.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    log = work / f"{tag}-{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lifelong", "run", "--config", str(path)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, port, log


def ready(port: int) -> bool:
    return assigned(port) > 0


def assigned(port: int) -> int:
    """Partitions the replica holds and has taken over (0 while not ready)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return int(json.loads(r.read()).get("assigned", 0))
    except (OSError, ValueError):
        return 0


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(bootstrap: str, events: list[dict], replicas: int, work: Path) -> tuple[float, float]:
    """Events/s of the group, and the replicas' CPU milliseconds per event while they learned the backlog."""
    tag = f"r{replicas}"
    procs = [start(bootstrap, tag, work, f"{i}", 4) for i in range(replicas)]
    try:
        # the group has settled: every replica holds partitions, all 4 are taken
        wait(
            lambda: (
                [assigned(port) > 0 for _, port, _ in procs] == [True] * replicas
                and sum(assigned(port) for _, port, _ in procs) == 4
            ),
            120,
            "replicas ready",
        )
        time.sleep(2)
        cpu0 = sum(cpu_seconds(p.pid) for p, _, _ in procs)
        produce(bootstrap, f"ev-{tag}", events)
        rate = rate_of(read_all(bootstrap, f"pred-{tag}", len(events)))
        return rate, 1000 * (sum(cpu_seconds(p.pid) for p, _, _ in procs) - cpu0) / len(events)
    finally:
        for proc, _, _ in procs:
            proc.terminate()
            proc.wait(60)


def take_over(bootstrap: str, events: list[dict], work: Path) -> dict:
    tag = "takeover"
    proc, port, _ = start(bootstrap, tag, work, "first", 2)
    wait(lambda: ready(port), 120, "first replica ready")
    produce(bootstrap, f"ev-{tag}", events)
    read_all(bootstrap, f"pred-{tag}", len(events))
    proc.terminate()
    proc.wait(60)
    t0 = time.monotonic()
    proc, port, log = start(bootstrap, tag, work, "second", 2)
    try:
        wait(lambda: ready(port), 120, "second replica ready")
        wall = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    found = [
        re.search(r"restored (\d+) tasks .*, and (\d+) from newer .* in ([\d.]+)s", line)
        for line in log.read_text().splitlines()
    ]
    restores = [(int(m.group(1)) + int(m.group(2)), float(m.group(3))) for m in found if m]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    parts = [TopicPartition(f"cl-{tag}", p) for p in range(2)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    sizes: list[int] = []
    end = sum(consumer.end_offsets(parts).values())
    deadline = time.monotonic() + 60
    while len(sizes) < end and time.monotonic() < deadline:
        for rs in consumer.poll(timeout_ms=500).values():
            sizes.extend(len(r.value) + len(r.key or b"") + sum(len(k) + len(v) for k, v in r.headers) for r in rs)
    consumer.close()
    return {
        "tasks_restored": sum(n for n, _ in restores),
        "restore_s": sum(s for _, s in restores),
        "start_to_ready_s": wall,
        "changelog_records": len(sizes),
        "changelog_bytes_per_task": sum(sizes) / max(1, len(sizes)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=40000)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    events = [e for e in stream("related", n_tasks=max(1, args.events // 100), events=100) if "x" in e]
    few = [e for e in stream("related", n_tasks=args.tasks, events=20, seed=1) if "x" in e]
    work = Path(tempfile.mkdtemp(prefix="lifelong-scaleout-"))
    with EmbeddedBroker(log=work / "tansu.log") as broker:
        rates = {k: throughput(broker.bootstrap, events, k, work) for k in (1, 2)}
        over = take_over(broker.bootstrap, few, work)
    result = {
        "events": len(events),
        "events_per_s": {str(k): v[0] for k, v in rates.items()},
        "replica_cpu_ms_per_event": {str(k): v[1] for k, v in rates.items()},
        **over,
    }
    print(f"{len(events):,} events, 4 partitions, broker and replicas on the same 2 cores")
    print(f"{'replicas':<10}{'events/s':>10}{'replica CPU ms/event':>22}")
    for k, (rate, cpu) in rates.items():
        print(f"{k:<10}{rate:>10,.0f}{cpu:>22.3f}")
    print(
        f"\ntake-over of 2 partitions holding {over['tasks_restored']:,} tasks: restore "
        f"{over['restore_s']:.2f} s; process start to ready {over['start_to_ready_s']:.1f} s"
    )
    print(
        f"changelog: {over['changelog_records']:,} records, {over['changelog_bytes_per_task']:,.0f} bytes per task "
        f"record (dim 20, binary, EKF learner, KB capacity 64)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save(out, "scaleout", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
