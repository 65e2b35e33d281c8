"""A whole daemon on an in-memory log (source and sink passed in): no broker, a few seconds."""

from __future__ import annotations

import json
from typing import Any

from kafka import TopicPartition

from lifelong.config import load_config
from lifelong.tools.broker import free_port

from fakes import FakeSource, MemorySink, Rec, rec, wait
from kafka_helpers import ThreadDaemon

TP0 = TopicPartition("ev", 0)


def test_a_daemon_on_an_in_memory_log_predicts_each_event_once_across_a_restart(tmp_path, monkeypatch):
    """The whole loop with the source and sink passed in: every valid event predicted once, in order, the bad
    one dead-lettered with its reason; at SIGTERM a checkpoint and the group commit; a new daemon on that
    checkpoint goes on from the committed offset with the state it left."""
    monkeypatch.setattr("lifelong.service.daemon.ensure_topics", lambda cfg: None)  # no broker to create topics on
    monkeypatch.setattr("lifelong.service.replicas.committed_offsets", lambda cfg: {})
    overrides = {"engine.dim": 2, "kafka.events_topic": "ev", "kafka.knowledge_topic": "", "kafka.changelog_topic": ""}
    cfg = load_config(env={}, overrides={**overrides, "checkpoint.dir": str(tmp_path), "metrics.port": free_port()})
    log = {TP0: [rec(0, i, f"t{i % 3}") for i in range(40)]}
    log[TP0][7] = Rec("ev", 0, 7, b"not json")
    group: dict[TopicPartition, int] = {}  # the group's committed offsets

    def serve(n: int) -> tuple[MemorySink, Any]:
        sink = MemorySink(cfg)

        def source(cfg, on_assign, on_revoke, on_lost):
            src = FakeSource(cfg, log, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
            src.group_committed, src.rebalance = group, [TP0]
            return src

        with ThreadDaemon(cfg, source=source, sink=lambda cfg: sink) as daemon:
            wait(lambda: len(sink.topics[cfg.kafka.predictions_topic]) >= n, timeout=60)
        return sink, daemon

    def ids(sink):
        return [json.loads(v)["id"] for v, _ in sink.topics[cfg.kafka.predictions_topic]]

    sink, first = serve(39)
    assert ids(sink) == [f"t{i % 3}-0-{i}" for i in range(40) if i != 7]
    ((payload, headers),) = sink.topics[cfg.kafka.dead_letter_topic]
    assert payload == b"not json" and b"not JSON" in headers["error"] and headers["source_offset"] == b"7"
    assert group == {TP0: 40} and list(tmp_path.glob("checkpoint-*.ckpt"))
    log[TP0] += [rec(0, i, f"t{i % 3}") for i in range(40, 60)]
    sink, second = serve(20)
    assert ids(sink) == [f"t{i % 3}-0-{i}" for i in range(40, 60)]  # nothing before the commit again
    assert second.engine.events_seen == first.engine.events_seen + 20 == 59 and group == {TP0: 60}
