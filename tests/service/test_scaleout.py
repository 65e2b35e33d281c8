"""Several `lifelong run` processes in one group on a real broker: kill -9, a replica added, one KB, tasks that
move with their state, and a knowledge topic that refuses what it was not built to read."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic

from lifelong.core.engine import Engine
from lifelong.core.events import to_dict
from lifelong.kafka.shared_topics import read_changelog
from lifelong.service import checkpoint
from lifelong.storage.wire import pack

from conftest import make_stream
from kafka_helpers import (
    ThreadDaemon,
    config,
    events_json,
    free_port,
    http_get,
    metric,
    produce,
    read_topic,
    settings,
    start_process,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow
PARTITIONS = 6


class Replica:
    def __init__(self, name: str, values: dict, tmp: Path):
        self.name = name
        self.values = {**values, "checkpoint.dir": str(tmp / name / "state"), "metrics.port": free_port()}
        (tmp / name).mkdir(exist_ok=True)
        self.log = tmp / name / "daemon.log"
        self.proc = start_process(write_config(self.values, tmp / name / "config.yaml"), self.log)

    @property
    def port(self) -> int:
        return self.values["metrics.port"]

    def ready(self) -> bool:
        return http_get(self.port, "/readyz")[0] == 200

    def assigned(self) -> int:
        status, body = http_get(self.port, "/readyz")
        return json.loads(body).get("assigned", 0) if status else 0

    def messages(self) -> list[str]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line)["msg"])
            except (ValueError, KeyError):
                continue
        return out


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        consumer.close()


def produce_slowly(
    bootstrap: str, topic: str, payloads: list[bytes], keys: list[bytes], chunks: int, pause: float
) -> threading.Thread:
    def run():
        step = -(-len(payloads) // chunks)
        for i in range(0, len(payloads), step):
            produce(bootstrap, topic, payloads[i : i + step], keys[i : i + step])
            time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_three_replicas_kill_9_a_new_one_and_a_restart_exactly_once_and_one_kb(broker, tmp_path, client):
    values = settings(
        broker.bootstrap,
        tmp_path,
        shared=True,
        **{
            "kafka.client": client,
            "kafka.partitions": PARTITIONS,
            "checkpoint.interval_s": 1.0,
            "batching.max_events": 100,
            "logging.json": True,
        },
    )
    cfg = config(values)
    events = make_stream(n_tasks=36, per_task=60, dim=3, block=10, ends=False, seed=7)
    payloads, keys = events_json([to_dict(e) for e in events]), [e.task.encode() for e in events]
    labelled = Counter(e.task for e in events if e.y is not None)
    replicas = [Replica(f"r{i}", values, tmp_path) for i in range(3)]
    try:
        wait_until(lambda: all(r.ready() for r in replicas), 90, interval=0.5, what="three replicas ready")
        feeder = produce_slowly(broker.bootstrap, cfg.kafka.events_topic, payloads, keys, chunks=30, pause=0.6)
        wait_until(
            lambda: (
                sum(metric(r.port, "lifelong_events_total", 'outcome="learned"') or 0 for r in replicas)
                > len(events) // 3
            ),
            60,
            what="a third of the stream",
        )
        victim = replicas[0]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        kept = []  # the victim's checkpoints with copies of their task-store snapshots (a restart prunes them)
        for i, path in enumerate(sorted((tmp_path / "r0" / "state").glob("checkpoint-*.ckpt"))):
            tensors, meta = checkpoint.read(path)
            copy = tmp_path / f"kept-{i}"
            shutil.copytree(path.parent / meta["store"], copy / meta["store"])
            kept.append((copy, tensors, meta))
        # the survivors take the victim's partitions over (from the changelog); then a new replica takes some
        # of theirs (handed over at a revoke checkpoint), and the victim comes back on its own, stale, disk
        wait_until(lambda: sum(r.assigned() for r in replicas[1:]) == PARTITIONS, 60, what="survivors take over")
        replicas.append(Replica("r3", values, tmp_path))
        wait_until(lambda: replicas[3].assigned() > 0, 60, what="the new replica gets partitions")
        replicas.append(Replica("r0", values, tmp_path))
        wait_until(lambda: replicas[4].assigned() > 0, 60, what="the restarted replica gets partitions")
        feeder.join(60)
        preds = read_topic(
            broker.bootstrap, cfg.kafka.predictions_topic, len(events), timeout=150, ids={e.id for e in events}
        )
        assert {json.loads(r.value)["id"] for r in preds} == {e.id for e in events}  # every event predicted
        live = replicas[1:]
        wait_until(lambda: all(r.ready() for r in live), 60, what="replicas ready")
        time.sleep(3.0)  # the last members reach every replica's knowledge log reader
        for r in live:
            r.proc.send_signal(signal.SIGTERM)
        assert [r.proc.wait(40) for r in live] == [0, 0, 0, 0]
    except BaseException:
        for r in replicas:  # what each replica did, for the failure's report
            print(f"--- {r.name} ({r.log})", *r.messages()[-60:], sep="\n")
        raise
    finally:
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.kill()

    # Exactly once across the group: the committed state of every task learned each labelled event once.
    engine = Engine(cfg.engine, cfg.labels)
    committed = committed_offsets(broker.bootstrap, cfg.kafka.group_id, cfg.kafka.events_topic)
    learned: dict[str, int] = {}
    for p, offset in committed.items():
        records, _ = read_changelog(cfg, p, offset, timeout_s=30)
        for task, (value, _) in records.items():
            meta, _ = engine.handover.decode_task(value, cfg.kafka.max_message_bytes)
            learned[task] = meta["n_labelled"]
    assert learned == dict(labelled)

    # The tasks that moved off the killed replica continue from its last committed checkpoint: a take-over
    # restored exactly the labelled counts and parameters that checkpoint holds for the partition.
    pattern = re.compile(
        r"partition \S+-(\d+): restored (\d+) tasks \((\d+) labels learned, state digest (\w+)\) "
        r"from the changelog at committed offset (\d+)"
    )
    matched = 0
    for r in replicas[1:4]:  # (the restarted victim's log holds its first life too)
        for msg in r.messages():
            m = pattern.search(msg)
            if not m or int(m.group(2)) == 0:
                continue
            p, n, labels, digest, offset = (
                int(m.group(1)),
                int(m.group(2)),
                int(m.group(3)),
                m.group(4),
                int(m.group(5)),
            )
            for copy, tensors, meta in kept:
                extra = meta["extra"]
                if [cfg.kafka.events_topic, p, offset] not in extra["offsets"]:
                    continue
                victim_engine = Engine(cfg.engine, cfg.labels, copy / "tasks")
                checkpoint.restore_engine(victim_engine, copy, tensors, meta)
                victim_engine.residency.recall()
                names = [
                    t
                    for t, q in extra["task_partition"].items()
                    if q == p and victim_engine.n_labelled[victim_engine.tasks.index[t]] > 0
                ]
                assert len(names) == n
                assert sum(victim_engine.n_labelled[victim_engine.tasks.index[t]] for t in names) == labels
                assert victim_engine.handover.digest(names) == digest
                matched += 1
    assert matched >= 1, "no take-over restored a partition from the killed replica's checkpoint"

    # One KB: every replica still running holds the same members, in the same slots, with the same parameters.
    finals = [checkpoint.load_engine(r.values["checkpoint.dir"], cfg) for r in replicas[1:]]
    first = finals[0]
    assert first.kb.size > 0
    for other in finals[1:]:
        assert other.kb.ids == first.kb.ids and other.kb.updated == first.kb.updated
        for k in first.kb.store:
            torch.testing.assert_close(other.kb.store[k], first.kb.store[k], rtol=0, atol=0)
        torch.testing.assert_close(other.kb.B, first.kb.B, rtol=0, atol=0)  # the same basis expert


def test_a_replica_forgets_the_tasks_of_partitions_it_no_longer_owns(broker, tmp_path):
    """After a rebalance, a task lives on its partition's owner only (memory and task store): the replica that
    gave the partition up drops it, the new owner restores it from the changelog."""
    values = settings(
        broker.bootstrap, tmp_path, shared=True, **{"kafka.partitions": 2, "engine.max_resident_tasks": 3}
    )
    cfg = config(values)
    events = make_stream(n_tasks=8, per_task=20, dim=3, ends=False, seed=5)
    with ThreadDaemon(cfg) as a:
        wait_until(lambda: len(a.assigned) == 2, 60, what="both partitions")
        produce(
            broker.bootstrap,
            cfg.kafka.events_topic,
            events_json([to_dict(e) for e in events]),
            [e.task.encode() for e in events],
        )
        wait_until(lambda: a.engine.counters["learned"] == len(events), 60, what="every event learned")
        assert a.engine.n_known == 8 and len(set(a.replica.task_partition.values())) == 2
        other = config({**values, "checkpoint.dir": str(tmp_path / "b"), "metrics.port": free_port()})
        with ThreadDaemon(other) as b:
            wait_until(lambda: len(a.assigned) == 1 and len(b.assigned) == 1, 90, what="one partition each")
            with a.lock, b.lock:
                kept, moved = set(a.replica.task_partition), set(b.replica.task_partition)
                assert kept and moved and not kept & moved and len(kept | moved) == 8
                assert {a.replica.task_partition[t] for t in kept} == {a.assigned[0].partition}
                assert a.engine.n_known == len(kept) and b.engine.n_known == len(moved)
                assert a.engine.residency.store.get(sorted(moved)) == [None] * len(moved)
                assert not moved & set(a.engine.tasks.index)


def test_malicious_knowledge_records_are_refused_and_counted(broker, tmp_path):
    values = settings(broker.bootstrap, tmp_path, shared=True, **{"kafka.max_message_bytes": 200_000})
    cfg = config(values)
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = [
        pickle.dumps(Boom()),  # pickle bytes: never unpickled
        pack("member", {"source": "x", "learned": 3}, {"w": torch.zeros(1, 7, 1), "b": torch.zeros(1, 1)}),
        b"LLW1" + (10**6).to_bytes(4, "big") + b"{}",  # a header that claims more than there is
        pack("member", {"source": "x", "learned": 3}, {"w": torch.zeros(1, 3, 1), "b": torch.zeros(1, 1)})
        + b"\0" * 300_000,
    ]  # huge
    reasons = {"not_lifelong": 1, "shape": 1, "malformed": 1, "too_large": 1}
    with ThreadDaemon(cfg) as d:
        wait_until(lambda: d.assigned, 60, what="assigned")
        produce(broker.bootstrap, cfg.kafka.knowledge_topic, bad)
        wait_until(
            lambda: (
                {r: metric(cfg.metrics.port, "lifelong_knowledge_refused_total", f'reason="{r}"') for r in reasons}
                == reasons
            ),
            30,
            what="one refusal of each kind",
        )
        produce(broker.bootstrap, cfg.kafka.events_topic, events_json([to_dict(e) for e in make_stream(dim=3)]))
        wait_until(lambda: d.engine.counters["learned"] > 100, 60, what="still learning")
        wait_until(lambda: d.engine.kb.size > 0, 30, what="members of its own tasks")  # the log still works
        assert "x" not in d.engine.kb.source
    assert not marker.exists()


def run_then_take_over(broker, tmp_path, commit_first_half: bool):
    """A replica learns a stream whose checkpoints stop committing (after the first half, or from the start);
    a new replica (empty disk) then takes its partitions over. Returns the stream and the new replica's
    per-task labelled counts, tasks restored and events learned."""
    values = settings(broker.bootstrap, tmp_path, shared=True, **{"kafka.partitions": 2})
    cfg = config(values)
    events = make_stream(n_tasks=6, per_task=40, dim=3, ends=False, seed=3)
    payloads, keys = events_json([to_dict(e) for e in events]), [e.task.encode() for e in events]
    half = len(events) // 2 if commit_first_half else 0

    def fail(*_, **__):
        raise RuntimeError("commit lost (the replica died between its checkpoint and the commit)")

    with ThreadDaemon(cfg) as d:
        wait_until(lambda: d.assigned, 60, what="assigned")
        if half:
            produce(broker.bootstrap, cfg.kafka.events_topic, payloads[:half], keys[:half])
            wait_until(lambda: sum(d.source.committed.values()) == half, 60, what="first half committed")
        d.source.commit, d.source.commit_async = fail, fail  # from now on, checkpoints never commit
        written = metric(cfg.metrics.port, "lifelong_changelog_bytes_total")
        produce(broker.bootstrap, cfg.kafka.events_topic, payloads[half:], keys[half:])
        wait_until(lambda: d.engine.counters["learned"] == len(events), 60, what="the rest learned")
        wait_until(
            lambda: metric(cfg.metrics.port, "lifelong_changelog_bytes_total") > written,
            30,
            what="changelog of an uncommitted checkpoint",
        )
    other = config({**values, "checkpoint.dir": str(tmp_path / "other"), "metrics.port": free_port()})
    with ThreadDaemon(other) as d2:
        wait_until(lambda: sum(d2.positions.values()) == len(events), 60, what="replayed to the end")
        time.sleep(1.5)  # /metrics bodies are rendered at most once a second
        restored = metric(other.metrics.port, "lifelong_tasks_restored_total")
        counts = {t: d2.engine.n_labelled[i] for t, i in d2.engine.tasks.index.items()}
        learned = d2.engine.counters["learned"]
    return events[half:], counts, restored, learned, Counter(e.task for e in events)


def test_changelog_records_of_a_checkpoint_that_never_committed_are_skipped(broker, tmp_path):
    # The committed versions are restored and the events after the commit learned again; using the newer,
    # uncommitted records as well would count those events twice.
    rest, counts, restored, learned, labelled = run_then_take_over(broker, tmp_path, commit_first_half=True)
    assert restored == 6
    assert counts == dict(labelled)
    assert learned == len(rest)


def test_a_task_whose_only_record_is_newer_than_the_commit_skips_what_it_holds(broker, tmp_path):
    # Nothing was ever committed (as after compaction removed the committed versions): each task's newest
    # record is restored, and replay skips the events it already holds.
    _, counts, restored, learned, labelled = run_then_take_over(broker, tmp_path, commit_first_half=False)
    assert restored == 6
    assert counts == dict(labelled)
    assert learned == 0


def test_a_changelog_with_fewer_partitions_than_the_events_topic_is_a_clear_error(broker, tmp_path, caplog):
    cfg = config(settings(broker.bootstrap, tmp_path, shared=True, **{"kafka.partitions": 3}))
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(cfg.kafka.events_topic, 3, 1), NewTopic(cfg.kafka.changelog_topic, 1, 1)])
    admin.close()
    runner = ThreadDaemon(cfg)
    with runner:
        runner.thread.join(30)
    assert runner.code == 1
    assert "has 1 partitions, fewer than the 3" in caplog.text
