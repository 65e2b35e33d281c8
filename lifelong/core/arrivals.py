"""Arrival bookkeeping, in arrival order: predictions waiting for their label, the window of (task, id) keys
already learned (a second delivery is a duplicate), event time, and what becomes of each event.

``Arrivals.sort_out`` decides each event's outcome (predicted, learned, a label joined to its prediction,
unmatched, duplicate, control) and returns it; the engine then learns what it says. Pending predictions
expire by count and by TTL in event time; every decision depends only on the order of events, never on how
the stream was cut into batches.
"""

from __future__ import annotations

import math
import operator
import typing
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, KeysView
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import orjson
import torch

from lifelong.config import LabelsConfig
from lifelong.core.clock import EventClock
from lifelong.core.events import Event
from lifelong.core.results import CONTROL, DUPLICATE, LABEL_JOINED, LABEL_UNMATCHED, LEARNED, PREDICTED
from lifelong.core.tasks import TOP


@dataclass
class PendingPrediction:
    """Everything needed to account and learn when the label of an unlabelled prediction arrives."""

    x: torch.Tensor
    kb_experts: torch.Tensor
    top: torch.Tensor
    pred: torch.Tensor
    versions: torch.Tensor


PENDING_FIELDS = ("x", "kb_experts", "top", "pred", "versions")


class PendingLabels:
    """Predictions waiting for their label, oldest first: ``keys`` maps (task, id) to (engine event count,
    event time); ``inputs`` holds a prediction's inputs once its segment is over (within its segment, a label
    joins the prediction's row instead)."""

    def __init__(self) -> None:
        self.keys: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self.inputs: dict[tuple[str, str], PendingPrediction] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def drop(self, key: tuple[str, str]) -> None:
        """Forget one pending prediction."""
        del self.keys[key]
        self.inputs.pop(key, None)

    def drop_tasks(self, names: set[str] | dict[str, Any]) -> None:
        """Forget the pending predictions of tasks ``names``."""
        for key in [k for k in self.keys if k[0] in names]:
            self.drop(key)

    def state(self) -> tuple[dict[str, torch.Tensor], str]:
        """Tensors (each field stacked) and the keys as one JSON string (checkpoints)."""
        keys = list(self.keys)
        tensors = {}
        if keys:
            entries = [self.inputs[k] for k in keys]
            for name in PENDING_FIELDS:
                tensors[f"pending.{name}"] = torch.stack([getattr(en, name) for en in entries]).cpu()
        return tensors, as_json([(*k, *self.keys[k]) for k in keys])

    def load_state(self, tensors: dict[str, torch.Tensor], keys: str | list[Any], device: torch.device) -> None:
        """Restore what ``state`` returned."""
        self.keys, self.inputs = OrderedDict(), {}
        top = tensors.get("pending.top")
        if top is not None and top.shape[1] < len(TOP):  # saved before the shared level: the local one stands in
            pad = top[:, :1].expand(-1, len(TOP) - top.shape[1], -1)
            tensors = {**tensors, "pending.top": torch.cat([top, pad], dim=1)}
        for j, (task, eid, seq, ts) in enumerate(listed(keys)):
            key = (task, eid)
            self.keys[key] = (int(seq), -math.inf if ts is None else float(ts))  # JSON keeps -inf (no time) as null
            self.inputs[key] = PendingPrediction(*(tensors[f"pending.{name}"][j].to(device) for name in PENDING_FIELDS))


@dataclass
class Sorted:
    """What ``Arrivals.sort_out`` decided, per event: its outcome, its task's row, the row of the prediction a
    label joins in the same segment (-1: none, or stored earlier) and the label's delay in event time (NaN:
    not a joined label)."""

    outcome: np.ndarray
    tasks: np.ndarray
    ref: np.ndarray
    delay: np.ndarray


