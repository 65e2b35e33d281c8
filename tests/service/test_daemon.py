"""The daemon against a real broker (tansu on a free loopback port): the commit protocol, crashes,
signals, outages, bad input, slow learning, delayed labels and the demo."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from lifelong.core.engine import Engine
from lifelong.core.events import Schema, decode, to_dict
from lifelong.errors import InvalidEvent
from lifelong.kafka.factory import open_sink
from lifelong.kafka.sink import FlushTimeout
from lifelong.service import checkpoint
from lifelong.tools.broker import EmbeddedBroker

from conftest import make_stream
from kafka_helpers import (
    ThreadDaemon,
    config,
    events_json,
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


def stream_payloads(n_tasks=6, per_task=40, delayed=0.0, seed=0) -> list[bytes]:
    events = make_stream(n_tasks=n_tasks, per_task=per_task, dim=3, delayed=delayed, seed=seed)
    return events_json([to_dict(e) for e in events])


def offline_engine(cfg, payloads: list[bytes]) -> Engine:
    """The uninterrupted reference: the same payloads, in order, through one engine."""
    schema = Schema(cfg.engine.dim, cfg.engine.task, cfg.engine.n_classes, cfg.engine.target_range)
    engine = Engine(cfg.engine, cfg.labels)
    events = []
    for p in payloads:
        with contextlib.suppress(InvalidEvent):
            events.append(decode(p, schema))
    for i in range(0, len(events), 97):
        engine.process(events[i : i + 97])
    return engine


def assert_same_state(a: Engine, b: Engine) -> None:
    for engine in (a, b):  # tasks beyond max_resident_tasks, or not met since a restart, are in the task store
        engine.residency.recall(), engine.settle()
    assert sorted(a.tasks.names) == sorted(b.tasks.names)
    rows = [a.tasks.index[name] for name in b.tasks.names]
    assert a.n_labelled[rows].tolist() == b.n_labelled.tolist()  # every labelled event learned exactly once
    assert a.counters["learned"] == b.counters["learned"]
    assert a.kb.ids == b.kb.ids
    for key in a.tasks.cols:
        torch.testing.assert_close(a.tasks.cols[key][rows], b.tasks.cols[key][: b.n_tasks], rtol=1e-5, atol=1e-5)
    for name, p in a.learners.params.items():
        torch.testing.assert_close(p[rows], b.learners.params[name][: b.n_tasks], rtol=1e-4, atol=1e-5)


def test_end_to_end_predictions_dead_letters_and_metrics(broker, tmp_path, client):
    values = settings(broker.bootstrap, tmp_path, **{"kafka.max_message_bytes": 10_000, "kafka.client": client})
    cfg = config(values)
    good = stream_payloads(delayed=0.2)
    bad = [
        b"not json",
        b"\xff\xfe",
        b'{"task": "t", "x": [1, 2], "y": 1}',
        b'{"task": "t", "x": [1, NaN, 2], "y": 1}',
        b'{"x": [1, 2, 3], "y": 1}',
        b'{"task": "t", "control": "pause"}',
        b"{" + b" " * 20_000 + b"}",
    ]
    payloads = good[:50] + bad + good[50:]
    with ThreadDaemon(cfg):
        wait_until(lambda: topic_exists(broker, cfg.kafka.events_topic), 20, what="topics")
        produce(broker.bootstrap, cfg.kafka.events_topic, payloads)
        n_pred = sum(1 for p in good if b'"x"' in p)
        preds = read_topic(broker.bootstrap, cfg.kafka.predictions_topic, n_pred)
        dlq = read_topic(broker.bootstrap, cfg.kafka.dead_letter_topic, len(bad))
        status, body = http_get(cfg.metrics.port, "/readyz")
        assert status == 200 and json.loads(body)["broker_reachable"]
        assert http_get(cfg.metrics.port, "/healthz")[0] == 200
        wait_until(
            lambda: metric(cfg.metrics.port, "lifelong_events_total", 'outcome="dead_lettered"') == len(bad),
            10,
            what="dead-letter metric",
        )
        n_labels = sum(1 for p in good if b'"y"' in p)
        wait_until(
            lambda: metric(cfg.metrics.port, "lifelong_events_total", 'outcome="learned"') == n_labels,
            20,
            what="every label learned",
        )
    first = json.loads(preds[0].value)
    assert set(first) >= {
        "task",
        "id",
        "y_pred",
        "proba",
        "p_local",
        "p_kb",
        "w_local",
        "kb_top",
        "model_version",
        "offset",
    }
    assert preds[0].key == first["task"].encode()
    ids = {json.loads(r.value)["id"] for r in preds}
    assert ids == {json.loads(p)["id"] for p in good if b'"x"' in p}
    reasons = {dict(r.headers)["error"].decode().split(":")[0] for r in dlq}
    assert {"payload", "x", "task", "control"} <= reasons
    assert {r.value for r in dlq[:6]} == set(bad[:6])
    assert all(dict(r.headers)["source_topic"] == cfg.kafka.events_topic.encode() for r in dlq)


def topic_exists(broker, topic):
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:
        return topic in c.topics()
    finally:
        c.close()


def test_kill_9_at_any_point_then_restart_equals_an_uninterrupted_run(broker, tmp_path, client):
    """With most tasks in the task store at any moment (3 of 8 resident): incremental checkpoints."""
    values = settings(
        broker.bootstrap,
        tmp_path,
        **{
            "batching.max_events": 40,
            "checkpoint.interval_s": 0.2,
            "engine.max_resident_tasks": 3,
            "kafka.client": client,
        },
    )
    cfg = config(values)
    path = write_config(values, tmp_path / "config.yaml")
    payloads = stream_payloads(n_tasks=8, per_task=400, delayed=0.1, seed=4)
    n_pred = sum(1 for p in payloads if b'"x"' in p)
    proc = start_process(path, tmp_path / "daemon.log")
    wait_until(lambda: topic_exists(broker, cfg.kafka.events_topic), 30, what="topics")
    produce(broker.bootstrap, cfg.kafka.events_topic, payloads)
    rng = random.Random(1)
    kills = 0
    for _ in range(3):
        # kill once some progress is made, at a random moment
        wait_until(
            lambda: (metric(cfg.metrics.port, "lifelong_events_total", 'outcome="predicted"') or 0) > 0,
            60,
            what="progress",
        )
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        proc = start_process(path, tmp_path / "daemon.log")
    wait_until(
        lambda: metric(cfg.metrics.port, "lifelong_events_total", 'outcome="predicted"') == n_pred,
        120,
        interval=0.5,
        what="all events processed",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    restored = checkpoint.load_engine(cfg.checkpoint.dir, cfg)
    assert_same_state(restored, offline_engine(cfg, payloads))
    want = {json.loads(p)["id"] for p in payloads if b'"x"' in p}
    preds = read_topic(broker.bootstrap, cfg.kafka.predictions_topic, n_pred, ids=want)
    assert {json.loads(r.value)["id"] for r in preds} == want
    assert kills == 3


def test_sigterm_checkpoints_commits_and_exits_0_within_grace(broker, tmp_path, client):
    overrides = {"checkpoint.interval_s": 60.0, "shutdown_grace_s": 8.0, "kafka.client": client}
    values = settings(broker.bootstrap, tmp_path, **overrides)
    cfg = config(values)
    proc = start_process(write_config(values, tmp_path / "c.yaml"), tmp_path / "daemon.log")
    wait_until(lambda: topic_exists(broker, cfg.kafka.events_topic), 30, what="topics")
    payloads = stream_payloads(n_tasks=4, per_task=50)
    produce(broker.bootstrap, cfg.kafka.events_topic, payloads)
    n_pred = sum(1 for p in payloads if b'"x"' in p)
    wait_until(
        lambda: metric(cfg.metrics.port, "lifelong_events_total", 'outcome="predicted"') == n_pred,
        60,
        what="processing",
    )
    assert checkpoint.latest(cfg.checkpoint.dir) is None  # the interval is long: nothing saved yet
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(cfg.shutdown_grace_s) == 0
    assert time.monotonic() - t0 < cfg.shutdown_grace_s
    path, _, meta = checkpoint.latest(cfg.checkpoint.dir)
    assert meta["extra"]["offsets"] == [[cfg.kafka.events_topic, 0, len(payloads)]]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    committed = admin.list_group_offsets(cfg.kafka.group_id)
    admin.close()
    assert {tp.partition: o.offset for tp, o in committed[cfg.kafka.group_id].items()} == {0: len(payloads)}


def test_broker_outage_not_ready_then_recovers_without_loss(tmp_path, client):
    with EmbeddedBroker(log=tmp_path / "tansu.log") as own:
        values = settings(own.bootstrap, tmp_path, **{"batching.max_events": 20, "kafka.client": client})
        cfg = config(values)
        payloads = stream_payloads(n_tasks=6, per_task=100, seed=2)
        half = len(payloads) // 2
        with ThreadDaemon(cfg) as daemon:
            wait_until(lambda: daemon.ready()[0], 30, what="ready")
            produce(own.bootstrap, cfg.kafka.events_topic, payloads[:half])
            wait_until(lambda: daemon.engine.counters["predicted"] > 0, 30, what="progress")
            os.kill(own.proc.pid, signal.SIGSTOP)
            try:
                seen = wait_until(lambda: http_get(cfg.metrics.port, "/readyz")[0] == 503, 15, what="not ready")
                time.sleep(max(0.0, 15 - 3))
            finally:
                os.kill(own.proc.pid, signal.SIGCONT)
            assert seen
            produce(own.bootstrap, cfg.kafka.events_topic, payloads[half:])
            n_pred = sum(1 for p in payloads if b'"x"' in p)
            wait_until(lambda: daemon.engine.counters["predicted"] >= n_pred, 90, what="recovery")
            wait_until(lambda: http_get(cfg.metrics.port, "/readyz")[0] == 200, 30, what="ready again")
            time.sleep(1.0)
            with daemon.lock:
                assert_same_state(daemon.engine, offline_engine(cfg, payloads))


def random_payload(rng: random.Random, valid: list[bytes]) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
    if kind == 1:
        return json.dumps(rng.choice([None, 1, "s", [1, 2], {"a": 1}, {"task": None}])).encode()
    if kind == 2:  # a valid event with one field broken
        d = json.loads(rng.choice(valid))
        field = rng.choice(["task", "x", "y", "id", "ts"])
        d[field] = rng.choice([None, "", [], {}, "NaN", -1, 10**400 if field == "x" else 2.5, [1] * rng.randrange(5)])
        return json.dumps(d).encode() if field != "x" or d[field] != 10**400 else b'{"task": "a", "x": [1e999]}'
    if kind == 3:
        blob = rng.choice(valid)
        cut = rng.randrange(1, len(blob))
        return blob[:cut]
    if kind == 4:
        return json.dumps({"task": "t" * rng.randrange(1, 400), "control": rng.choice(["end", "stop", 1])}).encode()
    return rng.choice(valid)


def test_fuzzed_payloads_go_to_the_dlq_and_the_daemon_keeps_serving(broker, tmp_path, client):
    values = settings(broker.bootstrap, tmp_path, **{"kafka.client": client})
    cfg = config(values)
    rng = random.Random(7)
    valid = stream_payloads(n_tasks=4, per_task=30)
    fuzz = [random_payload(rng, valid) for _ in range(3000)]
    schema = Schema(3)
    bad = 0
    for p in fuzz:
        try:
            decode(p, schema)
        except InvalidEvent:
            bad += 1
    assert bad > 2000
    with ThreadDaemon(cfg) as daemon:
        wait_until(lambda: daemon.ready()[0], 30, what="ready")
        produce(broker.bootstrap, cfg.kafka.events_topic, fuzz)
        wait_until(lambda: daemon.dead_lettered == bad, 60, what="all bad payloads dead-lettered")
        produce(broker.bootstrap, cfg.kafka.events_topic, [b'{"task": "after", "id": "z", "x": [1, 2, 3], "y": 1}'])
        wait_until(lambda: "after" in daemon.engine.tasks.index, 30, what="a valid event after the fuzz")
        assert http_get(cfg.metrics.port, "/healthz")[0] == 200
        assert daemon.source.error is None
    read_topic(broker.bootstrap, cfg.kafka.dead_letter_topic, bad)


def test_learning_slower_than_max_poll_interval_loses_no_work(broker, tmp_path):
    values = settings(
        broker.bootstrap,
        tmp_path,
        **{
            "kafka.max_poll_interval_ms": 7000,
            "batching.max_events": 50,
            "batching.queue_batches": 1,
            "checkpoint.interval_s": 1.0,
        },
    )
    cfg = config(values)
    payloads = stream_payloads(n_tasks=3, per_task=50)
    with ThreadDaemon(cfg) as daemon:
        original = daemon.engine.process

        def slow(events):
            time.sleep(9.0 if len(events) > 20 and daemon.engine.counters["learned"] < 120 else 0.0)
            return original(events)

        daemon.engine.process = slow
        wait_until(lambda: daemon.ready()[0], 30, what="ready")
        generation = daemon.source.generation
        produce(broker.bootstrap, cfg.kafka.events_topic, payloads)
        n_pred = sum(1 for p in payloads if b'"x"' in p)
        wait_until(lambda: daemon.engine.counters["predicted"] >= n_pred, 120, interval=0.5, what="all processed")
        wait_until(
            lambda: daemon.source.committed.get(next(iter(daemon.positions))) == len(payloads),
            30,
            what="offsets committed",
        )
        assert daemon.source.generation == generation  # no rebalance happened
        with daemon.lock:
            assert_same_state(daemon.engine, offline_engine(cfg, payloads))


def test_delayed_labels_join_across_a_restart(broker, tmp_path):
    values = settings(broker.bootstrap, tmp_path)
    cfg = config(values)
    x = [0.5, -1.0, 2.0]
    predictions = [json.dumps({"task": "late", "id": f"p{i}", "x": x, "ts": 100.0 + i}).encode() for i in range(20)]
    labels = [json.dumps({"task": "late", "id": f"p{i}", "y": i % 2, "ts": 200.0 + i}).encode() for i in range(20)]
    done = [
        json.dumps({"task": "done", "id": "d0", "x": x, "y": 1, "ts": 150.0}).encode(),
        b'{"task": "done", "control": "end", "ts": 150.0}',
    ]
    with ThreadDaemon(cfg) as daemon:
        wait_until(lambda: daemon.ready()[0], 30, what="ready")
        produce(broker.bootstrap, cfg.kafka.events_topic, predictions + done)
        wait_until(lambda: len(daemon.engine.arrivals.pending) == 20 and daemon.ended, 30, what="pending predictions")
    with ThreadDaemon(config(values)) as daemon:  # restarted: the pending store came back with the checkpoint
        assert len(daemon.engine.arrivals.pending) == 20
        assert daemon.ended == {"done"}  # and the ended tasks (no per-task series for them)
        wait_until(lambda: daemon.ready()[0], 30, what="ready")
        produce(broker.bootstrap, cfg.kafka.events_topic, labels)
        wait_until(lambda: daemon.engine.counters["learned"] == 21, 30, what="labels joined")  # and "done"
        assert daemon.engine.counters["label_expired"] == 0 and not daemon.engine.arrivals.pending
        wait_until(
            lambda: metric(cfg.metrics.port, "lifelong_label_delay_seconds_count") == 20,
            10,
            what="label delays observed",
        )


def test_a_producer_whose_clock_is_a_year_ahead_expires_no_pending_prediction(broker, tmp_path):
    """Events without ``ts`` take their Kafka record's timestamp: one record stamped a year ahead is not
    trusted (counted), so the 50 labels that follow still join their predictions."""
    cfg = config(settings(broker.bootstrap, tmp_path))
    x, now_ms = [0.5, -1.0, 2.0], int(time.time() * 1000)
    predictions = [json.dumps({"task": f"t{i}", "id": f"p{i}", "x": x}).encode() for i in range(50)]
    spike = [json.dumps({"task": "wrong-clock", "id": "w", "x": x, "y": 1}).encode()]
    labels = [json.dumps({"task": f"t{i}", "id": f"p{i}", "y": i % 2}).encode() for i in range(50)]
    stamps = [now_ms] * 50 + [now_ms + 365 * 24 * 3600 * 1000] + [now_ms + 5000] * 50
    with ThreadDaemon(cfg) as daemon:
        wait_until(lambda: daemon.ready()[0], 30, what="ready")
        produce(broker.bootstrap, cfg.kafka.events_topic, predictions + spike + labels, timestamps_ms=stamps)
        wait_until(lambda: daemon.engine.counters["learned"] >= 51, 30, what="labels joined")
        c = daemon.engine.counters
        assert (c["learned"], c["label_expired"], c["label_unmatched"], c["time_future"]) == (51, 0, 0, 1)
        wait_until(
            lambda: metric(cfg.metrics.port, "lifelong_event_time_clamped_total", 'reason="future"') == 1,
            10,
            what="the untrusted time counted",
        )


def test_missing_topics_with_creation_off_is_a_clear_error(broker, tmp_path, caplog):
    runner = ThreadDaemon(config(settings(broker.bootstrap, tmp_path, **{"kafka.create_topics": False})))
    runner.thread.start()
    runner.thread.join(30)
    assert runner.code == 1
    assert "do not exist and kafka.create_topics is false" in caplog.text


def test_demo_runs_and_prints_a_summary(broker):
    from lifelong.tools.demo import run_demo

    out = io.StringIO()
    assert run_demo(tasks=20, events_per_task=30, rate=20000, out=out, timeout=90) == 0
    text = out.getvalue()
    assert "/metrics" in text and "summary" in text and "lifelong (two levels)" in text
    learned = int(next(line for line in text.splitlines() if "events learned" in line).split()[-1].replace(",", ""))
    assert learned == 20 * 30
    assert np.isfinite(
        float(next(line for line in text.splitlines() if "task level (warm-started)" in line).split()[3])
    )


def test_a_flush_during_an_outage_is_postponed_not_fatal(tmp_path, client):
    with EmbeddedBroker(log=tmp_path / "tansu.log") as own:
        cfg = config(settings(own.bootstrap, tmp_path, **{"kafka.client": client}))
        sink = open_sink(cfg)
        sink.predictions([(0, {"task": "t", "id": "warm-up"})])
        assert sink.flush(timeout=20) == 1
        os.kill(own.proc.pid, signal.SIGSTOP)  # before the record: a record sent at once could be acknowledged first
        try:
            sink.predictions([(0, {"task": "t", "id": "during"})])
            with pytest.raises(FlushTimeout):
                sink.flush(timeout=1.0)  # pending, not failed: the daemon postpones its checkpoint
        finally:
            os.kill(own.proc.pid, signal.SIGCONT)
        assert sink.flush(timeout=30) == 1  # the same record, acknowledged once the broker is back
        sink.close(timeout=5)


def test_oversized_messages_are_dead_lettered_and_the_next_event_is_predicted(broker, tmp_path):
    """A 5 MB message and a 500,000-key map are too large to decode or to re-send whole: their dead letters
    keep a prefix and the size, the label of the metric is the field kind (never a sender's feature name),
    and the events after them are predicted on the first run."""
    from kafka import KafkaProducer

    cfg = config(settings(broker.bootstrap, tmp_path))
    huge = b'{"task": "a", "id": "big", "x": [' + b"1.0, " * 1_000_000 + b'1.0], "y": 1}'
    keys = json.dumps({"task": "a", "id": "wide", "x": {f"f{i}": 1.0 for i in range(500_000)}}).encode()
    names = [json.dumps({"task": "a", "id": f"n{i}", "x": {f"name-{i}": "high"}}).encode() for i in range(50)]
    after = b'{"task": "after", "id": "z", "x": [1, 2, 3], "y": 1}'
    with ThreadDaemon(cfg) as daemon:
        wait_until(lambda: daemon.ready()[0], 30, what="ready")
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=20_000_000)
        for payload in [huge, keys, *names, after]:
            producer.send(cfg.kafka.events_topic, key=b"a", value=payload)
        producer.flush()
        producer.close()
        preds = read_topic(broker.bootstrap, cfg.kafka.predictions_topic, 1)
        assert json.loads(preds[0].value)["id"] == "z"
        dlq = read_topic(broker.bootstrap, cfg.kafka.dead_letter_topic, 52)
        wait_until(
            lambda: metric(cfg.metrics.port, "lifelong_dead_letters_total", 'field="x"') == 50,
            10,
            what="dead-letter metric",
        )
        _, body = http_get(cfg.metrics.port, "/metrics")
        assert "name-" not in body and daemon.source.error is None
    big = [dict(r.headers) for r in dlq[:2]]
    assert [h["original_bytes"] for h in big] == [str(len(huge)).encode(), str(len(keys)).encode()]
    assert all(h["truncated"] == b"1" and h["error"].startswith(b"payload") for h in big)
    assert dlq[0].value == huge[: len(dlq[0].value)] and len(dlq[0].value) <= 64 * 1024


def test_disk_full_pauses_processing_then_resumes_exactly(broker, tmp_path, monkeypatch):
    """Checkpoints fail (no space) for a while: no exit, not ready, no prediction sent twice; once space is
    back, processing resumes and the state is exact."""
    import errno

    values = settings(broker.bootstrap, tmp_path, **{"batching.max_events": 20, "checkpoint.interval_s": 0.2})
    cfg = config(values)
    payloads = stream_payloads(n_tasks=6, per_task=60, seed=3)
    full = {"on": False}
    real_write = checkpoint.write  # the file: written off the loop by periodic checkpoints, in it by retries

    def write(*args, **kwargs):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write", write)
    with ThreadDaemon(cfg) as daemon:
        wait_until(lambda: daemon.ready()[0], 30, what="ready")
        produce(broker.bootstrap, cfg.kafka.events_topic, payloads[:100])
        wait_until(lambda: daemon.engine.counters["predicted"] >= 90, 30, what="progress")
        full["on"] = True
        produce(broker.bootstrap, cfg.kafka.events_topic, payloads[100:])
        wait_until(lambda: daemon.storage_error is not None, 30, what="a failed checkpoint")
        status, body = http_get(cfg.metrics.port, "/readyz")
        assert status == 503 and "No space" in json.loads(body)["checkpoint_error"]
        wait_until(lambda: metric(cfg.metrics.port, "lifelong_checkpoint_failing") == 1.0, 10, what="failing gauge")
        stalled = daemon.engine.counters["predicted"]
        time.sleep(3.0)
        assert daemon.engine.counters["predicted"] == stalled  # paused, not crash-looping
        full["on"] = False
        n_pred = sum(1 for p in payloads if b'"x"' in p)
        wait_until(lambda: daemon.engine.counters["predicted"] == n_pred, 60, what="resumed")
        wait_until(lambda: http_get(cfg.metrics.port, "/readyz")[0] == 200, 30, what="ready again")
        assert metric(cfg.metrics.port, "lifelong_checkpoints_total", 'result="failed"') >= 1
        with daemon.lock:
            assert_same_state(daemon.engine, offline_engine(cfg, payloads))
    preds = read_topic(broker.bootstrap, cfg.kafka.predictions_topic, n_pred)
    assert len(preds) == n_pred  # none sent twice


def test_lost_state_with_committed_offsets_is_refused_unless_reset(broker, tmp_path, caplog):
    values = settings(broker.bootstrap, tmp_path)
    cfg = config(values)
    with ThreadDaemon(cfg) as daemon:
        wait_until(lambda: daemon.ready()[0], 30, what="ready")
        produce(broker.bootstrap, cfg.kafka.events_topic, stream_payloads(n_tasks=3, per_task=20))
        wait_until(lambda: daemon.engine.counters["learned"] == 60, 30, what="learned")
    for path in (tmp_path / "state").glob("checkpoint-*.ckpt"):
        path.write_bytes(path.read_bytes()[:-10])  # every checkpoint truncated
    refused = ThreadDaemon(config(values))
    refused.thread.start()
    refused.thread.join(30)
    assert refused.code == 1 and "--reset-state" in caplog.text and "committed offsets" in caplog.text
    with ThreadDaemon(config(values), reset_state=True) as resumed:
        wait_until(lambda: resumed.ready()[0], 30, what="ready after --reset-state")
        produce(broker.bootstrap, cfg.kafka.events_topic, stream_payloads(n_tasks=1, per_task=5, seed=9))
        wait_until(lambda: resumed.engine.counters["learned"] == 5, 30, what="only the new events")
