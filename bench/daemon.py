"""End-to-end daemon throughput and latency through a real broker (embedded tansu on loopback).

    python bench/daemon.py [--events 150000] [--clients kafka-python confluent] [--latency-rate R] [--out bench/results]

For each Kafka client (``kafka.client``), in one run:
1. Throughput on a backlog: the same pre-produced events are read by (a) a pass-through with that client
   (kafka-python + crc32c, or confluent-kafka) that consumes, decodes the JSON, produces a prediction-sized
   record per event and flushes and commits every 5 s (the daemon's checkpoint interval here), and (b)
   ``lifelong run`` (a subprocess, default configuration: scale-out topics on) with learning on. Each rate is
   taken from its own output records' timestamps (first to last), so group joins and start-up are excluded
   from both; each output is read once it is complete. Target: ratio >= 0.8.
2. Latency at half that daemon's maximum rate: events produced at that pace; latency = prediction record
   timestamp - event record timestamp (same clock, ms resolution); p50 and p99, once with the scale-out topics
   (each checkpoint then also writes every task changed since the last to the changelog) and once standalone.
   Target: p99 <= 100 ms. ``--latency-rate``: at R events/s instead (to compare two trees at one rate).
The broker shares this machine's cores with both clients: figures are for this 2-core machine. Events are
produced with librdkafka for both clients (a kafka-python producer would itself take most of a core at
30,000 events/s).
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

from lifelong.tools.broker import EmbeddedBroker, free_port
from lifelong.tools.generate import stream

from record import save

PREDICTION_SIZE = 330  # bytes of a typical binary prediction record
KINDS = ("scale-out", "standalone")  # latency runs: with the scale-out topics, and without
CHECKPOINT_S = 5.0  # the daemon's checkpoint interval, and the pass-through's flush-and-commit interval


def produce(bootstrap: str, topic: str, payloads: list[bytes], rate: float | None = None) -> None:
    """Send ``payloads`` (at ``rate`` events/s when given) with librdkafka: a load generator that leaves the
    machine's two cores to the broker and the replica (kafka-python would take most of one at 30,000/s)."""
    import confluent_kafka as ck

    producer = ck.Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all", "log_level": 3})
    start = time.monotonic()
    for i, p in enumerate(payloads):
        while True:
            try:
                producer.produce(topic, key=b"k", value=p)  # the record's timestamp: now
                break
            except BufferError:  # its queue is full: let it send
                producer.poll(0.01)
        if i % 1000 == 0:
            producer.poll(0)
        if rate and (ahead := (i + 1) / rate - (time.monotonic() - start)) > 0.002:
            time.sleep(ahead)
    producer.flush()


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


def wait_for(bootstrap: str, topic: str, n: int, timeout: float = 300.0) -> None:
    """Wait until ``topic`` holds ``n`` records, without reading them: a reader running alongside a replica
    takes the CPU it needs (600,000 events with confluent: 47,000 events/s read as they come, 60,000 read
    after). tansu reports end offsets a few records short: end offsets unchanged for 3 s also end the wait."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        total = sum(consumer.end_offsets(parts).values()) if parts else 0
        if total >= n or (total == last > 0 and time.monotonic() - since > 3.0):
            break
        if total != last:
            last, since = total, time.monotonic()
        time.sleep(0.5)
    consumer.close()


def pass_through(client: str, bootstrap: str, source: str, sink: str, n: int, commit_every: float) -> float:
    """Consume, decode, produce one prediction-sized record per event; flush and commit every
    ``commit_every`` seconds, as the daemon checkpoints; events/s."""
    if client == "confluent":
        return confluent_pass_through(bootstrap, source, sink, n, commit_every)
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


def confluent_pass_through(bootstrap: str, source: str, sink: str, n: int, commit_every: float) -> float:
    import confluent_kafka as ck

    consumer = ck.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "pass-through-confluent",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "log_level": 3,
        }
    )
    consumer.subscribe([source])
    producer = ck.Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all", "log_level": 3})
    filler = "x" * PREDICTION_SIZE
    seen, last_commit = 0, time.monotonic()
    while seen < n:
        msgs = [m for m in consumer.consume(1024, 0.5) if m.error() is None]
        for m in msgs:
            e = json.loads(m.value())
            out = json.dumps({"task": e["task"], "id": e.get("id"), "pad": filler[: PREDICTION_SIZE - 60]})
            producer.produce(sink, key=e["task"].encode(), value=out.encode())
        producer.poll(0)
        seen += len(msgs)
        if msgs and (seen >= n or time.monotonic() - last_commit >= commit_every):
            producer.flush()
            consumer.commit(asynchronous=False)
            last_commit = time.monotonic()
    consumer.close()
    producer.flush()
    return rate_of(read_all(bootstrap, sink, n))


def rate_of(records: list) -> float:
    ts = sorted(r.timestamp for r in records)
    return (len(ts) - 1) / max(1e-3, (ts[-1] - ts[0]) / 1000)


def kafka_section(bootstrap: str, tag: str, shared: bool = True, client: str = "kafka-python") -> dict[str, object]:
    """The ``kafka`` section of a benchmark replica's configuration: topics and group named after ``tag``."""
    return {
        "client": client,
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
    client: str = "kafka-python",
) -> subprocess.Popen:
    """``lifelong run`` on topics named after ``tag`` (scale-out topics unless ``shared`` is False); its
    stderr goes to ``work/<tag>.log``."""
    cfg = {
        "kafka": kafka_section(bootstrap, tag, shared, client),
        "engine": {"dim": 20},
        "checkpoint": {"dir": str(state or work / f"state-{tag}"), "interval_s": interval_s},
        "metrics": {"port": port or free_port()},
        "logging": {"level": "WARNING"},
    }
    path = work / f"{tag}.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    log = open(work / f"{tag}.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen([sys.executable, "-m", "lifelong", "run", "--config", str(path)], stderr=log)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(60)


