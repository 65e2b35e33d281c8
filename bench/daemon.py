"""End-to-end daemon throughput and latency through a real broker (embedded tansu on loopback).

    python bench/daemon.py [--events 60000] [--out bench/results]

1. Throughput on a backlog: the same pre-produced events are read by (a) a pass-through with the same client
   (kafka-python + crc32c) that consumes, decodes the JSON, produces a prediction-sized record per event and
   flushes and commits every 5 s (the daemon's checkpoint interval here), and (b) ``lifelong run`` (a
   subprocess) with learning on. Each rate is taken from its own output
   records' timestamps (first to last), so group joins and start-up are excluded from both. Target: ratio >= 0.7.
2. Latency at half the daemon's maximum rate: events produced at that pace; latency = prediction record
   timestamp - event record timestamp (same clock, ms resolution); p50 and p99.
The broker shares this machine's cores with both clients: figures are for this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from lifelong.broker import EmbeddedBroker, free_port
from lifelong.generate import stream

PREDICTION_SIZE = 330  # bytes of a typical binary prediction record
CHECKPOINT_S = 5.0  # the daemon's checkpoint interval, and the pass-through's flush-and-commit interval


def produce(bootstrap: str, topic: str, payloads: list[bytes], rate: float | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", batch_size=256 * 1024)
    start = time.monotonic()
    for i, p in enumerate(payloads):
        producer.send(topic, key=b"k", value=p)
        if rate and (ahead := (i + 1) / rate - (time.monotonic() - start)) > 0.002:
            time.sleep(ahead)
    producer.flush()
    producer.close()


def read_all(bootstrap: str, topic: str, n: int, timeout: float = 300.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    deadline = time.monotonic() + timeout
    while topic not in consumer.topics():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no topic {topic}")
        time.sleep(0.2)
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    out: list = []
    while len(out) < n and time.monotonic() < deadline:
        for rs in consumer.poll(timeout_ms=500, max_records=10000).values():
            out.extend(rs)
    consumer.close()
    if len(out) < n:
        raise TimeoutError(f"{topic}: {len(out)} of {n} records after {timeout}s")
    return out


def pass_through(bootstrap: str, source: str, sink: str, n: int, commit_every: float) -> float:
    """Consume, decode, produce one prediction-sized record per event; flush and commit every
    ``commit_every`` seconds, as the daemon checkpoints; events/s."""
    consumer = KafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id="pass-through",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=1024,
        session_timeout_ms=6000,
    )
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    filler = "x" * PREDICTION_SIZE
    seen = 0
    offsets: dict = {}
    last_commit = time.monotonic()
    while seen < n:
        batch = consumer.poll(timeout_ms=500)
        for tp, records in batch.items():
            for r in records:
                e = json.loads(r.value)
                out = json.dumps({"task": e["task"], "id": e.get("id"), "pad": filler[: PREDICTION_SIZE - 60]})
                producer.send(sink, key=e["task"].encode(), value=out.encode())
            seen += len(records)
            offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
        if seen >= n or time.monotonic() - last_commit >= commit_every:
            producer.flush()
            consumer.commit(offsets)
            last_commit = time.monotonic()
    consumer.close()
    producer.close()
    return rate_of(read_all(bootstrap, sink, n))


def rate_of(records: list) -> float:
    ts = sorted(r.timestamp for r in records)
    return (len(ts) - 1) / max(1e-3, (ts[-1] - ts[0]) / 1000)


def kafka_section(bootstrap: str, tag: str, shared: bool = True) -> dict[str, object]:
    """The ``kafka`` section of a benchmark replica's configuration: topics and group named after ``tag``."""
    return {
        "bootstrap_servers": bootstrap,
        "events_topic": f"ev-{tag}",
        "predictions_topic": f"pred-{tag}",
        "dead_letter_topic": f"dlq-{tag}",
        "group_id": f"g-{tag}",
        "session_timeout_ms": 6000,
        "knowledge_topic": f"kb-{tag}" if shared else "",
        "changelog_topic": f"cl-{tag}" if shared else "",
    }


def start_daemon(
    bootstrap: str,
    tag: str,
    work: Path,
    shared: bool = True,
    state: Path | None = None,
    port: int | None = None,
    interval_s: float = CHECKPOINT_S,
) -> subprocess.Popen:
    """``lifelong run`` on topics named after ``tag`` (scale-out topics unless ``shared`` is False); its
    stderr goes to ``work/<tag>.log``."""
    cfg = {
        "kafka": kafka_section(bootstrap, tag, shared),
        "engine": {"dim": 20},
        "checkpoint": {"dir": str(state or work / f"state-{tag}"), "interval_s": interval_s},
        "metrics": {"port": port or free_port()},
        "logging": {"level": "WARNING"},
    }
    path = work / f"{tag}.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    log = open(work / f"{tag}.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen([sys.executable, "-m", "lifelong.cli", "run", "--config", str(path)], stderr=log)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=60000)
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    tasks = max(1, args.events // 100)
    payloads = [json.dumps(e).encode() for e in stream("related", n_tasks=tasks, events=100) if "x" in e]
    n = len(payloads)
    work = Path(tempfile.mkdtemp(prefix="lifelong-bench-"))
    with EmbeddedBroker(log=work / "tansu.log") as broker:
        produce(broker.bootstrap, "ev-backlog", payloads)
        base = pass_through(broker.bootstrap, "ev-backlog", "pass-out", n, CHECKPOINT_S)
        produce(broker.bootstrap, "ev-tput", payloads)
        proc = start_daemon(broker.bootstrap, "tput", work)
        try:
            daemon = rate_of(read_all(broker.bootstrap, "pred-tput", n))
        finally:
            stop(proc)
        target = 0.5 * daemon
        proc = start_daemon(broker.bootstrap, "lat", work)
        try:
            time.sleep(8)  # topic creation and group join
            m = int(target * args.latency_seconds)
            lat_payloads = [
                json.dumps(e).encode() for e in stream("related", n_tasks=m // 100 + 1, seed=1) if "x" in e
            ][:m]
            m = len(lat_payloads)
            produce(broker.bootstrap, "ev-lat", lat_payloads, rate=target)
            events = {json.loads(r.value)["id"]: r.timestamp for r in read_all(broker.bootstrap, "ev-lat", m)}
            preds = read_all(broker.bootstrap, "pred-lat", m)
        finally:
            stop(proc)
    lat = np.array([r.timestamp - events[json.loads(r.value)["id"]] for r in preds], float)
    result = {
        "events": n,
        "pass_through_events_per_s": base,
        "daemon_events_per_s": daemon,
        "ratio": daemon / base,
        "latency_rate_events_per_s": target,
        "latency_events": len(lat),
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
    }
    print(f"{'':<44}{'events/s':>10}")
    print(f"{'pass-through (consume+decode+produce+commit)':<44}{base:>10,.0f}")
    print(f"{'lifelong run (learning on)':<44}{daemon:>10,.0f}")
    print(f"{'ratio (target >= 0.7)':<44}{daemon / base:>10.2f}")
    print(
        f"\nlatency at {target:,.0f} events/s (half the daemon's maximum), {len(lat)} events: "
        f"p50 {result['latency_p50_ms']:.0f} ms, p99 {result['latency_p99_ms']:.0f} ms"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "daemon.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
