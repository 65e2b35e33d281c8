"""Scale-out's per-partition steps (``replicas.ScaleOut``) with an in-memory sink: no broker."""

from __future__ import annotations

import dataclasses
import threading
from types import SimpleNamespace

import pytest
import torch
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from lifelong.config import load_config
from lifelong.core.engine import Engine
from lifelong.errors import StateError
from lifelong.kafka.sink import Sink
from lifelong.service.metrics import Metrics
from lifelong.service.replicas import ScaleOut, Standalone

from conftest import make_stream

NO_REST = lambda took: None  # noqa: E731 - the checkpoint writer's rest, when a test has none


class Changelog(Sink):
    """Keeps changelog records as (task, partition, position)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.records: list[tuple[str, int, int]] = []

    def _send(self, topic, value, key, partition=None, headers=None, where=None):
        if topic == self.cfg.kafka.changelog_topic:
            self.records.append((key.decode(), partition, int(dict(headers)["position"])))

    def flush(self, timeout):
        return 0


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
    r.changelog_sink = daemon.sink
    names = sorted({e.task for e in events})
    sources = [SimpleNamespace(partition=names.index(e.task) % 2) for e in events]  # tasks 0, 2 on 0; 1, 3 on 1
    r.learned(events, sources)
    return r, daemon, names


def test_the_changelog_step_sends_each_changed_task_once_at_its_partitions_position():
    r, daemon, names = replica()
    r.floor = {names[1]: 9}  # restored from a record newer than partition 1's position
    send, _ = r.changelog()
    daemon.engine.process(make_stream(n_tasks=4, per_task=5, dim=3, seed=1, ends=False))  # the loop goes on
    assert daemon.sink.records == []  # sent by the checkpoint's writer
    send(1.0, NO_REST)
    assert sorted(daemon.sink.records) == sorted(
        [(names[0], 0, 40), (names[2], 0, 40), (names[1], 1, 9), (names[3], 1, 7)]
    )
    assert r.changed == set() and r.floor == {names[1]: 9}  # still above its partition's position
    daemon.sink.records.clear()
    r.changelog()[0](1.0, NO_REST)
    assert daemon.sink.records == []  # nothing changed since


def test_the_changelog_step_sends_the_tasks_as_they_were_when_taken():
    r, daemon, names = replica()
    expected = daemon.engine.handover.export_tasks(
        names, [{"partition": i % 2, "position": (40, 7)[i % 2]} for i in range(4)]
    )
    sent = []
    daemon.sink._send = lambda topic, value, key, **kw: sent.append((key.decode(), value))
    send, _ = r.changelog()
    learned = [dataclasses.replace(e, id=f"more-{e.id}") for e in make_stream(n_tasks=4, per_task=5, dim=3, seed=1)]
    daemon.engine.process(learned)  # the same tasks learn more before the writer sends
    send(1.0, NO_REST)
    assert sorted(sent) == sorted(zip(names, expected, strict=True))


def test_the_changelog_is_sent_a_chunk_at_a_time_with_a_rest_after_each(monkeypatch):
    monkeypatch.setattr("lifelong.service.replicas.CHANGELOG_CHUNK", 3)
    r, daemon, names = replica()
    rests: list[tuple[int, float]] = []
    send, _ = r.changelog()
    send(1.0, lambda took: rests.append((len(daemon.sink.records), took)))
    assert [n for n, _ in rests] == [3, 4]  # 4 tasks: a rest after 3 were sent, then after the fourth
    assert all(0 < took < 1 for _, took in rests)  # the work each rest follows, not the rests before it


def test_a_changelog_step_taken_back_leaves_its_tasks_changed():
    r, _, names = replica()
    _, undo = r.changelog()
    r.changed.add("later")
    undo()
    assert r.changed == {*names, "later"}


def test_a_partition_given_up_is_not_written_by_this_replica_and_its_tasks_are_foreign():
    r, daemon, names = replica()
    lost = daemon.assigned[1:]
    daemon.assigned = daemon.assigned[:1]
    r.dropped(lost)
    assert r.changed == {names[0], names[2]}
    r.changelog()[0](1.0, NO_REST)
    assert sorted(t for t, _, _ in daemon.sink.records) == [names[0], names[2]]
    index = daemon.engine.tasks.index
    assert r.foreign_tasks() == {index[names[1]], index[names[3]]}
    assert r.extra()["task_partition"] == {names[0]: 0, names[1]: 1, names[2]: 0, names[3]: 1}


def test_a_standalone_replica_has_no_changelog_step_and_no_foreign_tasks():
    r = Standalone(SimpleNamespace())  # type: ignore[arg-type]
    assert r.changelog is None and r.foreign_tasks() == set() and r.extra() == {} and r.publisher is None


class Members(Sink):
    """Keeps knowledge records' values."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.values: list[bytes] = []

    def _send(self, topic, value, key, partition=None, headers=None, where=None):
        if topic == self.cfg.kafka.knowledge_topic:
            self.values.append(value)


