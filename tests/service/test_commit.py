"""The commit protocol (``commit.Checkpointer``) with an in-memory sink and commit: no broker."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from lifelong.config import load_config
from lifelong.core.engine import Engine
from lifelong.errors import StateError
from lifelong.kafka.sink import FlushTimeout, Sink, SinkError
from lifelong.service import checkpoint
from lifelong.service.commit import Checkpointer
from lifelong.service.metrics import Metrics

from conftest import make_stream

TP = TopicPartition("ev", 0)


class FakeSink(Sink):
    """Records what happens, in order; ``pending`` flushes time out (a frozen broker)."""

    def __init__(self, cfg, steps: list[str]):
        super().__init__(cfg)
        self.steps = steps
        self.pending = False

    def _send(self, topic, value, key, partition=None, headers=None, where=None):
        self.steps.append(f"send {topic}")

    def flush(self, timeout):
        if self.pending:
            raise FlushTimeout("deliveries still pending")
        self.steps.append("flush")
        return 0

    def close(self, timeout):
        pass


@pytest.fixture
def parts(tmp_path):
    cfg = load_config(env={}, overrides={"engine.dim": 3, "checkpoint.dir": str(tmp_path / "state")})
    engine = Engine(cfg.engine, cfg.labels)
    engine.process(make_stream(n_tasks=3, per_task=10, dim=3, ends=False))
    steps: list[str] = []
    return cfg, engine, Checkpointer(cfg, engine, Metrics(CollectorRegistry()), {}), FakeSink(cfg, steps), steps


def changelog_step(sink, steps):
    """A changelog step that records its parts in ``steps`` and sends one record on ``sink``."""

    def changelog():
        steps.append("take records")

        def send(timeout, rest):
            sink.changelog("t0", 0, b"record", 30)
            sink.flush(timeout)

        return send, lambda: steps.append("undo")

    return changelog


def test_flush_then_changelog_then_state_then_commit_of_the_offsets_in_the_file(parts):
    cfg, engine, ckpt, sink, steps = parts
    commits = []

    def state():
        steps.append("state")
        return {TP: 30}, {"offsets": [["ev", 0, 30]]}

    changelog = changelog_step(sink, steps)
    path = ckpt.run(sink, state, lambda offsets, t: (steps.append("commit"), commits.append(offsets)), 5.0, changelog)
    # copies taken, then deliveries so far checked before any changelog record is sent, the file after them
    assert steps == ["take records", "state", "flush", "send lifelong-changelog", "flush", "commit"]
    assert commits == [{TP: 30}] and ckpt.checkpointed == {TP: 30}
    _, _, meta = checkpoint.latest(cfg.checkpoint.dir)
    assert path is not None and meta["extra"]["offsets"] == [["ev", 0, 30]]  # what was committed is in the file
    assert checkpoint.load_engine(cfg.checkpoint.dir, cfg).counters["learned"] == engine.counters["learned"]


def test_pending_deliveries_postpone_the_checkpoint_nothing_written_or_committed(parts):
    cfg, _, ckpt, sink, steps = parts
    sink.pending = True
    changelog = changelog_step(sink, steps)
    assert ckpt.run(sink, lambda: ({TP: 30}, {}), lambda o, t: steps.append("commit"), 5.0, changelog) is None
    # the changelog step is taken back: its tasks count as changed for the next checkpoint
    assert steps == ["take records", "undo"]
    assert checkpoint.latest(cfg.checkpoint.dir) is None and ckpt.error is None


class ChangelogSink(FakeSink):
    """The changelog's own producer: its flush times out while ``pending``, or fails with ``failed``."""

    failed = None

    def flush(self, timeout):
        if self.failed is not None:
            raise self.failed
        return super().flush(timeout)


@pytest.mark.parametrize("fault", ["pending", "failed"])
def test_a_writer_whose_changelog_is_not_delivered_writes_no_file_and_says_so_at_once(parts, fault):
    """Pending changelog deliveries: the next checkpoint is due at once (they stay pending, flushed before its
    file); a failed one is raised by the next checkpoint, which stops the daemon."""
    cfg, _, ckpt, sink, steps = parts
    own = ChangelogSink(cfg, steps)
    own.pending, own.failed = fault == "pending", SinkError("a record was not delivered") if fault == "failed" else None
    commit = lambda o, t: steps.append("commit")  # noqa: E731
    assert ckpt.run(sink, lambda: ({TP: 30}, {}), commit, 5.0, changelog_step(own, steps), detach=True)
    ckpt.writer.join()
    assert "commit" not in steps and checkpoint.latest(cfg.checkpoint.dir) is None and ckpt.error is None
    assert ckpt.due(3600.0)  # not waiting for the interval
    if fault == "failed":
        with pytest.raises(SinkError, match="not delivered"):
            ckpt.run(sink, lambda: ({TP: 31}, {}), commit, 5.0)
        return
    own.pending = False
    assert ckpt.run(sink, lambda: ({TP: 31}, {}), commit, 5.0, changelog_step(own, steps)) is not None
    assert steps[-1] == "commit" and not ckpt.due(3600.0)