class LearnedWindow:
    """(task, id) of the labelled events learned within the pending window, with the event time each was
    learned at, oldest first: a second delivery of one is a duplicate. A key learned again keeps its place;
    the oldest leave first. Kept so that a checkpoint copies it without a loop over its keys (``encoded``):
    each key learned gets the next entry number (``at``), its time is in an array by entry number (NaN once
    it has left), and the keys are JSON-encoded a chunk at a time as they come."""

    CHUNK = 1024  # keys encoded together

    def __init__(self, items: Iterable[tuple[tuple[str, str], float]] = ()):
        self.at: dict[tuple[str, str], int] = {}  # key -> entry number
        self.order: deque[tuple[str, str]] = deque()  # the keys here, oldest first
        self.base, self.n = 0, 0  # entry number of ``times[0]``; of the next key
        self.times = np.empty(self.CHUNK, np.float64)
        self.chunks: deque[tuple[int, bytes]] = deque()  # (first entry number, its keys as JSON)
        self.fresh: list[tuple[str, str]] = []  # keys not encoded yet, from entry number ``n - len(fresh)``
        pairs = list(items)
        self.add([k for k, _ in pairs], [t for _, t in pairs], len(pairs), new=True)

    def __len__(self) -> int:
        return len(self.at)

    def __contains__(self, key: object) -> bool:
        return key in self.at

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.order)

    def __getitem__(self, key: tuple[str, str]) -> float:
        return float(self.times[self.at[key] - self.base])

    def keys(self) -> KeysView[tuple[str, str]]:
        """The keys in the window."""
        return self.at.keys()

    def items(self) -> Iterator[tuple[tuple[str, str], float]]:
        """(key, time learned), oldest first."""
        return ((k, self[k]) for k in self.order)

    def add(self, keys: list[tuple[str, str]], times: list[float], cap: int, new: bool = False) -> None:
        """Learn ``keys`` at ``times``; ``new``: none of them is here yet (nor twice in ``keys``)."""
        fresh = keys if new else [k for k in dict.fromkeys(keys) if k not in self.at]
        n0, end = self.n, self.n + len(fresh)
        if end - self.base > len(self.times):
            self._room(end)
        self.n = end
        self.at.update(zip(fresh, range(n0, end), strict=True))
        self.order.extend(fresh)
        self.fresh.extend(fresh)
        if len(self.fresh) >= self.CHUNK:
            self.chunks.append((end - len(self.fresh), orjson.dumps(self.fresh)))
            self.fresh = []
        if new:
            self.times[n0 - self.base : end - self.base] = times
        else:  # the last time of a key wins
            learned = dict(zip(keys, times, strict=True))
            self.times[[self.at[k] - self.base for k in learned]] = list(learned.values())
        if len(self.at) > cap:  # the oldest leave, together
            order = self.order
            gone = [order.popleft() for _ in range(len(self.at) - cap)]
            self.times[np.fromiter(map(self.at.pop, gone), np.int64, len(gone)) - self.base] = np.nan

    def _pop(self) -> None:
        self.times[self.at.pop(self.order.popleft()) - self.base] = np.nan

    def _first(self) -> int:
        """Entry number of the first key still encoded: chunks whose keys have all left are dropped first."""
        head = self.at[self.order[0]] if self.order else self.n
        while len(self.chunks) > 1 and self.chunks[1][0] <= head:
            self.chunks.popleft()
        return self.chunks[0][0] if self.chunks else self.n - len(self.fresh)

    def _room(self, end: int) -> None:
        """Room in ``times`` for entries up to ``end``: it starts again at the first entry still encoded."""
        first = self._first()
        old = self.times[first - self.base : self.n - self.base]
        self.times = np.empty(max(self.CHUNK, 2 * (end - first)), np.float64)
        self.times[: len(old)] = old
        self.base = first

    def expire(self, limit: float) -> None:
        """Forget the keys learned before ``limit``."""
        while self.order and self.times[self.at[self.order[0]] - self.base] < limit:
            self._pop()

    def forget(self, tasks: set[str] | dict[str, Any]) -> None:
        """Forget the keys of ``tasks`` (their state was replaced: replayed events are not duplicates)."""
        for key in [k for k in self.at if k[0] in tasks]:
            self.times[self.at.pop(key) - self.base] = np.nan
        self.order = deque(k for k in self.order if k in self.at)

    def encoded(self) -> tuple[str, np.ndarray]:
        """Copies of the keys of the entries from the first chunk not wholly gone on, as one JSON array of
        chunks of keys, and of their times (NaN: gone): what ``decoded`` turns back into the window."""
        first = self._first()
        parts = [c for _, c in self.chunks] + ([orjson.dumps(self.fresh)] if self.fresh else [])
        return (b"[" + b",".join(parts) + b"]").decode(), self.times[first - self.base : self.n - self.base].copy()

    @classmethod
    def decoded(cls, chunks: str, times: np.ndarray) -> LearnedWindow:
        """The window ``encoded`` described."""
        keys = [k for chunk in orjson.loads(chunks) for k in chunk]
        return cls(((k[0], k[1]), float(t)) for k, t in zip(keys, times.tolist(), strict=True) if t == t)


