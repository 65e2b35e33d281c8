"""One event at a time, at the engine's speed: what ``Engine.process`` and ``Engine.predict`` do for a single event,
in one compiled call (the River estimators' ``learn_one`` and ``predict_*_one``).

``Engine.process`` pays for a batch's bookkeeping on every call: planning, segments, torch tensors, result
objects. For one labelled event without an id or a time, all it computes is: standardise, the task's learner
and basis code predict then learn, the KB's members and the shared level predict (the shared level learns),
both mixtures, the statistics. ``OneEvent`` computes that in one compiled kernel (``_one``) over views of the
engine's own arrays, by calling the compiled steps the engine's compiled path calls (``_standardise``,
``ekf._sequence``, ``shared._step``, ``hedge.mix_events``); the rest (a new task's row, KB entry and code
carrying, counters, the task's use, ``Recent``, snapshots, estimates and publications at their counts,
``Engine._guard``) is done in Python as ``process`` does it. Where arrivals would decide more than "learned"
(a pending prediction, event time), and for float32, CUDA or non-EKF engines, ``learn`` and ``predict`` return
None and the caller calls the engine. Equal to ``process`` and ``predict`` within float rounding (tested to
1e-9).
"""

from __future__ import annotations

import math
import time
import typing
from typing import Any

import numba
import numpy as np
import torch

from lifelong.core import recent
from lifelong.core.engine import Engine
from lifelong.core.features import _standardise
from lifelong.core.hedge import EPS, LOSS_CODES, mix_events
from lifelong.core.learners.ekf import TASK_CODES, _sequence, softmax
from lifelong.core.learners.stacked import TorchLearners
from lifelong.core.mixtures import EARLY_N
from lifelong.core.results import KB_TOP
from lifelong.core.shared import _step

LEARNER_BAD, CODE_BAD = 1, 2  # what ``_one`` returns: the task's learner, or its basis code, holds a non-finite value


@numba.njit(cache=True, error_model="numpy")
def _to_pred(logits: np.ndarray, task: int, lo: float, hi: float, out: np.ndarray) -> None:
    """``Learners.to_pred`` of one row of logits (``task``: ``TASK_CODES``): ``_finish_pred`` after the sigmoid,
    softmax or clamp, for one row."""
    n_pred = out.shape[0]
    if task == 2:
        out[0] = lo + (hi - lo) * min(max(logits[0], 0.0), 1.0)
        return
    scale = 1.0 / (1.0 + EPS * n_pred)
    if task == 0:
        p1 = 1.0 / (1.0 + math.exp(-logits[0]))
        out[0], out[1] = (1.0 - p1 + EPS) * scale, (p1 + EPS) * scale
        return
    softmax(logits, out)
    for c in range(n_pred):
        out[c] = (out[c] + EPS) * scale


@numba.njit(cache=True, error_model="numpy")
def _safe(out: np.ndarray, task: int, lo: float, hi: float) -> None:
    """``Learners.safe`` of one prediction: the uninformed one if any value is not finite."""
    if np.isfinite(out).all():
        return
    out[:] = (lo + hi) / 2 if task == 2 else 1.0 / out.shape[0]


@numba.njit(cache=True, error_model="numpy")
def _finite(a: np.ndarray) -> bool:
    for v in a.flat:  # noqa: SIM110 (compiled: a loop, not a generator)
        if v - v != 0.0:  # inf - inf and NaN - NaN are NaN
            return False
    return True


@numba.njit(cache=True, error_model="numpy")
def _finish(raw: np.ndarray, task: int, lo: float, hi: float, out: np.ndarray) -> None:
    """An EKF's prediction from its raw outputs (mean, variance per output; ``ekf.predictive_logits``), safe."""
    n_out = raw.shape[0] // 2
    logits = np.empty(n_out)
    for c in range(n_out):
        logits[c] = raw[c] if task == 2 else raw[c] / math.sqrt(1.0 + math.pi * raw[n_out + c] / 8.0)
    _to_pred(logits, task, lo, hi, out)
    _safe(out, task, lo, hi)


