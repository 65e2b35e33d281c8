"""``KafkaSink`` without a broker: what a delivery failure reported by the client does at the next flush, and
which partition a keyed record goes to."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError, NotLeaderForPartitionError
from kafka.future import Future
from kafka.partitioner.default import DefaultPartitioner

from lifelong.config import load_config
from lifelong.kafka import sink as sink_module
from lifelong.kafka.sink import FlushTimeout, KafkaSink, KeyHashes, Sink, SinkError


class FakeProducer:
    """Hands out futures and settles them at ``flush``: the first ``fail`` sends fail, ``stuck`` times out."""

    def __init__(self):
        self.futures: list[Future] = []
        self.fail = 0
        self.stuck = False

    def send(self, topic, key=None, value=None, partition=None, headers=None):
        self.futures.append(Future())
        return self.futures[-1]

    def flush(self, timeout=None):
        if self.stuck:
            raise KafkaTimeoutError("still pending")
        for i, f in enumerate(self.futures):
            f.failure(NotLeaderForPartitionError()) if i < self.fail else f.success(None)
        self.futures = []


@pytest.fixture
def sink():
    s = KafkaSink.__new__(KafkaSink)  # no producer of its own: no broker to reach
    Sink.__init__(s, load_config(env={}))
    s.producer, s.produced, s.failed = FakeProducer(), 0, []
    return s


def test_a_prediction_that_was_not_delivered_fails_the_flush_and_the_next_flush_is_clean(sink):
    sink.predictions([(i, {"task": "t", "id": str(i)}) for i in range(3)])
    sink.producer.fail = 1
    with pytest.raises(SinkError, match="not delivered.*NotLeaderForPartition"):
        sink.flush(timeout=1)
    sink.producer.fail = 0
    sink.predictions([(0, {"task": "t", "id": "3"})])
    assert sink.flush(timeout=1) == 1


def test_a_dead_letter_that_was_not_delivered_is_counted_never_raised(sink):
    sink.dead_letter(b"junk", b"k", "not JSON", "events", 0, 7)
    sink.predictions([(0, {"task": "t", "id": "1"})])
    sink.producer.fail = 1
    assert sink.flush(timeout=1) == 2 and sink.dead_letter_failures == 1


def test_pending_deliveries_time_out_and_are_kept_for_the_next_flush(sink):
    sink.predictions([(0, {"task": "t", "id": "1"})])
    sink.producer.stuck = True
    with pytest.raises(FlushTimeout):
        sink.flush(timeout=1)
    sink.producer.stuck = False
    assert sink.flush(timeout=1) == 1


class Cluster:
    """The metadata a partitioner reads: ``parts`` partitions of topic ``t``."""

    def __init__(self, parts):
        self.parts = parts

    def topics(self):
        return {"t"}

    def partitions_for_topic(self, topic):
        return set(range(self.parts)) if topic == "t" else None

    def available_partitions_for_topic(self, topic):
        return self.partitions_for_topic(topic)


def test_keyed_records_go_where_every_kafka_client_sends_them_and_the_remembered_hashes_stay_bounded(monkeypatch):
    monkeypatch.setattr(sink_module, "HASHES_KEPT", 50)
    mine, default = KeyHashes(), DefaultPartitioner()
    keys = [f"user-{i}".encode() for i in range(120)] + [b"", b"a", b"ab", b"abc", "é-ü".encode()]
    for parts in (1, 3, 8):
        cluster = Cluster(parts)
        for k in keys * 2:  # the second round partly from the remembered hashes
            assert mine.partition("t", k, k, b"v", b"v", cluster) == default.partition("t", k, k, b"v", b"v", cluster)
            assert len(mine.hashes) <= 50
        assert parts > 1 or not mine.hashes  # one partition: every record goes there, no key is hashed
    assert mine.partition("t", None, None, b"v", b"v", Cluster(3)) in {0, 1, 2}  # no key: any partition
    with pytest.raises(ValueError, match="not found"):
        mine.partition("gone", b"k", b"k", b"v", b"v", Cluster(3))
