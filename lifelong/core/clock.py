"""Event time that one record cannot move arbitrarily: per partition, the largest trusted event time seen, and
the expiry clock that pending predictions and the duplicate window are aged by.

An event's time (``ts``; the daemon uses the Kafka record's timestamp when it has none) is trusted unless it
lies beyond this machine's clock plus ``labels.max_future_s`` (``future``) or before its partition's event
time by more than ``labels.max_lateness_s`` (``late``). An untrusted time is replaced by its partition's event
time (so it moves nothing) and counted; the event itself is predicted and learned as any other. The expiry
clock is the smallest event time over the partitions that had an event in the last
``labels.idle_partition_s`` seconds (a watermark, as stream processors bound out-of-order time): one
partition running ahead never expires another's pending predictions, and a silent one stops holding the
others back. With one partition and trusted times this is the running maximum of event time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from lifelong.config import LabelsConfig
from lifelong.core.events import Event

FUTURE, LATE = 1, 2  # why an event's time was not trusted (``event_times``'s flags)


@numba.njit(cache=True)
def event_times(
    ts: np.ndarray,
    part: np.ndarray,
    clocks: np.ndarray,
    active: np.ndarray,
    limit: float,
    wall: float,
    lateness: float,
    times: np.ndarray,
    expiry: np.ndarray,
    flags: np.ndarray,
) -> None:
    """Per event in order: its trusted time (``times``; NaN in ``ts``: none, so its partition's time), why it
    was replaced (``flags``), and the expiry clock after it (``expiry``). ``clocks`` (each partition's event
    time) and ``active`` (partitions that hold expiry back) advance."""
    for j in range(len(ts)):
        p = part[j]
        clock = clocks[p]
        t = ts[j]
        if t != t:
            t = clock
        elif t > limit:
            flags[j] = FUTURE
            t = clock if clock > -math.inf else wall
        elif t < clock - lateness:
            flags[j] = LATE
            t = clock
        times[j] = t
        if t > clock:
            clocks[p] = t
        active[p] = True
        low = math.inf
        for q in range(len(clocks)):
            if active[q] and clocks[q] > -math.inf and clocks[q] < low:
                low = clocks[q]
        expiry[j] = low if low < math.inf else -math.inf


class EventClock:
    """Each partition's event time and the expiry clock; counts untrusted times in ``counters``
    (``time_future``, ``time_late``). ``wall`` is this machine's clock (a parameter for tests)."""

    def __init__(self, labels: LabelsConfig, counters: dict[str, int], wall: Callable[[], float] = time.time):
        self.labels, self.counters, self.wall = labels, counters, wall
        self.column: dict[int, int] = {}  # partition -> its entry in ``clocks`` and ``seen``
        self.clocks = np.empty(0, np.float64)  # each partition's event time
        self.seen = np.empty(0, np.float64)  # this machine's time at each partition's last event
        self.now = -math.inf  # the expiry clock after the last event

    def advance(self, evs: list[Event]) -> tuple[np.ndarray, np.ndarray]:
        """Each event's trusted time and the expiry clock after it, in arrival order."""
        n, wall = len(evs), self.wall()
        column = self.column
        parts = [e.partition for e in evs]
        present = set(parts)
        if not present <= column.keys():
            for p in parts:
                column.setdefault(p, len(column))
            grow = len(column) - len(self.clocks)
            self.clocks = np.concatenate([self.clocks, np.full(grow, -math.inf)])
            self.seen = np.concatenate([self.seen, np.full(grow, -math.inf)])
        if len(present) == 1:  # the common case: one partition (and always offline)
            part = np.full(n, column[parts[0]], np.int64)
        else:
            part = np.fromiter(map(column.__getitem__, parts), np.int64, n)
        stamps = [e.ts for e in evs]
        if None in stamps:
            stamps = [math.nan if v is None else v for v in stamps]
        ts = np.array(stamps, np.float64)
        active = wall - self.seen <= self.labels.idle_partition_s
        times, expiry, flags = np.empty(n), np.empty(n), np.zeros(n, np.int8)
        limit = wall + self.labels.max_future_s
        event_times(ts, part, self.clocks, active, limit, wall, self.labels.max_lateness_s, times, expiry, flags)
        self.seen[part] = wall
        if flags.any():
            self.counters["time_future"] += int((flags == FUTURE).sum())
            self.counters["time_late"] += int((flags == LATE).sum())
        self.now = float(expiry[-1])
        return times, expiry

    def state(self) -> dict[str, Any]:
        """JSON metadata for a checkpoint: each partition's event time and the expiry clock."""
        clocks = [[p, float(self.clocks[c])] for p, c in self.column.items()]
        return {"now_ts": self.now, "clocks": clocks}

    def load_state(self, meta: dict[str, Any]) -> None:
        """Restore what ``state`` returned (a checkpoint from before partitions had clocks: one clock, partition
        0's). Every partition counts as just seen."""
        self.now = float(meta["now_ts"])
        clocks = meta.get("clocks", [[0, self.now]] if self.now > -math.inf else [])
        self.column = {int(p): c for c, (p, _) in enumerate(clocks)}
        self.clocks = np.array([float(t) for _, t in clocks], np.float64)
        self.seen = np.full(len(clocks), self.wall())