@numba.njit(cache=True, error_model="numpy")
def _one(
    t: int,
    c: int,
    x_raw: np.ndarray,
    y: float,
    lab: bool,
    mu: np.ndarray,
    S: np.ndarray,
    code_mu: np.ndarray,
    code_S: np.ndarray,
    me_prec: np.ndarray,
    me_nat: np.ndarray,
    L_kb: np.ndarray,
    in_kb: np.ndarray,
    L_top: np.ndarray,
    in_top: np.ndarray,
    stats: np.ndarray,
    counts: np.ndarray,
    feat: np.ndarray,
    B: np.ndarray,
    W: np.ndarray,
    b: np.ndarray,
    w: np.ndarray,
    w_S: np.ndarray,
    sigma: np.ndarray,
    log_prior: np.ndarray,
    top_prior: np.ndarray,
    task: int,
    code: int,
    basis_on: bool,
    shared_on: bool,
    eta_fixed: float,
    m_kb: float,
    lo: float,
    hi: float,
    pred: np.ndarray,
) -> int:
    """One event of task row ``t`` (its code: row ``c`` of ``code_mu``, ``code_S``; features ``x_raw``; label ``y``
    when ``lab``, which also moves the standardiser): ``Engine._segment`` for a segment of one event, its
    prediction into ``pred``. Without ``lab``, ``Engine.predict`` (nothing moves). Returns ``LEARNER_BAD`` |
    ``CODE_BAD`` for a learner or code left holding a non-finite value (``Engine._guard``), else 0."""
    d, n_pred, n_kb = x_raw.shape[0], pred.shape[0], W.shape[1] // mu.shape[1]
    n_out = mu.shape[1]
    x1 = np.ones((1, d + 1))
    x1[0, :d] = x_raw
    _standardise(feat, x1[:, :d], lab)
    target = np.full(1, (y - lo) / (hi - lo) if task == 2 else y)
    tasks, labelled, no_snap = np.full(1, t), np.full(1, lab), np.full(1, -1)
    top = np.empty((1, len(top_prior), n_pred))
    kb_x = np.empty((1, 1 + n_kb, n_pred))
    raw = np.empty((1, 2 * n_out))
    _sequence(mu, S, tasks, x1, target, labelled, task, raw, no_snap, np.empty((1, n_out, d + 1)))
    _finish(raw[0], task, lo, hi, top[0, 0])
    kb_x[0, 0] = 0.0
    if basis_on:
        z = np.zeros((1, B.shape[1]))  # x1 @ B
        for a in range(d + 1):
            for k in range(B.shape[1]):
                z[0, k] += x1[0, a] * B[a, k]
        codes = np.full(1, c)
        _sequence(code_mu, code_S, codes, z, target, labelled, task, raw, no_snap, np.empty((1, n_out, B.shape[1])))
        _finish(raw[0], task, lo, hi, kb_x[0, 0])
    logits = b.copy()  # every member's logits [K * C]: W is [d, K * C], so the inner loop runs along a row
    for j in range(d):
        xj = x1[0, j]
        for k in range(len(logits)):
            logits[k] += xj * W[j, k]
    for s in range(n_kb):
        _to_pred(logits[s * n_out : (s + 1) * n_out], task, lo, hi, kb_x[0, 1 + s])
    for k in range(1, top.shape[1]):
        top[0, k] = top[0, 0]
    if shared_on:
        out = np.empty((1, 2, n_out))
        _step(w, w_S, me_prec, me_nat, sigma, tasks, x1, target, labelled, task, out)
        for e in range(2):
            _to_pred(out[0, e], task, lo, hi, top[0, 2 + e])
            _safe(top[0, 2 + e], task, lo, hi)
    bad = 0
    if lab and not (_finite(mu[t]) and _finite(S[t])):
        bad |= LEARNER_BAD
    if lab and basis_on and not (_finite(code_mu[c]) and _finite(code_S[c])):
        bad |= CODE_BAD
    n_before = np.full(1, counts[t])
    if lab:
        counts[t] += 1
    k = min(KB_TOP, 1 + n_kb)
    preds = np.empty((3, 1, n_pred))
    mix_events(
        tasks,
        np.zeros(1, np.int64),
        np.ones(1, np.bool_),
        labelled,
        np.zeros(1, np.int64),
        n_before,
        np.full(1, y),
        top,
        kb_x,
        no_snap,
        np.empty((0, 1 + n_kb, n_pred)),
        np.empty((0, top.shape[1], n_pred)),
        np.empty((0, n_pred)),
        L_kb,
        in_kb,
        L_top,
        in_top,
        stats,
        log_prior,
        top_prior,
        code,
        task == 2,
        eta_fixed,
        m_kb,
        lo,
        hi,
        EARLY_N,
        preds[0],
        preds[1],
        preds[2],
        np.empty(1),
        np.empty((1, k), np.int64),
        np.empty((1, k)),
        np.empty((1, 3)),
        np.empty((1, 3)),
    )
    pred[:] = preds[2, 0]
    return bad


