"""Shared fixtures: factories for engines and small streams."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lifelong.config import EngineConfig, LabelsConfig
from lifelong.core.engine import Engine
from lifelong.core.events import Event
from lifelong.tools.broker import EmbeddedBroker

T0 = 1_760_000_000.0


def make_stream(
    n_tasks: int = 6,
    per_task: int = 30,
    dim: int = 5,
    block: int = 4,
    seed: int = 0,
    task: str = "binary",
    n_classes: int = 2,
    delayed: float = 0.0,
    ends: bool = True,
) -> list[Event]:
    """Interleaved, recurring tasks in blocks; a fraction ``delayed`` of labels arrive later as label-only
    events; ``control: end`` after each task's last block."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(dim, n_classes if task == "multiclass" else 1))
    blocks = []
    for k in range(n_tasks):
        w = shared + 0.5 * rng.normal(size=shared.shape)
        for b in range(0, per_task, block):
            blocks.append((rng.random() + b / per_task * 3, k, w, b))
    events: list[Event] = []
    waiting: list[Event] = []
    for _, k, w, b in sorted(blocks, key=lambda t: t[0]):
        for i in range(b, min(per_task, b + block)):
            x = rng.normal(size=dim).astype(np.float32)
            s = x @ w
            if task == "regression":
                y: int | float = float(np.clip(s[0] / 4 + 0.5, 0, 1))
            elif task == "multiclass":
                y = int(np.argmax(s + rng.gumbel(size=s.shape)))
            else:
                y = int(rng.random() < 1 / (1 + np.exp(-s[0])))
            eid = f"t{k}-{i}"
            ts = T0 + len(events)  # event time in epoch seconds, like Kafka record timestamps
            if rng.random() < delayed:
                events.append(Event(f"t{k}", eid, x, None, ts=ts))
                waiting.append(Event(f"t{k}", eid, None, y, ts=ts))
            else:
                events.append(Event(f"t{k}", eid, x, y, ts=ts))
            if waiting and rng.random() < 0.3:
                events.append(waiting.pop(0))
        if ends and b + block >= per_task:
            events.append(Event(f"t{k}", None, control="end", ts=T0 + len(events)))
    events.extend(waiting)
    return events


@pytest.fixture
def engine_factory():
    def make(labels: LabelsConfig | None = None, **changes) -> Engine:
        base = EngineConfig(dim=5, kb_capacity=4, snapshot_every=8, publish_every=16, dtype="float64")
        return Engine(dataclasses.replace(base, **changes), labels)

    return make


@pytest.fixture(params=["kafka-python", "confluent"])
def client(request):
    """``kafka.client``: the real-broker tests of the commit protocol, crashes, outages, bad input and scale-out
    run against both transports."""
    return request.param


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A real Kafka-compatible broker (tansu) on a free loopback port, one per test module."""
    with EmbeddedBroker(log=tmp_path_factory.mktemp("broker") / "tansu.log") as b:
        yield b
