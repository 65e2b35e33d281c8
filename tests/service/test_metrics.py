"""The collector reads the engine at scrape time into a fresh registry; label cardinality is capped."""

import dataclasses
import threading
from types import SimpleNamespace

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from lifelong.config import load_config
from lifelong.service.metrics import LATENCY_BUCKETS, BatchHistogram, EngineCollector, Metrics
from lifelong.service.status import Status

from conftest import make_stream


def scrape(engine, archived=frozenset(), cap=3, foreign=frozenset()):
    cfg = load_config(env={})
    cfg = dataclasses.replace(cfg, metrics=dataclasses.replace(cfg.metrics, max_task_labels=cap))
    daemon = SimpleNamespace(
        lock=threading.RLock(),
        engine=engine,
        cfg=cfg,
        dead_lettered=4,
        source=None,
        positions={},
        archived_tasks=lambda: set(archived),
        foreign_tasks=lambda: set(foreign),
        status=lambda: Status(0.1, 0.1, False, 1, True, False, None, 1.5, {0: 7}, {0: 3}, 0),
    )
    registry = CollectorRegistry()
    Metrics(registry)
    collector = EngineCollector(daemon)
    registry.register(collector)
    collector.refresh()
    return registry


def test_engine_values_are_exported(engine_factory):
    engine = engine_factory()
    engine.process(make_stream(n_tasks=5, per_task=20))
    reg = scrape(engine)
    assert reg.get_sample_value("lifelong_events_total", {"outcome": "learned"}) == engine.counters["learned"]
    assert reg.get_sample_value("lifelong_events_total", {"outcome": "dead_lettered"}) == 4
    report = engine.report()
    learned = report["labelled"]
    assert (
        abs(
            reg.get_sample_value("lifelong_mistakes_total", {"predictor": "combined"}) / learned
            - report["methods"]["lifelong"]["cumulative_error"]
        )
        < 1e-9
    )
    assert reg.get_sample_value("lifelong_regret", {"level": "top"}) <= reg.get_sample_value(
        "lifelong_regret_bound", {"level": "top"}
    )
    assert reg.get_sample_value("lifelong_regret_over_bound_tasks", {"level": "kb"}) == 0
    assert reg.get_sample_value("lifelong_kb_members") == engine.kb.size
    assert reg.get_sample_value("lifelong_kb_capacity") == engine.kb.capacity
    assert reg.get_sample_value("lifelong_checkpoint_age_seconds") == 1.5
    assert reg.get_sample_value("lifelong_ready") == 1.0
    assert reg.get_sample_value("lifelong_consumer_lag", {"partition": "0"}) == 7
    assert reg.get_sample_value("lifelong_committed_offset", {"partition": "0"}) == 3


def test_per_task_series_are_capped_and_archived_tasks_drop_out(engine_factory):
    engine = engine_factory()
    engine.process(make_stream(n_tasks=6, per_task=20))
    archived = {engine.tasks.index["t0"]}
    reg = scrape(engine, archived=archived, cap=3)
    tasks = {s.labels["task"] for m in reg.collect() if m.name == "lifelong_task_regret" for s in m.samples}
    assert len(tasks) == 4 and "_other" in tasks and "t0" not in tasks
    total = sum(reg.get_sample_value("lifelong_task_learned_total", {"task": t}) for t in tasks)
    assert total == engine.counters["learned"]  # nothing lost in the capping
    w_local = reg.get_sample_value("lifelong_expert_weight", {"task": "_other", "expert": "local"})
    assert 0 <= w_local <= 1


def test_tasks_owned_by_another_replica_are_left_to_it(engine_factory):
    engine = engine_factory()
    engine.process(make_stream(n_tasks=6, per_task=20))
    moved = {engine.tasks.index[t] for t in ("t1", "t2")}
    alone, shared = scrape(engine, cap=10), scrape(engine, cap=10, foreign=moved)
    tasks = {s.labels["task"] for m in shared.collect() if m.name == "lifelong_task_regret" for s in m.samples}
    assert tasks == {"t0", "t3", "t4", "t5"}
    reg = engine.regrets()
    mine = [i for i in range(engine.n_tasks) if i not in moved]
    assert abs(shared.get_sample_value("lifelong_regret", {"level": "top"}) - reg["top"][mine].sum()) < 1e-9
    assert shared.get_sample_value("lifelong_regret", {"level": "top"}) != alone.get_sample_value(
        "lifelong_regret", {"level": "top"}
    )


def test_a_scrape_never_waits_for_the_processing_lock(engine_factory):
    """The processing loop refreshes the engine's values; a scrape reads them without the lock, so a long
    batch or a checkpoint stuck in a broker outage never makes /metrics time out."""
    from prometheus_client import generate_latest

    engine = engine_factory()
    engine.process(make_stream(n_tasks=3, per_task=20))
    reg = scrape(engine)
    collector = next(c for c in reg._collector_to_names if isinstance(c, EngineCollector))
    lock = collector.daemon.lock
    held, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    body: list[bytes] = []
    scraper = threading.Thread(target=lambda: body.append(generate_latest(reg)))
    scraper.start()
    scraper.join(2)
    release.set()
    holder.join()
    assert body and b'lifelong_events_total{outcome="learned"} 60.0' in body[0]


def test_readiness_and_liveness_come_from_one_status_reading():
    ok = Status(0.1, 0.2, False, 2, True, False, None, 1.0, {}, {}, 0)
    assert ok.ready and ok.live and ok.readiness()["assigned"] == 2 and ok.liveness()["poll_idle_s"] == 0.2
    for change in ({"assigned": 0}, {"broker_reachable": False}, {"stopping": True}, {"checkpoint_error": "ENOSPC"}):
        assert not dataclasses.replace(ok, **change).ready, change  # each alone makes /readyz 503
    for change in ({"processing_idle_s": 61.0}, {"poll_idle_s": 61.0}, {"poll_failed": True}):
        assert not dataclasses.replace(ok, **change).live, change
    assert dataclasses.replace(ok, checkpoint_error="ENOSPC").readiness()["checkpoint_error"] == "ENOSPC"


def test_a_histogram_observed_a_batch_at_a_time_exposes_what_one_observed_value_by_value_does():
    values = np.array([0.0, 0.0005, 0.0007, 0.01, 0.3, 5.0, 99.0, 86400.0])
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("x_seconds", "doc", LATENCY_BUCKETS + (86400.0,), ours)
    one = Histogram("x_seconds", "doc", buckets=LATENCY_BUCKETS + (86400.0,), registry=theirs)
    batch.observe(values[:3])
    batch.observe(values[3:])
    for v in values:
        one.observe(v)

    def samples(registry):
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert samples(ours) == samples(theirs)