class Arrivals:
    """Pending predictions, the duplicate window and event time; counts what it decides in ``counters`` (the
    engine's, shared)."""

    def __init__(self, labels: LabelsConfig, counters: dict[str, int]):
        self.labels = labels
        self.counters = counters
        self.pending = PendingLabels()
        # (task, id) of labelled events learned within the pending window (TTL and count): a second delivery
        # of one is a duplicate, not learned again
        self.learned = LearnedWindow()
        self.clock = EventClock(labels, counters)

    @property
    def now_ts(self) -> float:
        """The expiry clock: pending predictions and window keys are aged by it (``clock.py``)."""
        return self.clock.now

    def expire_window(self) -> None:
        """Keys learned longer than the pending TTL ago leave the duplicate window."""
        self.learned.expire(self.now_ts - self.labels.pending_ttl_s)

    def forget_tasks(self, names: set[str] | dict[str, Any]) -> None:
        """Drop the pending predictions and window keys of tasks ``names`` (their state was replaced)."""
        self.pending.drop_tasks(names)
        self.learned.forget(names)

    def sort_out(self, evs: list[Event], index: dict[str, int], seg0: int) -> Sorted:
        """What becomes of each of ``evs`` (in arrival order; resident tasks ``index``; ``seg0``: the engine's
        count of the first): pending predictions expire by count and TTL, labels join them, duplicates are
        spotted.

        A plain Python loop over plain Python lists: it runs once per event; the common case takes a shorter
        road with the same result (``plain``).
        """
        n = len(evs)
        learned = self.learned
        times, expiry = self.clock.advance(evs)
        if not self.pending.keys:
            plain = self.plain(evs, index, expiry)
            if plain is not None:
                return plain
        ref, outcome, tasks = [-1] * n, [0] * n, [0] * n
        delay = np.full(n, np.nan)
        ttl, cap = self.labels.pending_ttl_s, self.labels.pending_max
        pending = self.pending.keys
        for j, (e, t, now) in enumerate(zip(evs, times.tolist(), expiry.tolist(), strict=True)):
            while pending:  # the oldest entries expire first; arrival order, so independent of batching
                key, (_, ts) = next(iter(pending.items()))
                if ts >= now - ttl:
                    break
                self._expire(key)
            tasks[j] = index[e.task]
            if e.control is not None:
                outcome[j] = CONTROL
                self.counters["controls"] += 1
            elif e.x is None:
                key = (e.task, e.id or "")
                entry = pending.pop(key, None)
                if entry is None:
                    if key in learned and learned[key] >= now - ttl:
                        outcome[j] = DUPLICATE
                        self.counters["duplicates"] += 1
                    else:
                        outcome[j] = LABEL_UNMATCHED
                        self.counters["label_unmatched"] += 1
                    continue
                outcome[j] = LABEL_JOINED
                learned.add([key], [now], cap)
                delay[j] = t - entry[1]
                if entry[0] >= seg0:
                    ref[j] = entry[0] - seg0
            elif e.y is None:
                outcome[j] = PREDICTED
                key = (e.task, e.id or "")
                if pending.pop(key, None) is not None:
                    self.counters["pending_replaced"] += 1
                self.pending.inputs.pop(key, None)
                pending[key] = (seg0 + j, t)
                while len(pending) > cap:
                    self._expire(next(iter(pending)))
            else:
                if e.id is not None:  # a later delivery of the same (task, id) is a duplicate
                    key = (e.task, e.id)
                    if key in learned and learned[key] >= now - ttl:
                        outcome[j] = DUPLICATE
                        self.counters["duplicates"] += 1
                        continue
                    learned.add([key], [now], cap)
                outcome[j] = LEARNED
        return Sorted(np.array(outcome, np.int8), np.array(tasks, np.int64), np.array(ref, np.int64), delay)

    def plain(self, evs: list[Event], index: dict[str, int], expiry: np.ndarray) -> Sorted | None:
        """``sort_out`` for a segment of labelled events with ids and controls only (``expiry``: the expiry clock
        after each), when no prediction is pending and no (task, id) was seen within the window (else None):
        the common case, in a few passes."""
        names, ids = [e.task for e in evs], [e.id for e in evs]
        keys = typing.cast(list[tuple[str, str]], list(zip(names, ids, strict=True)))  # ids checked below
        control = [e.control is not None for e in evs]
        rest = [e for e, c in zip(evs, control, strict=True) if not c] if True in control else evs
        # every other event labelled, with an id: column by column, a pass in C each (not a generator step per event)
        if None in [e.id for e in rest] or None in [e.y for e in rest]:
            return None
        if any(map(operator.is_, [e.x for e in rest], repeat(None))):
            return None
        learned = keys if rest is evs else [k for k, c in zip(keys, control, strict=True) if not c]
        window = self.learned
        if len(set(learned)) < len(learned) or not window.keys().isdisjoint(learned):
            return None
        tasks = np.fromiter(map(index.__getitem__, names), np.int64, len(keys))
        nows = expiry
        outcome = np.full(len(evs), LEARNED, np.int8)
        if learned is keys:
            window.add(keys, nows.tolist(), self.labels.pending_max, new=True)
        else:
            at = np.array(control)
            outcome[at] = CONTROL
            self.counters["controls"] += int(at.sum())
            window.add(learned, nows[~at].tolist(), self.labels.pending_max, new=True)
        return Sorted(outcome, tasks, np.full(len(evs), -1, np.int64), np.full(len(evs), np.nan))

    def _expire(self, key: tuple[str, str]) -> None:
        self.pending.drop(key)
        self.counters["label_expired"] += 1

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON metadata for a checkpoint (the pending predictions' inputs, the window's keys)."""
        tensors, keys = self.pending.state()
        window, times = self.learned.encoded()  # copies of what was encoded as it was learned
        tensors["window.times"] = torch.from_numpy(times)
        # up to labels.pending_max entries each: one JSON string, not a list of lists (pickled object by object)
        return tensors, {"pending": keys, "window": window, **self.clock.state()}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device) -> None:
        """Restore what ``state`` returned."""
        self.pending.load_state(tensors, meta["pending"], device)
        self.clock.load_state(meta)
        if "window" in meta:
            self.learned = LearnedWindow.decoded(meta["window"], tensors["window.times"].numpy())
        else:  # an earlier version's checkpoint: rows [[task, id], time] or [task, id, time]
            self.learned = LearnedWindow(
                ((r[0][0], r[0][1]), float(r[1])) if len(r) == 2 else ((r[0], r[1]), float(r[2]))
                for r in listed(meta.get("learned_keys", []))
            )


def as_json(rows: list[tuple[Any, ...]]) -> str:
    """Rows as one JSON string (numpy numbers as numbers): a checkpoint's long lists, written fast."""
    return orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def listed(value: str | list[Any]) -> list[Any]:
    """A list saved as one JSON string (or, in checkpoints from before, as a list)."""
    return orjson.loads(value) if isinstance(value, str) else value