def test_members_read_back_from_the_knowledge_log_join_as_decoded_without_being_decoded(monkeypatch):
    overrides = {"engine.dim": 3, "kafka.changelog_topic": "cl", "kafka.knowledge_topic": "kb"}
    cfg = load_config(env={}, overrides={**overrides, "engine.publish_every": 8, "engine.snapshot_every": 4})
    here, other, reader = (Engine(cfg.engine, cfg.labels) for _ in range(3))
    tp = TopicPartition(cfg.kafka.events_topic, 0)
    daemon = SimpleNamespace(cfg=cfg, engine=here, sink=Members(cfg), positions={tp: 0}, assigned=[tp])
    daemon.metrics, daemon.lock, daemon.dirty = Metrics(CollectorRegistry()), threading.RLock(), False
    r = ScaleOut(daemon)  # type: ignore[arg-type]
    theirs: list = []
    here.publisher, other.publisher = r.publisher, theirs.extend
    for engine, seed in ((here, 0), (other, 1)):
        engine.process([dataclasses.replace(e, task=f"{seed}-{e.task}") for e in make_stream(4, 8, dim=3, seed=seed)])
    theirs = other.kb.encode(theirs)
    r.changelog_sink = daemon.sink
    r.learned([], [])  # sends this replica's members
    ours = daemon.sink.values
    assert len(ours) == len(r.sent) > 0 and theirs
    log = [SimpleNamespace(value=v, offset=i) for i, v in enumerate(theirs[:2] + ours + theirs[2:])]
    r.knowledge = SimpleNamespace(poll=lambda timeout_s=0.0: [log.pop(0) for _ in range(len(log))], offset=0)
    decoded = []
    decode = here.kb.decode
    monkeypatch.setattr(here.kb, "decode", lambda data, limit: decoded.append(data) or decode(data, limit))
    r.read_knowledge()
    assert decoded == theirs and not r.sent  # only the other replica's members were decoded
    reader.apply([reader.kb.decode(v, cfg.kafka.max_message_bytes) for v in theirs[:2] + ours + theirs[2:]])
    assert here.kb.ids == reader.kb.ids and here.kb.source == reader.kb.source
    for k, v in reader.kb.store.items():
        assert torch.equal(here.kb.store[k], v)


def test_a_standalone_replica_without_state_refuses_committed_offsets_unless_told_to_start_empty(monkeypatch, caplog):
    cfg = load_config(env={}, overrides={"engine.dim": 3})
    monkeypatch.setattr("lifelong.service.replicas.committed_offsets", lambda cfg: {0: 42})
    daemon = SimpleNamespace(cfg=cfg, restored=False, reset_state=False)
    with pytest.raises(StateError, match="--reset-state"):
        Standalone(daemon).check_state()  # type: ignore[arg-type]
    daemon.reset_state = True
    Standalone(daemon).check_state()  # type: ignore[arg-type]
    assert "starting with an empty engine from the committed offsets {0: 42}" in caplog.text
    daemon.restored = True
    caplog.clear()
    Standalone(daemon).check_state()  # type: ignore[arg-type]
    assert caplog.text == ""
