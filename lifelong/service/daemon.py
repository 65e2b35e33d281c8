"""The daemon: engine + Kafka source + sink + checkpointer + metrics, wired into one crash-safe loop.

Commit protocol (exactly-once state, at-least-once output), every ``checkpoint.interval_s`` and at
shutdown: flush the producer and check every delivery -> write the checkpoint (all engine state and the
next offset of each partition) atomically -> commit those offsets. On start the newest good checkpoint is
restored and each partition is sought to its offset, so a crash replays exactly the events the state has
not seen: none is learned twice or skipped, and their predictions are sent again with the same ids.

Scale-out (``kafka.knowledge_topic`` and ``kafka.changelog_topic`` set) and standalone replicas differ in what
they do for their partitions' tasks beyond learning them: ``replicas.ScaleOut`` and ``replicas.Standalone``,
one interface, chosen once here.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from lifelong.config import Config
from lifelong.core.engine import Engine
from lifelong.core.events import Schema
from lifelong.core.warmup import quiet_collector, use_threads, warm_up
from lifelong.errors import ConfigError, InvalidEvent, LifelongError, started
from lifelong.kafka.admin import ensure_topics
from lifelong.kafka.factory import open_sink, open_source
from lifelong.kafka.sink import Sink
from lifelong.kafka.source import Source
from lifelong.service import checkpoint
from lifelong.service.commit import Checkpointer
from lifelong.service.http import HealthServer
from lifelong.service.ingest import ingest
from lifelong.service.metrics import EngineCollector, Metrics
from lifelong.service.replicas import ScaleOut, Standalone
from lifelong.service.status import Status

log = logging.getLogger(__name__)
# The main loop refreshes the engine values that /metrics serves every second, or less often where a refresh
# (which reads every task) would take more than STATUS_SHARE of the loop's time: hundreds of thousands of tasks.
STATUS_EVERY_S, STATUS_SHARE = 1.0, 0.02


class DaemonError(LifelongError):
    """The daemon cannot go on (a failed delivery, a dead poll loop): it stops without checkpointing."""


class Daemon:
    """``lifelong run``. ``run()`` blocks until ``stop()`` (or SIGTERM/SIGINT) and returns the exit code.

    With no usable checkpoint, a standalone daemon whose group has committed offsets refuses to start (the
    state those offsets stand for is lost) unless ``reset_state``: then it starts empty from them. ``source``
    and ``sink`` open its events consumer and its producer (``kafka.client``'s; in-memory ones in tests).
    """

    def __init__(
        self,
        cfg: Config,
        registry: CollectorRegistry | None = None,
        reset_state: bool = False,
        source: Callable[..., Source] = open_source,
        sink: Callable[[Config], Sink] = open_sink,
    ):
        if cfg.engine.dim <= 0:
            raise ConfigError("engine.dim: must be set (the number of features) for lifelong run")
        checkpoint.check_writable(cfg.checkpoint.dir)
        self.cfg = cfg
        self.reset_state = reset_state
        self.open_source, self.open_sink = source, sink
        use_threads(cfg.engine)
        self.lock = threading.RLock()
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.schema = Schema(
            cfg.engine.dim,
            cfg.engine.task,
            cfg.engine.n_classes,
            cfg.engine.target_range,
            frozenset(cfg.engine.tasks),
            cfg.kafka.max_message_bytes,
        )
        self.replica = ScaleOut(self) if cfg.kafka.knowledge_topic else Standalone(self)
        self.restored = False
        self.ended: set[str] = set()  # tasks whose last event was ``control: end`` (no per-task series)
        self.engine, self.positions = self._restore()
        self.engine.publisher = self.replica.publisher
        self.checkpointer = Checkpointer(cfg, self.engine, self.metrics, self.positions)
        self.dirty = False
        self.status_at = 0.0
        self.status_every = STATUS_EVERY_S
        self.dead_lettered = 0
        self.assigned: list[TopicPartition] = []
        self.stopping = threading.Event()
        self.last_progress = time.monotonic()
        self.source: Source | None = None
        self.sink: Sink | None = None
        self.collector = EngineCollector(self)
        self.registry.register(self.collector)
        try:
            self.http = HealthServer(cfg.metrics.host, cfg.metrics.port, self.registry, self.live, self.ready)
        except OSError as exc:
            raise ConfigError(
                f"metrics.host/metrics.port: cannot listen on {cfg.metrics.host}:{cfg.metrics.port}: "
                f"{exc.strerror or exc}"
            ) from None

    # --- state ---

    def _restore(self) -> tuple[Engine, dict[TopicPartition, int]]:
        directory = Path(self.cfg.checkpoint.dir)
        found = checkpoint.latest(directory)
        # tasks beyond engine.max_resident_tasks wait in the task store, checkpointed incrementally with it
        engine = Engine(self.cfg.engine, self.cfg.labels, directory / "tasks")
        if found is None:
            log.info("no checkpoint in %s", self.cfg.checkpoint.dir)
            shutil.rmtree(directory / "tasks", ignore_errors=True)  # what a run that never checkpointed left
            if engine.residency.spills:
                engine.residency.open_store()
            return engine, {}
        path, tensors, meta = found
        checkpoint.restore_engine(engine, directory, tensors, meta)
        if engine.residency.spills and engine.residency.store is None:
            engine.residency.open_store()
        self.restored = True
        extra = meta.get("extra", {})
        offsets = {TopicPartition(t, p): o for t, p, o in extra.get("offsets", []) if t == self.cfg.kafka.events_topic}
        self.replica.restore(extra)
        self.ended = set(extra.get("ended", []))
        log.info(
            "restored %s: %d tasks, KB %d members, offsets %s",
            path,
            engine.n_known,
            engine.kb.size,
            {tp.partition: o for tp, o in offsets.items()},
        )
        return engine, offsets

    def archived_tasks(self) -> set[int]:
        """Resident tasks (rows) that ended (``control: end``): their per-task series are dropped."""
        index = self.engine.tasks.index
        return {index[t] for t in self.ended if t in index}

    def foreign_tasks(self) -> set[int]:
        """Tasks of partitions this replica does not own now (held from an earlier ownership)."""
        return self.replica.foreign_tasks()

    def checkpoint_age(self) -> float:
        """Seconds since the last checkpoint."""
        return self.checkpointer.age()

    @property
    def storage_error(self) -> str | None:
        """Why the last checkpoint could not be written (processing waits for a retry), or None."""
        return self.checkpointer.error

    def status(self) -> Status:
        """The health reading ``/healthz``, ``/readyz`` and ``/metrics`` show (no lock: each value copied)."""
        now, source = time.monotonic(), self.source
        positions = dict(self.positions)
        highwater, committed = (dict(source.highwater), dict(source.committed)) if source else ({}, {})
        return Status(
            processing_idle_s=now - self.last_progress,
            poll_idle_s=now - source.last_poll if source else 0.0,
            poll_failed=bool(source and source.error),
            assigned=len(self.assigned),
            broker_reachable=bool(source and source.broker_reachable),
            stopping=self.stopping.is_set(),
            checkpoint_error=self.storage_error,
            checkpoint_age_s=self.checkpoint_age(),
            lag={tp.partition: max(0, hw - positions.get(tp, 0)) for tp, hw in highwater.items()},
            committed={tp.partition: off for tp, off in committed.items()},
            dead_letter_failures=self.sink.dead_letter_failures if self.sink else 0,
        )

    def live(self) -> tuple[bool, dict[str, Any]]:
        """Liveness (/healthz): both loops made progress recently, with the idle times."""
        s = self.status()
        return s.live, s.liveness()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness (/readyz): assigned, restored, checkpoints succeed, broker reachable, not stopping."""
        s = self.status()
        return s.ready, s.readiness()

    # --- rebalance callbacks (poll thread) ---

    def _on_assign(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        with self.lock:  # waits for the batch in flight: positions are then exact
            self.assigned = self.assigned + list(partitions)
            self.replica.gained(partitions)
            return {tp: self.positions[tp] for tp in partitions if tp in self.positions}

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        with self.lock:
            self.replica.revoking(partitions)
            self._drop(partitions)

    def _on_lost(self, partitions: list[TopicPartition]) -> None:
        with self.lock:  # another replica may own them already: nothing is committed
            self._drop(partitions)

    def _drop(self, partitions: list[TopicPartition]) -> None:
        self.assigned = [tp for tp in self.assigned if tp not in partitions]
        self.replica.dropped(partitions)

    def stop(self) -> None:
        """Ask the main loop to finish the batch in hand, checkpoint and exit (what SIGTERM does)."""
        self.stopping.set()

    def run(self) -> int:
        """Serve until ``stop()``; the exit code (0 after a clean shutdown)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        log.info("effective configuration: %s", self.cfg.redacted())
        self.http.start()
        log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.http.port)
        code = 0
        try:
            ensure_topics(self.cfg)
            self.replica.check_state()
            self.sink = self.open_sink(self.cfg)
            self.replica.start()
            if self.engine.compiled:  # before joining the group: compiling holds the interpreter for seconds
                log.info("engine kernels ready in %.1f s", warm_up(self.cfg.engine, self.cfg.labels))
            self.source = self.open_source(self.cfg, self._on_assign, self._on_revoke, self._on_lost)
            self.source.start()
            with quiet_collector():  # what start-up loaded is never garbage
                self._loop()
            self._shutdown()
        except LifelongError as exc:
            log.error("stopping without a checkpoint: %s", exc)
            code = 1
        finally:
            self._close()
        return code

    def _loop(self) -> None:
        """Poll, learn and predict, checkpoint when due, until asked to stop."""
        source = started(self.source)
        while not self.stopping.is_set():
            self.last_progress = time.monotonic()
            if source.error is not None:
                raise DaemonError(f"the poll loop stopped: {source.error!r}")
            if self.last_progress - self.status_at >= self.status_every:
                self._refresh_status()
            if self.storage_error is not None:  # no new work (nor predictions) until state is saved again
                if self.checkpointer.due_retry():
                    self.checkpoint(timeout=30.0)
                else:
                    self.stopping.wait(0.1)
                continue
            batches = self._collect()
            if batches:
                self._process(batches)
            self.replica.tick()
            if (self.dirty or self.checkpointer.again) and self.checkpointer.due(self.cfg.checkpoint.interval_s):
                self.checkpoint(timeout=30.0, commit_by="queue")

    def _refresh_status(self) -> None:
        """Engine values for /metrics, taken here (where the engine is consistent): a scrape never waits."""
        start = time.monotonic()
        with self.lock:
            self.collector.refresh()
        self.status_at = time.monotonic()
        self.status_every = max(STATUS_EVERY_S, (self.status_at - start) / STATUS_SHARE)

    def _collect(self) -> list[Any]:
        source = started(self.source)
        first = source.get(timeout=0.1)
        if first is None:
            return []
        # then what is already waiting, without waiting for more: a batch is as large as the time the last
        # one took lets it be (large under load, small and quick when the stream is slow)
        batches, n = [first], len(first.records)
        while n < self.cfg.batching.max_events and (more := source.get(timeout=0)) is not None:
            batches.append(more)
            n += len(more.records)
        return batches

    def _process(self, batches: list[Any]) -> None:
        source = started(self.source)
        sink = started(self.sink)
        t0 = time.perf_counter()
        with self.lock:
            # records fetched before a rebalance are left out: they are fetched again after its seek
            fresh = [r for b in batches if b.generation == source.generation for r in b.records]
            got = ingest(
                fresh,
                self.schema,
                self.positions,
                self.replica.floor,
                self.engine.tasks.index,
                self.engine.n_known,
                self.cfg.engine.max_tasks,
                self.engine.residency.in_store,
            )
            for r, exc in got.rejected:
                self._dead_letter(r, exc)
            events, sources = got.events, got.sources
            if not events:
                self.dirty = self.dirty or bool(batches)
                return
            result = self.engine.process(events)
            self.engine.residency.write_behind(len(events))  # spreads the next checkpoint's task-store writes
            self.replica.learned(events, sources)
            for e in events:
                if e.control == "end":
                    self.ended.add(e.task)
                else:
                    self.ended.discard(e.task)
            records = result.records(self.cfg.engine.task, [r.offset for r in sources])
            sink.predictions(records)
            sent = [sources[i].timestamp for i, _ in records]
            self.metrics.end_to_end.observe(np.maximum(0.0, time.time() - np.array(sent, np.float64) / 1000.0))
            self.metrics.label_delay.observe(result.label_delay[result.label_delay == result.label_delay])
            self.dirty = True
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        gaps, source.poll_gaps = source.poll_gaps, []
        for gap in gaps:
            self.metrics.poll_interval.observe(gap)

    def _dead_letter(self, r: Any, exc: InvalidEvent) -> None:
        sink = started(self.sink)
        sink.dead_letter(r.value, r.key, str(exc), r.topic, r.partition, r.offset)
        self.metrics.dead_letters.labels(exc.kind).inc()
        self.dead_lettered += 1

    def checkpoint(self, timeout: float, commit_by: str = "wait") -> Path | None:
        """The commit protocol (``commit.Checkpointer``) under the processing lock. The offsets' commit: "wait"
        for the group's answer (shutdown), "send" it at once (rebalance callbacks, which run in the poll thread),
        or "queue" it for the poll thread (periodic checkpoints: the file holds the offsets; the file and the
        commit are then written by the checkpointer's writer thread while the loop goes on). None: postponed,
        or not written (``storage_error``)."""
        source = started(self.source)
        generation = source.generation  # a queued commit is left out if a rebalance comes after this

        def commit(offsets: dict[TopicPartition, int], timeout: float) -> None:
            if commit_by == "send":
                source.commit_async(offsets)
            else:
                source.commit(offsets, timeout if commit_by == "wait" else None, generation)

        with self.lock:
            path = self.checkpointer.run(
                started(self.sink),
                self._state,
                commit,
                timeout,
                self.replica.changelog,
                detach=commit_by == "queue",
            )
            if path is not None:
                self.dirty = False
            return path

    def _state(self) -> tuple[dict[TopicPartition, int], dict[str, Any]]:
        """The offsets a checkpoint stands for and the daemon's state that goes with them."""
        offsets = dict(self.positions)
        return offsets, {  # copies: the file may be written while the loop goes on (``checkpoint``)
            "offsets": [[tp.topic, tp.partition, o] for tp, o in sorted(offsets.items())],
            "ended": sorted(self.ended),
            **self.replica.extra(),
        }

    def _shutdown(self) -> None:
        """Finish: the batch in hand is done; checkpoint and commit within the grace period."""
        self.replica.finish()
        self.checkpointer.join()  # a periodic checkpoint being written: one that failed is written again here
        if (self.dirty or self.storage_error) and self.checkpoint(timeout=self.cfg.shutdown_grace_s * 0.7) is None:
            raise DaemonError(f"no checkpoint at shutdown: {self.storage_error or 'deliveries still pending'}")
        log.info(
            "stopped cleanly at offsets %s",
            {f"{tp.topic}-{tp.partition}": self.positions.get(tp) for tp in self.assigned},
        )

    def _close(self) -> None:
        grace = self.cfg.shutdown_grace_s
        try:
            self.checkpointer.join()
        except LifelongError as exc:  # stopping already: the last checkpoint written is the one restored
            log.error("checkpoint not written: %s", exc)
        if self.source is not None:
            self.source.stop(timeout=grace * 0.2)
        if self.sink is not None:
            try:
                self.sink.close(timeout=grace * 0.1)
            except Exception as exc:  # noqa: BLE001 - closing is best effort; state is already saved
                log.warning("closing the producer: %r", exc)
        self.replica.close()
        if self.engine.residency.store is not None:
            self.engine.residency.store.close()
        self.http.stop()