def one_client(
    client: str, broker: EmbeddedBroker, payloads: list[bytes], work: Path, seconds: float, rate: float | None
) -> dict:
    n, tag = len(payloads), client.replace("-", "")
    produce(broker.bootstrap, f"ev-backlog-{tag}", payloads)
    base = pass_through(client, broker.bootstrap, f"ev-backlog-{tag}", f"pass-out-{tag}", n, CHECKPOINT_S)
    produce(broker.bootstrap, f"ev-tput{tag}", payloads)
    proc = start_daemon(broker.bootstrap, f"tput{tag}", work, client=client)
    try:
        wait_for(broker.bootstrap, f"pred-tput{tag}", n)
        daemon = rate_of(read_all(broker.bootstrap, f"pred-tput{tag}", n))
    finally:
        stop(proc)
    target = rate or 0.5 * daemon
    row = {"client": client, "events": n, "pass_through_events_per_s": base, "daemon_events_per_s": daemon}
    row.update({"ratio": daemon / base, "latency_rate_events_per_s": target})
    for kind in KINDS:
        lat = latency(client, broker, work, f"lat{tag}{kind[:5]}", target, seconds, shared=kind == "scale-out")
        row.update({f"{kind}_latency_p50_ms": float(np.percentile(lat, 50))})
        row.update({f"{kind}_latency_p99_ms": float(np.percentile(lat, 99)), f"{kind}_latency_events": len(lat)})
    return row


def latency(
    client: str, broker: EmbeddedBroker, work: Path, tag: str, rate: float, seconds: float, shared: bool
) -> np.ndarray:
    """Milliseconds from each event record to its prediction record, events produced at ``rate``."""
    proc = start_daemon(broker.bootstrap, tag, work, shared=shared, client=client)
    try:
        time.sleep(8)  # topic creation and group join
        m = int(rate * seconds)
        lat_payloads = [json.dumps(e).encode() for e in stream("related", n_tasks=m // 100 + 1, seed=1) if "x" in e][:m]
        m = len(lat_payloads)
        produce(broker.bootstrap, f"ev-{tag}", lat_payloads, rate=rate)
        events = {json.loads(r.value)["id"]: r.timestamp for r in read_all(broker.bootstrap, f"ev-{tag}", m)}
        preds = read_all(broker.bootstrap, f"pred-{tag}", m)
    finally:
        stop(proc)
    return np.array([r.timestamp - events[json.loads(r.value)["id"]] for r in preds], float)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=150000)
    ap.add_argument("--clients", nargs="+", default=["kafka-python", "confluent"])
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--latency-rate", type=float, default=None, help="events/s (default: half the daemon's rate)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    tasks = max(1, args.events // 100)
    payloads = [json.dumps(e).encode() for e in stream("related", n_tasks=tasks, events=100) if "x" in e]
    work = Path(tempfile.mkdtemp(prefix="lifelong-bench-"))
    with EmbeddedBroker(log=work / "tansu.log") as broker:
        results = [one_client(c, broker, payloads, work, args.latency_seconds, args.latency_rate) for c in args.clients]
    print(f"{len(payloads):,} events, dim 20, related tasks; events/s from output record timestamps")
    at = f"{args.latency_rate:,.0f} events/s" if args.latency_rate else "half the daemon's rate"
    print(f"latency p50/p99 ms at {at}, with the scale-out topics (as the throughput run) and without")
    head = f"{'client':<14}{'pass-through':>14}{'lifelong run':>14}{'ratio':>8}{'latency at':>14}"
    print(f"{head}{'scale-out':>12}{'standalone':>12}")
    for r in results:
        print(
            f"{r['client']:<14}{r['pass_through_events_per_s']:>14,.0f}{r['daemon_events_per_s']:>14,.0f}"
            f"{r['ratio']:>8.2f}{r['latency_rate_events_per_s']:>10,.0f} ev/s"
            + "".join(f"{r[f'{k}_latency_p50_ms']:>7.0f}/{r[f'{k}_latency_p99_ms']:<4.0f}" for k in KINDS)
        )
    print("targets: ratio >= 0.8 for each client; confluent lifelong run >= 35,000 events/s; p99 <= 100 ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save(out, "daemon", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
