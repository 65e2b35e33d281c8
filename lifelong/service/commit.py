"""The commit protocol (exactly-once state, at-least-once output), in the order DESIGN §6 fixes:

1. flush the sink and check every delivery (predictions, dead letters, KB members);
2. scale-out only: write the tasks changed since the last checkpoint to the changelog, and flush it;
3. write the engine's state with the next offset of each partition, atomically (``Taken.write``);
4. commit those offsets to the group (a failed commit is only a warning: the checkpoint holds them).

The processing lock is held only to take copies (the changed tasks' records, ``checkpoint.take``) and for the
flush of step 1, which comes after them (the deliveries it waits for go on meanwhile). Periodic checkpoints run
steps 2-4 in a writer thread while the loop goes on: the changelog has a producer of its own, whose flush waits
for its records only. That writer packs and sends the changelog a chunk at a time and rests between chunks
(``rest``: ``WRITER_REST`` times as long as the chunk took, in all at most ``REST_SHARE`` of the checkpoint
interval, none once anything waits for it: ``join``): the interpreter it holds to pack and send
thousands of records is then taken from the loop a little at a time, which a loop near its limit absorbs,
instead of at once, which it paid as a latency spike.

Deliveries still pending (a slow or frozen broker) postpone the checkpoint; a state that cannot be written
(disk full, read-only volume) sets ``error`` until a retry succeeds, retried after 1 s doubling to 30 s, and
the daemon takes no new work meanwhile. Nothing here knows Kafka: the sink, the changelog step, the state
and the commit are passed in (unit-tested with fakes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import TopicPartition

from lifelong.config import Config
from lifelong.core.engine import Engine
from lifelong.errors import StateError
from lifelong.kafka.sink import FlushTimeout, Sink, SinkError
from lifelong.service import checkpoint
from lifelong.service.metrics import Metrics

log = logging.getLogger(__name__)
RETRY_S = (1.0, 30.0)  # a failed checkpoint is retried after 1 s, doubling up to 30 s
WRITER_REST, REST_SHARE = 8.0, 0.25  # the writer's rests (module docstring)
Offsets = dict[TopicPartition, int]
Rest = Callable[[float], None]  # a writer's pause after working that many seconds
# the changelog step: takes the records (under the processing lock) and gives what sends them (resting between
# chunks) and waits for their delivery, and what takes the step back
Changelog = Callable[[], tuple[Callable[[float, Rest], None], Callable[[], None]]]


class Checkpointer:
    """Runs the commit protocol for one engine; see the module docstring."""

    def __init__(self, cfg: Config, engine: Engine, metrics: Metrics, offsets: Offsets):
        self.cfg = cfg
        self.engine = engine
        self.metrics = metrics
        self.checkpointed = dict(offsets)  # the offsets of the last checkpoint written
        self.last = time.monotonic()
        self.error: str | None = None  # the last checkpoint could not be written: processing waits for a retry
        self.retry_at = 0.0
        self.retry_s = RETRY_S[0]
        self.writer: threading.Thread | None = None  # writing a checkpoint (``run`` with ``detach``)
        self.failure: SinkError | None = None  # a changelog record the writer could not deliver
        self.hurry = threading.Event()  # the writer rests no more (``join``)
        self.rest_left = 0.0  # seconds of rest left to the writer
        self.again = False  # the writer postponed its checkpoint (or failed): the next one is due at once

    def moved(self, tp: TopicPartition, offset: int | None) -> None:
        """Partition ``tp``'s state now stands at ``offset`` (another replica's, restored), or this replica
        holds none of it (None): the next checkpoint's offset of ``tp`` is checked against that, not against
        what this replica wrote before."""
        if offset is None:
            self.checkpointed.pop(tp, None)
        else:
            self.checkpointed[tp] = offset

    def age(self) -> float:
        """Seconds since the last checkpoint."""
        return time.monotonic() - self.last

    def due(self, interval_s: float) -> bool:
        """A periodic checkpoint is due: the last one was written ``interval_s`` ago (its age counts from when it
        was written) or the writer could not write it, and none is being written."""
        return (self.writer is None or not self.writer.is_alive()) and (self.again or self.age() >= interval_s)

    def due_retry(self) -> bool:
        """A failed checkpoint's retry is due."""
        return time.monotonic() >= self.retry_at

    def run(
        self,
        sink: Sink,
        state: Callable[[], tuple[Offsets, dict[str, Any]]],
        commit: Callable[[Offsets, float], None],
        timeout: float,
        changelog: Changelog | None = None,
        detach: bool = False,
    ) -> Path | None:
        """One checkpoint: ``changelog`` takes the changed tasks' records and gives what sends them and waits for
        their delivery (scale-out), ``state`` gives the offsets and the daemon's metadata once it has, ``commit``
        commits offsets within a timeout. None: postponed (deliveries pending) or not written (``error``).
        ``detach``: the records and the state are taken and the sink flushed here, the rest runs in a writer
        thread while the caller goes on processing (``join`` waits for it, as the next checkpoint does); a file
        that cannot be written then sets ``error`` from there, and a record that was not delivered is raised by
        the next ``join``."""
        self.join()
        self.rest_left = REST_SHARE * self.cfg.checkpoint.interval_s if detach else 0.0
        self.again = False
        start = time.monotonic()
        send, undo = changelog() if changelog is not None else (None, None)
        try:
            offsets, extra = state()
            for tp, off in offsets.items():
                if off < self.checkpointed.get(tp, -1):
                    went = f"went back from {self.checkpointed[tp]} to {off}"
                    raise StateError(f"offset of {tp.topic}-{tp.partition} {went}")
            taken = checkpoint.take(self.engine, self.cfg.checkpoint.dir, extra, detach=detach)
            # after the work above (their deliveries overlap it), before any changelog record is sent
            sink.flush(timeout=max(1.0, timeout * 0.4))
        except (FlushTimeout, OSError) as exc:
            if undo is not None:
                undo()
            if isinstance(exc, FlushTimeout):
                log.warning("checkpoint postponed: %s", exc)
            else:
                self._failed(exc)
            return None
        self.checkpointed = dict(offsets)
        residency = self.engine.residency
        rows = residency.flushed * (residency.store.width if residency.store else 0)  # task rows written
        args = (taken, offsets, commit, start, timeout, rows, residency.flushed, send)
        if not detach:
            return taken.path if self._write(*args) else None
        self.writer = threading.Thread(target=self._detached, args=args, name="checkpoint-writer", daemon=True)
        self.writer.start()
        return taken.path

    def join(self) -> None:
        """Wait for a checkpoint being written (``run`` with ``detach``); raise the ``SinkError`` of a changelog
        record it could not deliver."""
        if self.writer is not None:
            self.hurry.set()  # it rests no more: somebody waits for it
            self.writer.join()
            self.writer = None
            self.hurry.clear()
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure

    def rest(self, took: float) -> None:
        """The writer's pause after ``took`` seconds of work (module docstring)."""
        pause = min(WRITER_REST * took, self.rest_left)
        self.rest_left -= pause
        self.hurry.wait(pause)

    def _detached(self, *args: Any) -> None:
        try:
            self.again = not self._write(*args)
        except SinkError as exc:
            self.failure, self.again = exc, True

    def _write(
        self,
        taken: checkpoint.Taken,
        offsets: Offsets,
        commit: Callable[[Offsets, float], None],
        start: float,
        timeout: float,
        rows: int,
        tasks: int,
        send: Callable[[float, Rest], None] | None,
    ) -> bool:
        """The changelog's records sent and delivered, then steps 3 and 4 for a state taken; False: postponed
        (changelog deliveries pending: they stay pending) or the file could not be written (``error``)."""
        try:
            if send is not None:
                send(max(1.0, timeout * 0.3), self.rest)
            path = taken.write(keep=self.cfg.checkpoint.keep)
        except FlushTimeout as exc:
            log.warning("checkpoint postponed: %s", exc)
            return False
        except OSError as exc:
            self._failed(exc)
            return False
        if self.error is not None:
            log.info("checkpoint written again after a storage fault (%s): processing resumes", self.error)
            self.error, self.retry_s = None, RETRY_S[0]
        self.last = time.monotonic()
        self.metrics.checkpoints.labels("ok").inc()
        self.metrics.checkpoint_seconds.observe(self.last - start)
        self.metrics.checkpoint_bytes.inc(path.stat().st_size + rows)
        self.metrics.checkpoint_tasks.inc(tasks)
        try:
            commit(offsets, max(0.5, timeout - (time.monotonic() - start)))
        except Exception as exc:  # noqa: BLE001 - the checkpoint, not the commit, is what restores state
            log.warning("offset commit failed (the checkpoint holds the offsets): %r", exc)
        log.debug("checkpoint %s offsets %s", path, {tp.partition: o for tp, o in offsets.items()})
        return True

    def _failed(self, exc: OSError) -> None:
        self.metrics.checkpoints.labels("failed").inc()
        log.error(
            "cannot write a checkpoint in %s (%s): processing paused, retrying in %.0f s",
            self.cfg.checkpoint.dir,
            exc,
            self.retry_s,
        )
        self.error = f"{type(exc).__name__}: {exc.strerror or exc}"
        self.retry_at = time.monotonic() + self.retry_s
        self.retry_s = min(RETRY_S[1], 2 * self.retry_s)