PER_TASK = 12  # the first arguments of ``_one`` after the event's: arrays with a row per task


class OneEvent:
    """The single-event path of one engine. ``learn`` and ``predict`` return None where the event needs the
    engine's general path; ``stale`` must be called after anything other than this path changed the engine (its
    arrays are read as views, and a call of ``process`` may grow or replace them).

    ``predict`` brings a task's KB entry (``KbEntry.meet``) forward to the prediction, where ``Engine.predict``
    enters the experts on a copy: entry gives the same whenever it happens before the task's next event (its
    losses do not move in between), so no prediction or figure changes; a code carried into the current basis
    is kept aside for the task's next event, which stores it (carrying twice would rotate it twice)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        cfg = engine.cfg
        self.able = engine.compiled and cfg.dtype == "float64" and engine.learners.linear
        self.learners = typing.cast(TorchLearners, engine.learners)  # ``compiled``: EKF learners in torch
        self.every, self.at = cfg.snapshot_every, frozenset(cfg.snapshot_at)
        self.pred = np.empty(engine.n_pred)
        self.views: tuple[Any, ...] | None = None
        self.kb_seen = self.code_at = np.zeros(0, np.int64)  # views of the task table's columns (``_views``)
        self.recent: dict[str, np.ndarray] = {}  # the columns ``Recent`` keeps (``_views``)
        self.fresh: list[np.ndarray] | None = None  # a new task's rows (``_new``), until the views are read again
        # the last code carried by ``predict``: (row, basis it was in, basis it is in now, code, covariance)
        self.carried: tuple[int, int, int, np.ndarray, np.ndarray] | None = None
        self.taken = 0  # events learned by this path

    def __getstate__(self) -> dict[str, Any]:
        # a copy's views would be of copied arrays, not its engine's: it reads its own engine's again
        unbound = np.zeros(0, np.int64)
        return {**self.__dict__, "views": None, "kb_seen": unbound, "code_at": unbound, "recent": {}}

    def stale(self) -> None:
        """The engine changed by another path: read its arrays again at the next event."""
        self.views, self.carried = None, None

    def _views(self) -> tuple[Any, ...]:
        """``_one``'s arguments after the event's: views of the engine's arrays, then its settings."""
        eng = self.engine
        cols, kb, shared, cfg, mix = eng.tasks.cols, eng.kb, eng.shared, eng.cfg, eng.mixtures
        none = np.zeros((1, 1, 1))
        prior = mix.kb_log_prior()
        self.kb_seen, self.code_at = cols["kb_seen"].numpy(), cols["code_at"].numpy()
        self.recent = {k: cols[k].numpy() for k in recent.KEYS}
        self.fresh = None
        self.views = (
            self.learners.params["mu"].numpy(),
            self.learners.params["S"].numpy(),
            kb.mu.numpy(),
            kb.S.numpy(),
            *(cols[k].numpy() for k in ("me_prec", "me_nat", "L_kb", "in_kb", "L_top", "in_top", "stats")),
            eng.tasks.counts,
            eng.features.stats,
            kb.B.numpy(),
            kb.store["w"].permute(1, 0, 2).reshape(cfg.dim, -1).numpy().copy(),  # [d, K * C] (``_one``)
            kb.store["b"].reshape(-1).numpy().copy(),
            none[0] if shared is None else shared.w,
            none if shared is None else shared.w_S,
            none[0] if shared is None else shared.sigma,
            np.zeros(mix.n_experts) if prior is None else prior.numpy(),
            mix.top_log_prior().numpy(),
            TASK_CODES[cfg.task],
            LOSS_CODES[mix.kb_mix.loss_name],
            kb.basis_on,
            shared is not None,
            mix.kb_mix.fixed_eta or 0.0,
            float(mix.kb_mix.hedge_m),
            *cfg.target_range,
            self.pred,
        )
        return self.views

    def _meet(self, t: int) -> None:
        """Task row ``t`` meets the KB as it is now (``KbEntry.meet``), where it has not yet."""
        if self.kb_seen[t] < self.engine.kb.applied:
            self.engine.entry.meet(np.array([t]))

    def _code(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Task row ``t``'s code carried into the current basis (``KnowledgeBase.carried``), kept aside."""
        kb, at = self.engine.kb, int(self.code_at[t])
        if self.carried is None or self.carried[:3] != (t, at, kb.basis_at):
            mu, S = kb.carried(torch.tensor([t]), np.array([at]))
            self.carried = (t, at, kb.basis_at, mu[0].numpy().copy(), S[0].numpy().copy())
        return self.carried[3], self.carried[4]

    def predict(self, task: str, x: np.ndarray) -> np.ndarray | None:
        """``Engine.predict`` of one event of ``task`` with features ``x`` (float64), or None."""
        eng = self.engine
        t = eng.tasks.index.get(task)
        if not self.able or (t is None and eng.residency.store is not None):  # it may be in the store
            return None
        views = self.views or self._views()
        if t is None:  # a new task's rows: the same for every task not a KB member's source, until the KB moves
            if task in eng.kb.slot_of:
                new = self._new(task)
            else:
                new = self.fresh = self.fresh or self._new(task)
            rows: tuple[Any, ...] = (*new, *views[PER_TASK:])
            _one(0, 0, x, 0.0, False, *rows)
            return self.pred
        self._meet(t)
        if self.code_at[t] == eng.kb.basis_at:
            _one(t, t, x, 0.0, False, *views)
        else:
            code = self._code(t)
            rows = (*views[:2], code[0][None], code[1][None], *views[4:])
            _one(t, 0, x, 0.0, False, *rows)
        return self.pred

    def _new(self, task: str) -> list[np.ndarray]:
        """A new task's rows of ``_one``'s per-task arrays, as its first event would find them (``Engine.predict``)."""
        eng = self.engine
        kb = eng.kb
        tables = eng.tasks.empty(1)
        eng.tasks.start(tables, slice(None), kb.basis_at)
        eng.entry.meet(np.zeros(1, np.int64), tables, names={task: 0})
        learner = [v.numpy() for v in self.learners.fresh(np.array([eng.n_tasks])).values()]
        codes = [kb.prior_mu.expand(1, *kb.prior_mu.shape), kb.prior_S.expand(1, kb.n_out, *kb.prior_S.shape)]
        rows = [*learner, *(c.contiguous().numpy() for c in codes)]
        names = ("me_prec", "me_nat", "L_kb", "in_kb", "L_top", "in_top", "stats")
        return [*rows, *(tables[k].numpy() for k in names), np.zeros(1, np.int64)]

    def learn(self, task: str, x: np.ndarray, y: float) -> np.ndarray | None:
        """``Engine.process`` of one labelled event (no id, no time) of ``task``: its prediction, or None."""
        eng = self.engine
        arrivals, tasks = eng.arrivals, eng.tasks
        clock = arrivals.clock
        if not self.able or arrivals.pending.keys or clock.now != -math.inf or 0 not in clock.column:
            return None  # arrivals would decide more than "learned"
        tasks.batch += 1
        t = tasks.index.get(task)
        if t is None:  # ``Engine._plan``: a new task (or one in the store) gets a row
            eng.residency.admit([task])
            t = tasks.index[task]
            self.stale()
        views = self.views or self._views()
        self._meet(t)
        if self.code_at[t] != eng.kb.basis_at:  # ``KbEntry.carry_codes``
            views[2][t], views[3][t] = self._code(t)
            self.code_at[t] = eng.kb.basis_at
        bad = _one(t, t, x, float(y), True, *views)
        clock.seen[clock.column[0]] = time.time()
        tasks.used[t], tasks.dirty[t] = tasks.batch, True
        counters = eng.counters
        counters["learned"] += 1
        counters["predicted"] += 1
        n = int(tasks.counts[t])
        if (self.every > 0 and n % self.every == 0) or n in self.at:  # a KB snapshot follows (``steps.compiled``)
            store = eng.learners.members_from_ekf(views[0][t : t + 1].copy())[0]
            eng.staging.stage(t, task, n, eng.events_seen, store)
        if bad:
            self._guard(t, bad)
        if eng.shared is not None:
            eng.shared.learned += 1
        eng.recent.add_one(task, self.recent, t)
        eng.events_seen += 1
        if eng.events_seen == eng.next_estimate:
            eng._estimate()
            self.views = None
        if eng.events_seen % eng.cfg.publish_every == 0:
            eng._publish()
            self.views = None
        self.taken += 1
        return self.pred

    def _guard(self, t: int, bad: int) -> None:
        """``Engine._guard``: a non-finite learner or code restarts untrained (its prediction was made before)."""
        eng = self.engine
        if bad & LEARNER_BAD:
            eng.learners.load_task(t, None)
            eng.counters["reset_learner"] += 1
        if bad & CODE_BAD:
            eng.kb.mu[t], eng.kb.S[t] = eng.kb.prior_mu, eng.kb.prior_S
            eng.counters["reset_code"] += 1