def test_the_writer_rests_between_changelog_chunks_but_not_once_a_checkpoint_waits_for_it(parts):
    """Detached, the writer rests 8 times as long as each chunk took (at most a quarter of the interval in all);
    the next checkpoint (or the shutdown's) cuts the rest short; a checkpoint in the caller's thread never rests."""
    cfg, _, ckpt, sink, steps = parts
    rested: list[float] = []

    def step():  # a changelog of 3 chunks, each taking 0.02 s
        def send(timeout, rest):
            for _ in range(3):
                start = time.monotonic()
                rest(0.02)
                rested.append(time.monotonic() - start)

        return send, lambda: None

    commit = lambda o, t: steps.append("commit")  # noqa: E731
    assert ckpt.run(sink, lambda: ({TP: 30}, {}), commit, 5.0, step, detach=True)
    ckpt.writer.join()  # the thread alone: ``Checkpointer.join`` would cut its rests short
    assert len(rested) == 3 and all(0.15 < r < 0.5 for r in rested)
    assert ckpt.run(sink, lambda: ({TP: 31}, {}), commit, 5.0, step, detach=True)
    time.sleep(0.05)
    start = time.monotonic()
    assert ckpt.run(sink, lambda: ({TP: 32}, {}), commit, 5.0, step)  # waits for the writer: it stops resting
    assert time.monotonic() - start < 0.1 and len(rested) == 9 and max(rested[4:]) < 0.02
    assert steps.count("commit") == 3


def test_a_state_that_cannot_be_written_is_retried_with_backoff_and_never_committed(parts, monkeypatch):
    cfg, _, ckpt, sink, steps = parts

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write", full)
    commit = lambda o, t: steps.append("commit")  # noqa: E731
    assert ckpt.run(sink, lambda: ({TP: 30}, {}), commit, 5.0) is None
    assert "No space left" in ckpt.error and ckpt.retry_s == 2.0 and not ckpt.due_retry()
    assert ckpt.run(sink, lambda: ({TP: 30}, {}), commit, 5.0) is None
    assert ckpt.retry_s == 4.0 and "commit" not in steps
    monkeypatch.undo()
    assert ckpt.run(sink, lambda: ({TP: 31}, {}), commit, 5.0) is not None
    assert ckpt.error is None and ckpt.retry_s == 1.0 and steps[-1] == "commit"


def test_offsets_going_back_are_refused_and_a_failed_commit_keeps_the_checkpoint(parts):
    cfg, _, ckpt, sink, _ = parts

    def refused(offsets, timeout):
        raise RuntimeError("the group is rebalancing")

    assert ckpt.run(sink, lambda: ({TP: 30}, {}), refused, 5.0) is not None  # the file holds the offsets
    assert ckpt.checkpointed == {TP: 30}
    with pytest.raises(StateError, match="went back"):
        ckpt.run(sink, lambda: ({TP: 29}, {}), lambda o, t: None, 5.0)


def test_a_detached_checkpoint_holds_the_state_it_took_while_the_engine_goes_on(parts, monkeypatch):
    """Periodic checkpoints are written by a thread while the loop processes more events: the file holds
    the state (and window of learned keys) as taken, and the commit comes after the file."""
    cfg, engine, ckpt, sink, steps = parts
    taken = Engine(cfg.engine, cfg.labels)
    taken.load_state(*engine.state())
    went_on, real_write = threading.Event(), checkpoint.write
    monkeypatch.setattr(checkpoint, "write", lambda *a, **kw: went_on.wait(10) and real_write(*a, **kw))
    commits = []
    ckpt.last -= 60.0
    assert ckpt.due(10.0)
    path = ckpt.run(sink, lambda: ({TP: 30}, {}), lambda o, t: commits.append(o), 5.0, detach=True)
    assert not commits and checkpoint.latest(cfg.checkpoint.dir) is None  # not written yet
    assert not ckpt.due(10.0)  # the next periodic checkpoint counts from this one, not the one before
    engine.process(make_stream(n_tasks=4, per_task=10, dim=3, seed=1, ends=False))  # the loop goes on
    went_on.set()
    ckpt.join()
    assert commits == [{TP: 30}] and path == checkpoint.latest(cfg.checkpoint.dir)[0]
    assert not ckpt.due(10.0) and ckpt.due(0.0)
    back = checkpoint.load_engine(cfg.checkpoint.dir, cfg)
    assert back.counters == taken.counters != engine.counters
    assert dict(back.arrivals.learned) == dict(taken.arrivals.learned) != dict(engine.arrivals.learned)
    assert back.tasks.names == taken.tasks.names
    for name, v in taken.state()[0].items():
        assert torch.equal(back.state()[0][name], v), name


def test_a_detached_checkpoint_that_cannot_be_written_sets_the_error_and_commits_nothing(parts, monkeypatch):
    cfg, _, ckpt, sink, steps = parts

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write", full)
    assert ckpt.run(sink, lambda: ({TP: 30}, {}), lambda o, t: steps.append("commit"), 5.0, detach=True)
    ckpt.join()
    assert "No space left" in ckpt.error and "commit" not in steps and checkpoint.latest(cfg.checkpoint.dir) is None
