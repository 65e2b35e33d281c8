"""Scale-out's per-partition steps (``replicas.ScaleOut``) with an in-memory sink: no broker."""

from __future__ import annotations

from types import SimpleNamespace

from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from lifelong.config import load_config
from lifelong.engine import Engine
from lifelong.metrics import Metrics
from lifelong.replicas import ScaleOut, Standalone
from lifelong.sink import Sink

from conftest import make_stream


class Changelog(Sink):
    """Keeps changelog records as (task, partition, position)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.records: list[tuple[str, int, int]] = []

    def _send(self, topic, value, key, partition=None, headers=None, where=None):
        if topic == self.cfg.kafka.changelog_topic:
            self.records.append((key.decode(), partition, int(dict(headers)["position"])))


def replica():
    cfg = load_config(env={}, overrides={"engine.dim": 3, "kafka.changelog_topic": "cl", "kafka.knowledge_topic": "kb"})
    engine = Engine(cfg.engine, cfg.labels)
    tp = [TopicPartition(cfg.kafka.events_topic, p) for p in (0, 1)]
    events = make_stream(n_tasks=4, per_task=5, dim=3, ends=False)
    engine.process(events)
    daemon = SimpleNamespace(
        cfg=cfg,
        engine=engine,
        sink=Changelog(cfg),
        positions={tp[0]: 40, tp[1]: 7},
        assigned=list(tp),
        metrics=Metrics(CollectorRegistry()),
    )
    r = ScaleOut(daemon)  # type: ignore[arg-type]
    names = sorted({e.task for e in events})
    sources = [SimpleNamespace(partition=names.index(e.task) % 2) for e in events]  # tasks 0, 2 on 0; 1, 3 on 1
    r.learned(events, sources)
    return r, daemon, names


def test_the_changelog_step_sends_each_changed_task_once_at_its_partitions_position():
    r, daemon, names = replica()
    r.floor = {names[1]: 9}  # restored from a record newer than partition 1's position
    r.changelog()
    assert sorted(daemon.sink.records) == sorted(
        [(names[0], 0, 40), (names[2], 0, 40), (names[1], 1, 9), (names[3], 1, 7)]
    )
    assert r.changed == set() and r.floor == {names[1]: 9}  # still above its partition's position
    daemon.sink.records.clear()
    r.changelog()
    assert daemon.sink.records == []  # nothing changed since


def test_a_partition_given_up_is_not_written_by_this_replica_and_its_tasks_are_foreign():
    r, daemon, names = replica()
    lost = daemon.assigned[1:]
    daemon.assigned = daemon.assigned[:1]
    r.dropped(lost)
    assert r.changed == {names[0], names[2]}
    r.changelog()
    assert sorted(t for t, _, _ in daemon.sink.records) == [names[0], names[2]]
    index = daemon.engine.tasks.index
    assert r.foreign_tasks() == {index[names[1]], index[names[3]]}
    assert r.extra()["task_partition"] == {names[0]: 0, names[1]: 1, names[2]: 0, names[3]: 1}


def test_a_standalone_replica_has_no_changelog_step_and_no_foreign_tasks():
    r = Standalone(SimpleNamespace())  # type: ignore[arg-type]
    assert r.changelog is None and r.foreign_tasks() == set() and r.extra() == {} and not r.shared
