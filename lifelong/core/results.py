"""What one ``Engine.process`` call returns: per-event outputs as arrays, and the prediction records
(DESIGN §3) the daemon sends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lifelong.core.events import Event

KB_TOP = 3  # members listed in each prediction
# Outcome of each event in a batch. A label whose prediction expired (TTL or count) finds nothing to join:
# LABEL_UNMATCHED; the expiry itself is counted in counters["label_expired"]. DUPLICATE: a labelled event
# (or a label) whose (task, id) was already learned within the pending window, delivered again: skipped.
PREDICTED, LEARNED, LABEL_JOINED, LABEL_UNMATCHED, CONTROL, DUPLICATE = range(1, 7)


@dataclass
class BatchResult:
    """Per-event outputs of one ``process`` call, as arrays in batch order (NaN where not applicable)."""

    events: list[Event]
    outcome: np.ndarray
    pred: np.ndarray
    p_local: np.ndarray
    p_kb: np.ndarray
    w_local: np.ndarray
    errors: np.ndarray  # [n, 3]: combined, local, KB level (0/1 for classification, squared error otherwise)
    losses: np.ndarray  # [n, 3]: the mixing loss of the same three
    learned_before: np.ndarray  # labels the task had learned before the event (the wire field "model_version")
    task_index: np.ndarray
    kb_slots: np.ndarray  # [n, KB_TOP] expert index of the heaviest KB experts, weights in kb_weights
    kb_weights: np.ndarray
    segment: np.ndarray  # which entry of kb_names names the experts of each event
    label_delay: np.ndarray  # event-time seconds from a prediction to its delayed label (joined labels)
    kb_names: list[list[str]] = field(default_factory=list)
    seq0: int = 0  # engine event count before this batch

    @classmethod
    def empty(cls, events: list[Event], n_pred: int) -> BatchResult:
        """A result for ``events`` with nothing filled in yet."""
        n = len(events)
        nan = np.full((n, n_pred), np.nan)
        return cls(
            events,
            np.zeros(n, np.int8),
            nan.copy(),
            nan.copy(),
            nan.copy(),
            np.full(n, np.nan),
            np.full((n, 3), np.nan),
            np.full((n, 3), np.nan),
            np.zeros(n, np.int64),
            np.zeros(n, np.int64),
            np.zeros((n, KB_TOP), np.int64),
            np.zeros((n, KB_TOP)),
            np.zeros(n, np.int64),
            np.full(n, np.nan),
        )

    def records(self, task_kind: str, offsets: list[int] | None = None) -> list[tuple[int, dict[str, Any]]]:
        """Prediction records (DESIGN §3) with their position in the batch, for every predicted event; with
        ``offsets`` (each event's source record offset), each record's ``offset``.

        Numbers are rounded and converted for the whole batch at once: this runs for every prediction.
        """
        rows = np.flatnonzero((self.outcome == PREDICTED) | (self.outcome == LEARNED))
        if not len(rows):
            return []
        regression = task_kind == "regression"
        cols = [0] if regression else slice(None)
        proba, local, kb = (np.round(a[rows][:, cols], 6).tolist() for a in (self.pred, self.p_local, self.p_kb))
        if regression:  # one number each; the prediction as it is
            y_pred, local, kb = self.pred[rows, 0].tolist(), [p for (p,) in local], [p for (p,) in kb]
        else:
            y_pred = self.pred[rows].argmax(1).tolist()
        # kb_top: [name, weight] of the heaviest experts with weight > 0, names looked up for all rows at once
        names = np.array([n for seg in self.kb_names for n in seg], dtype=object)
        first = np.cumsum([0] + [len(seg) for seg in self.kb_names])[self.segment[rows]]
        weights = np.round(self.kb_weights[rows], 6)
        top = np.empty((len(rows), KB_TOP, 2), dtype=object)
        top[..., 0], top[..., 1] = names[first[:, None] + self.kb_slots[rows]], weights
        tops = top.tolist()
        for j in np.flatnonzero((weights <= 0).any(axis=1)).tolist():
            tops[j] = [p for p in tops[j] if p[1] > 0]
        columns = [rows.tolist(), y_pred, local, kb, np.round(self.w_local[rows], 6).tolist(), tops]
        columns += [self.learned_before[rows].tolist(), proba]
        events, out = self.events, []
        for i, y, p_local, p_kb, w_local, kb_top, version, p in zip(*columns, strict=True):
            e = events[i]
            rec: dict[str, Any] = {"task": e.task, "id": e.id, "y_pred": y}
            if not regression:
                rec["proba"] = p
            rec["p_local"], rec["p_kb"], rec["w_local"], rec["kb_top"] = p_local, p_kb, w_local, kb_top
            rec["model_version"] = version
            if offsets is not None:
                rec["offset"] = offsets[i]
            out.append((i, rec))
        return out
