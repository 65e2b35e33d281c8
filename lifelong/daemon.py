"""The daemon: engine + Kafka source + sink + checkpointer + metrics, wired into one crash-safe loop.

Commit protocol (exactly-once state, at-least-once output), every ``checkpoint.interval_s`` and at
shutdown: flush the producer and check every delivery -> write the checkpoint (all engine state and the
next offset of each partition) atomically -> commit those offsets. On start the newest good checkpoint is
restored and each partition is sought to its offset, so a crash replays exactly the events the state has
not seen: none is learned twice or skipped, and their predictions are sent again with the same ids.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from prometheus_client import CollectorRegistry

from . import checkpoint
from .config import Config
from .engine import Engine
from .errors import ConfigError, InvalidEvent, LifelongError, StateError
from .events import Event, Schema, decode
from .metrics import EngineCollector, HealthServer, Metrics
from .sink import KafkaSink
from .source import KafkaSource, client_options

log = logging.getLogger(__name__)
STALL_S = 60.0  # /healthz fails when the processing or the poll loop made no progress for this long


class DaemonError(LifelongError):
    """The daemon cannot go on (a failed delivery, a dead poll loop): it stops without checkpointing."""


def ensure_topics(cfg: Config) -> None:
    """Create the events, predictions and dead-letter topics when missing (``kafka.create_topics``)."""
    k = cfg.kafka
    try:
        admin = KafkaAdminClient(client_id="lifelong-admin", request_timeout_ms=15000, **client_options(cfg))
    except KafkaError as exc:
        raise LifelongError(f"cannot reach Kafka at {k.bootstrap_servers}: {exc!r}") from None
    try:
        existing = set(admin.list_topics())
        wanted = [k.events_topic, k.predictions_topic, k.dead_letter_topic]
        missing = [t for t in dict.fromkeys(wanted) if t not in existing]
        if missing and not k.create_topics:
            raise LifelongError(f"topics {missing} do not exist and kafka.create_topics is false")
        for topic in missing:
            try:
                admin.create_topics([NewTopic(topic, k.partitions if topic == k.events_topic else 1, 1)])
            except TopicAlreadyExistsError:
                pass
            except KafkaError as exc:
                raise LifelongError(f"the broker refused to create topic {topic!r}: {exc!r}") from None
    finally:
        admin.close()


class Daemon:
    """``lifelong run``. ``run()`` blocks until ``stop()`` (or SIGTERM/SIGINT) and returns the exit code."""

    def __init__(self, cfg: Config, registry: CollectorRegistry | None = None):
        if cfg.engine.dim <= 0:
            raise ConfigError("engine.dim: must be set (the number of features) for lifelong run")
        self.cfg = cfg
        self.lock = threading.RLock()
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.schema = Schema(cfg.engine.dim, cfg.engine.task, cfg.engine.n_classes, cfg.engine.target_range,
                             frozenset(cfg.engine.tasks), cfg.kafka.max_message_bytes)
        self.engine, self.positions = self._restore()
        self.checkpointed = dict(self.positions)
        self.last_checkpoint = time.monotonic()
        self.dirty = False
        self.dead_lettered = 0
        self.assigned: list[TopicPartition] = []
        self.ended: set[int] = set()
        self.stopping = threading.Event()
        self.last_progress = time.monotonic()
        self.source: KafkaSource | None = None
        self.sink: KafkaSink | None = None
        self.registry.register(EngineCollector(self))
        self.http = HealthServer(cfg.metrics.host, cfg.metrics.port, self.registry, self.live, self.ready)

    # --- state ---

    def _restore(self) -> tuple[Engine, dict[TopicPartition, int]]:
        found = checkpoint.latest(self.cfg.checkpoint.dir)
        engine = Engine(self.cfg.engine, self.cfg.labels)
        if found is None:
            log.info("no checkpoint in %s: starting with an empty engine", self.cfg.checkpoint.dir)
            return engine, {}
        path, tensors, meta = found
        engine.load_state(tensors, meta)
        offsets = {TopicPartition(t, p): o for t, p, o in meta.get("extra", {}).get("offsets", [])
                   if t == self.cfg.kafka.events_topic}
        log.info("restored %s: %d tasks, KB %d members, offsets %s", path, engine.n_tasks, engine.kb.size,
                 {tp.partition: o for tp, o in offsets.items()})
        return engine, offsets

    def archived_tasks(self) -> set[int]:
        return self.ended

    def checkpoint_age(self) -> float:
        return time.monotonic() - self.last_checkpoint

    def live(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        idle = now - self.last_progress
        poll_idle = now - self.source.last_poll if self.source else 0.0
        ok = idle < STALL_S and poll_idle < STALL_S and not (self.source and self.source.error)
        return ok, {"processing_idle_s": round(idle, 3), "poll_idle_s": round(poll_idle, 3)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        reachable = bool(self.source and self.source.broker_reachable)
        ok = bool(self.assigned) and reachable and not self.stopping.is_set()
        return ok, {"assigned": len(self.assigned), "restored": True, "broker_reachable": reachable,
                    "stopping": self.stopping.is_set()}

    # --- rebalance callbacks (poll thread) ---

    def _on_assign(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        with self.lock:  # waits for the batch in flight: positions are then exact
            self.assigned = list(partitions)
            return {tp: self.positions[tp] for tp in partitions if tp in self.positions}

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        with self.lock:
            self.assigned = [tp for tp in self.assigned if tp not in partitions]

    # --- main loop ---

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        log.info("effective configuration: %s", self.cfg.redacted())
        self.http.start()
        log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.http.port)
        code = 0
        try:
            ensure_topics(self.cfg)
            self.sink = KafkaSink(self.cfg)
            self.source = KafkaSource(self.cfg, self._on_assign, self._on_revoke)
            self.source.start()
            while not self.stopping.is_set():
                self.last_progress = time.monotonic()
                if self.source.error is not None:
                    raise DaemonError(f"the poll loop stopped: {self.source.error!r}")
                batches = self._collect()
                if batches:
                    self._process(batches)
                if self.dirty and self.checkpoint_age() >= self.cfg.checkpoint.interval_s:
                    self._checkpoint(timeout=30.0)
            self._shutdown()
        except LifelongError as exc:
            log.error("stopping without a checkpoint: %s", exc)
            code = 1
        finally:
            self._close()
        return code

    def _collect(self) -> list[Any]:
        assert self.source is not None
        first = self.source.get(timeout=0.1)
        if first is None:
            return []
        batches, n = [first], len(first.records)
        deadline = time.monotonic() + self.cfg.batching.max_ms / 1000
        while n < self.cfg.batching.max_events and (left := deadline - time.monotonic()) > 0:
            more = self.source.get(timeout=left)
            if more is None:
                break
            batches.append(more)
            n += len(more.records)
        return batches

    def _process(self, batches: list[Any]) -> None:
        assert self.source is not None and self.sink is not None
        t0 = time.perf_counter()
        with self.lock:
            events: list[Event] = []
            sources: list[Any] = []
            new_tasks: set[str] = set()
            for batch in batches:
                if batch.generation != self.source.generation:
                    continue  # fetched before a rebalance; fetched again after the seek
                for r in batch.records:
                    tp = TopicPartition(r.topic, r.partition)
                    if r.offset < self.positions.get(tp, -1):
                        continue  # already learned: seen again after a seek
                    self.positions[tp] = r.offset + 1
                    try:
                        if r.value is None:
                            raise InvalidEvent("payload", "empty (null) record")
                        e = decode(r.value, self.schema)
                        if e.task not in self.engine.task_index and e.task not in new_tasks:
                            if self.engine.n_tasks + len(new_tasks) >= self.cfg.engine.max_tasks:
                                raise InvalidEvent("task", f"engine.max_tasks ({self.cfg.engine.max_tasks}) reached")
                            new_tasks.add(e.task)
                    except InvalidEvent as exc:
                        self._dead_letter(r, exc)
                        continue
                    if e.ts is None:
                        e.ts = r.timestamp / 1000.0
                    events.append(e)
                    sources.append(r)
            if not events:
                self.dirty = self.dirty or bool(batches)
                return
            result = self.engine.process(events)
            for i, e in enumerate(events):
                if e.control == "end":
                    self.ended.add(int(result.task_index[i]))
                else:
                    self.ended.discard(int(result.task_index[i]))
            now = time.time()
            for i, rec in result.records(self.cfg.engine.task):
                r = sources[i]
                rec["offset"] = r.offset
                self.sink.prediction(rec["task"], rec)
                self.metrics.end_to_end.observe(max(0.0, now - r.timestamp / 1000.0))
            for delay in result.label_delay[result.label_delay == result.label_delay]:
                self.metrics.label_delay.observe(float(delay))
            self.dirty = True
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        gaps, self.source.poll_gaps = self.source.poll_gaps, []
        for gap in gaps:
            self.metrics.poll_interval.observe(gap)

    def _dead_letter(self, r: Any, exc: InvalidEvent) -> None:
        assert self.sink is not None
        self.sink.dead_letter(r.value, r.key, str(exc), r.topic, r.partition, r.offset)
        self.metrics.dead_letters.labels(exc.field).inc()
        self.dead_lettered += 1

    def _checkpoint(self, timeout: float) -> Path:
        """Flush and verify deliveries, then persist state with its offsets, then commit the offsets."""
        assert self.sink is not None and self.source is not None
        start = time.monotonic()
        self.sink.flush(timeout=max(1.0, timeout * 0.6))
        with self.lock:
            offsets = dict(self.positions)
            for tp, off in offsets.items():
                if off < self.checkpointed.get(tp, -1):
                    raise StateError(f"offset of {tp.topic}-{tp.partition} went back from "
                                     f"{self.checkpointed[tp]} to {off}")
            try:
                path = checkpoint.save_engine(self.engine, self.cfg.checkpoint.dir, keep=self.cfg.checkpoint.keep,
                                              extra={"offsets": [[tp.topic, tp.partition, o] for tp, o in
                                                                 sorted(offsets.items())]})
            except OSError as exc:
                self.metrics.checkpoints.labels("failed").inc()
                raise DaemonError(f"cannot write a checkpoint in {self.cfg.checkpoint.dir}: {exc}") from None
            self.checkpointed = offsets
            self.last_checkpoint = time.monotonic()
            self.dirty = False
        self.metrics.checkpoints.labels("ok").inc()
        try:
            self.source.commit(offsets, timeout=max(0.5, timeout - (time.monotonic() - start)))
        except Exception as exc:  # noqa: BLE001 - the checkpoint, not the commit, is what restores state
            log.warning("offset commit failed (the checkpoint holds the offsets): %r", exc)
        log.debug("checkpoint %s offsets %s", path, {tp.partition: o for tp, o in offsets.items()})
        return path

    def _shutdown(self) -> None:
        """Finish: the batch in hand is done; checkpoint and commit within the grace period."""
        if self.dirty:
            self._checkpoint(timeout=self.cfg.shutdown_grace_s * 0.7)
        log.info("stopped cleanly at offsets %s", {f"{tp.topic}-{tp.partition}": o for tp, o in self.positions.items()})

    def _close(self) -> None:
        grace = self.cfg.shutdown_grace_s
        if self.source is not None:
            self.source.stop(timeout=grace * 0.2)
        if self.sink is not None:
            try:
                self.sink.close(timeout=grace * 0.1)
            except Exception as exc:  # noqa: BLE001 - closing is best effort; state is already saved
                log.warning("closing the producer: %r", exc)
        self.http.stop()
