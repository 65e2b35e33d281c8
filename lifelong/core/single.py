"""One event at a time, at the engine's speed: what ``Engine.process`` and ``Engine.predict`` do for a single event,
in one compiled call (the River estimators' ``learn_one`` and ``predict_*_one``).

``Engine.process`` pays for a batch's bookkeeping on every call: planning, segments, torch tensors, result
objects. For one labelled event without an id or a time, all it computes is: standardise, the task's learner
and basis code predict then learn, the KB's members and the shared level predict (the shared level learns),
both mixtures, the statistics. ``OneEvent`` computes that in one compiled kernel (``_one``) over views of the
engine's own arrays, by calling the compiled steps the engine's compiled path calls (``_standardise``,
``ekf._sequence``, ``shared._step``, ``hedge.mix_events``); the rest (a new task's row, KB entry and code
carrying, counters, the task's use, snapshots, estimates and publications at their counts, ``Engine._guard``) is
done in Python as ``process`` does it, and the rows it learned go to ``Recent`` when something reads it
(``flush``). A ``learn`` of the event ``predict`` just predicted (River's ``predict_proba_one`` then
``learn_one``) starts from what the prediction computed (``LEARN_KEPT``): the learning half only. Where
arrivals would decide more than "learned" (a pending prediction, event time), and for float32, CUDA or non-EKF
engines, ``learn`` and ``predict`` return None and the caller calls the engine. Equal to ``process`` and
``predict`` within float rounding (tested to 1e-9).
"""

from __future__ import annotations

import math
import time
import typing
from typing import Any

import numba
import numpy as np
import torch
from numba.core import types
from numba.experimental import structref

from lifelong.core.engine import Engine
from lifelong.core.features import _standardise
from lifelong.core.hedge import EPS, LOSS_CODES, enter_experts, mix_events
from lifelong.core.learners.ekf import TASK_CODES, _sequence, softmax
from lifelong.core.learners.stacked import TorchLearners
from lifelong.core.mixtures import EARLY_N
from lifelong.core.results import KB_TOP
from lifelong.core.shared import _step
from lifelong.core.tasks import STAT

LEARNER_BAD, CODE_BAD = 1, 2  # what ``_one`` returns: the task's learner, or its basis code, holds a non-finite value


@numba.njit(cache=True, error_model="numpy")
def _to_pred(logits: np.ndarray, task: int, lo: float, hi: float, out: np.ndarray) -> None:
    """``Learners.to_pred`` of rows of logits ``[K, C]`` into ``out [K, P]`` (``task``: ``TASK_CODES``):
    ``_finish_pred`` after the sigmoid, softmax or clamp."""
    n_pred = out.shape[1]
    scale = 1.0 / (1.0 + EPS * n_pred)
    for k in range(logits.shape[0]):
        if task == 2:
            out[k, 0] = lo + (hi - lo) * min(max(logits[k, 0], 0.0), 1.0)
        elif task == 0:
            p1 = 1.0 / (1.0 + math.exp(-logits[k, 0]))
            out[k, 0], out[k, 1] = (1.0 - p1 + EPS) * scale, (p1 + EPS) * scale
        else:
            softmax(logits[k], out[k])
            for c in range(n_pred):
                out[k, c] = (out[k, c] + EPS) * scale


@numba.njit(cache=True, error_model="numpy")
def _safe(out: np.ndarray, task: int, lo: float, hi: float) -> None:
    """``Learners.safe`` of one prediction: the uninformed one if any value is not finite."""
    if np.isfinite(out).all():
        return
    out[:] = (lo + hi) / 2 if task == 2 else 1.0 / out.shape[0]


@numba.njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _finite(a: np.ndarray) -> bool:
    """Whether every value of ``a`` is finite: a sum of zeros that any infinity or NaN turns into NaN (summed in
    any order: vectorised)."""
    acc = 0.0
    for v in a.flat:
        acc += v * 0.0
    return acc == 0.0


@numba.njit(cache=True, error_model="numpy")
def _finish(raw: np.ndarray, task: int, lo: float, hi: float, out: np.ndarray) -> None:
    """An EKF's prediction from its raw outputs (mean, variance per output; ``ekf.predictive_logits``), safe."""
    n_out = raw.shape[0] // 2
    logits = np.empty((1, n_out))
    for c in range(n_out):
        logits[0, c] = raw[c] if task == 2 else raw[c] / math.sqrt(1.0 + math.pi * raw[n_out + c] / 8.0)
    _to_pred(logits, task, lo, hi, out.reshape((1, -1)))
    _safe(out, task, lo, hi)


@structref.register
class _ViewsType(types.StructRef):
    def preprocess_fields(self, fields: Any) -> tuple[tuple[str, Any], ...]:
        return tuple((name, types.unliteral(typ)) for name, typ in fields)  # type: ignore[no-untyped-call]


class Views(structref.StructRefProxy):
    """``_one``'s arguments after the event's, in one object: views of the engine's arrays (those with a row per task
    first, ``PER_TASK``), its settings, then ``_one``'s own arrays (``room``). One argument in place of 31: a compiled
    call pays for each argument it is given (its type checked, an array wrapped), ~2 µs for 31, twice an event."""


FIELDS = (
    *("mu", "S", "code_mu", "code_S", "me_prec", "me_nat", "L_kb", "in_kb", "L_top", "in_top", "stats", "counts"),
    *("feat", "B", "W", "b", "w", "w_S", "sigma", "log_prior", "top_prior"),
    *("task", "code", "basis_on", "shared_on", "eta_fixed", "m_kb", "lo", "hi", "pred", "kept", "work"),
)
PER_TASK = 12  # the first of ``FIELDS``: arrays with a row per task
structref.define_proxy(Views, _ViewsType, list(FIELDS))  # type: ignore[no-untyped-call]


@numba.njit(cache=True)
def _pack(*fields: Any) -> Any:
    """``Views`` of ``FIELDS``, built by compiled code that numba caches on disk (``Views(...)`` would compile its
    constructor in every process)."""
    return Views(*fields)  # type: ignore[no-untyped-call]


PREDICT, LEARN, LEARN_KEPT = 0, 1, 2  # ``_one``'s modes: predict; predict then learn; learn what PREDICT kept


def room(d: int, n_out: int, k: int, n_top: int, n_kb: int, n_pred: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """``_one``'s arrays, made once (``d`` features, a basis of ``k``, ``n_kb`` KB members), not at every call (a
    call's small allocations cost ~1 µs): ``kept``, what ``PREDICT`` keeps of its forward pass for the event's
    learning (``LEARN_KEPT``), and ``work``, room for the rest (in the order ``_one`` names them)."""
    e, i, r, n_mix = np.empty, np.int64, d + 1, min(KB_TOP, 1 + n_kb)
    kept = (
        *(e((1, r)), e((n_out, r)), e((3, n_out, r)), e((1, k)), e((n_out, k))),  # inputs and S z of each learner
        *(e((1, 2 * n_out)), e((1, 2 * n_out)), e((4, n_out))),  # their means and variances
        *(e((1, n_top, n_pred)), e((1, 1 + n_kb, n_pred)), e((1, n_pred))),  # experts' and mixture's predictions
    )
    work = (
        *(e(1), e(1, i), e(1, i), e(1, i), np.full(1, -1, i), np.zeros(1, np.bool_), np.ones(1, np.bool_)),
        *(e((1, n_out, r)), e((3, 1, n_pred)), e(1), e((1, n_mix), i), e((1, n_mix)), e((1, 3)), e((1, 3))),
        *(np.zeros(1, i), e(1), e(n_kb * n_out), e((1, 2, n_out)), e((1, d))),
    )
    return kept, work


@numba.njit(cache=True, error_model="numpy")
def _one(t: int, c: int, x_raw: np.ndarray, y: float, mode: int, v: Any) -> int:
    """One event of task row ``t`` (its code: row ``c`` of ``code_mu``, ``code_S``; features ``x_raw``; label ``y``;
    the rest: ``v``, ``Views``):
    ``Engine._segment`` for a segment of one event (``LEARN``), its prediction into ``pred``; ``PREDICT``:
    ``Engine.predict`` (nothing moves); ``LEARN_KEPT``: the learning ``LEARN`` does after the prediction, from
    what the last ``PREDICT`` of the same event and state left in ``kept`` (``room``). Learning moves
    the standardiser, the learners and the mixtures. Returns ``LEARNER_BAD`` | ``CODE_BAD`` for a learner or
    code left holding a non-finite value (``Engine._guard``), else 0."""
    mu, S, code_mu, code_S, me_prec, me_nat = v.mu, v.S, v.code_mu, v.code_S, v.me_prec, v.me_nat
    L_kb, in_kb, L_top, in_top, stats, counts, feat = v.L_kb, v.in_kb, v.L_top, v.in_top, v.stats, v.counts, v.feat
    B, W, b, w, w_S, sigma, log_prior, top_prior = v.B, v.W, v.b, v.w, v.w_S, v.sigma, v.log_prior, v.top_prior
    task, code, basis_on, shared_on, eta_fixed, m_kb = v.task, v.code, v.basis_on, v.shared_on, v.eta_fixed, v.m_kb
    lo, hi, pred = v.lo, v.hi, v.pred
    d, n_out, k, n_top = x_raw.shape[0], mu.shape[1], B.shape[1], len(top_prior)
    r = d + 1
    # what the prediction keeps for the learning (``room``): inputs, S z and outputs of each learner, predictions
    x1, l_sz, s_sz, z, c_sz, l_mv, c_mv, s_m, top, kb_x, said = v.kept
    target, tasks, codes, n_before, no_snap, not_yet, learns, snaps, preds, w_local, kb_slots = v.work[:11]
    kb_weights, errors, losses, zero, y_, logits, out, raw = v.work[11:]
    target[0] = (y - lo) / (hi - lo) if task == 2 else y
    tasks[0], codes[0], n_before[0], y_[0] = t, c, counts[t], y
    # ``mix_events``'s arguments after the event's flags (one event, whose prediction is stored in and learned
    # from ``top``, ``kb_x``, ``said``)
    mixing = (
        *(no_snap, n_before, y_, top, kb_x, zero, kb_x, top, said, L_kb, in_kb, L_top, in_top),
        *(stats, log_prior, top_prior, code, task == 2, eta_fixed, m_kb, lo, hi, EARLY_N, preds[0], preds[1]),
        *(preds[2], w_local, kb_slots, kb_weights, errors, losses),
    )
    if mode != LEARN_KEPT:
        x1[0, :d] = x_raw
        x1[0, d] = 1.0
        _standardise(feat, x1[:, :d], False)
        _sequence(mu, S, tasks, x1, target, not_yet, task, l_mv, no_snap, snaps, l_sz)
        _finish(l_mv[0], task, lo, hi, top[0, 0])
        kb_x[0, 0] = 0.0
        if basis_on:
            z[:] = 0.0  # x1 @ B
            for a in range(r):
                for j in range(k):
                    z[0, j] += x1[0, a] * B[a, j]
            _sequence(code_mu, code_S, codes, z, target, not_yet, task, c_mv, no_snap, snaps, c_sz)
            _finish(c_mv[0], task, lo, hi, kb_x[0, 0])
        logits[:] = b  # every member's logits [K * C]: W is [d, K * C], so the inner loop runs along a row
        for j in range(d):
            xj = x1[0, j]
            for m in range(len(logits)):
                logits[m] += xj * W[j, m]
        _to_pred(logits.reshape((-1, n_out)), task, lo, hi, kb_x[0, 1:])
        for m in range(1, n_top):
            top[0, m] = top[0, 0]
        if shared_on:
            _step(w, w_S, me_prec, me_nat, sigma, tasks, x1, target, not_yet, task, out, s_sz, s_m)
            _to_pred(out[0], task, lo, hi, top[0, 2:4])
            for e in range(2):
                _safe(top[0, 2 + e], task, lo, hi)
        mix_events(tasks, zero, learns, not_yet, *mixing)  # the prediction
        pred[:] = preds[2, 0]
        said[0] = preds[2, 0]
        if not in_top[t, 1]:  # a sleeping KB level's loss is the local learner's (``mix_events``)
            top[0, 1] = top[0, 0]
    if mode == PREDICT:
        return 0
    raw[0] = x_raw
    _standardise(feat, raw, True)
    _sequence(mu, S, tasks, x1, target, learns, task, l_mv, no_snap, snaps, l_sz, False)
    if basis_on:
        _sequence(code_mu, code_S, codes, z, target, learns, task, c_mv, no_snap, snaps, c_sz, False)
    if shared_on:
        _step(w, w_S, me_prec, me_nat, sigma, tasks, x1, target, learns, task, out, s_sz, s_m, False)
    bad = 0
    if not (_finite(mu[t]) and _finite(S[t])):
        bad |= LEARNER_BAD
    if basis_on and not (_finite(code_mu[c]) and _finite(code_S[c])):
        bad |= CODE_BAD
    counts[t] += 1
    mix_events(tasks, zero, not_yet, learns, *mixing)  # its learning
    return bad


class OneEvent:
    """The single-event path of one engine. ``learn`` and ``predict`` return None where the event needs the
    engine's general path; ``stale`` must be called before anything other than this path uses the engine (its
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
        self.views: tuple[Any, ...] = ()  # ``FIELDS`` (empty until read), and the same as ``Views`` (``packed``)
        self.packed: Views | None = None
        self.kb_seen = self.code_at = np.zeros(0, np.int64)  # views of the task table's columns (``_views``)
        self.counted: tuple[np.ndarray, np.ndarray] = (self.kb_seen, self.kb_seen)  # likewise
        self.since: np.ndarray | None = None  # the KB's entry log (``KbEntry.meet``'s ``since``), per publication
        self.touched: dict[int, str] = {}  # rows learned here and not yet handed to ``Recent`` (``flush``)
        self.fresh: Views | None = None  # with a new task's rows (``_new``), until the views are read again
        # the last code carried by ``predict``: (row, basis it was in, basis it is in now, code, covariance)
        self.carried: tuple[int, int, int, np.ndarray, np.ndarray] | None = None
        self.taken = 0  # events learned by this path
        self.kept_for: tuple[int, np.ndarray] | None = None  # the (row, features) whose prediction ``kept`` holds

    def __getstate__(self) -> dict[str, Any]:
        # a copy's views would be of copied arrays, not its engine's: it reads its own engine's again
        unbound = np.zeros(0, np.int64)
        return {
            **self.__dict__,
            **{
                "views": (),
                "packed": None,
                "fresh": None,
                "kb_seen": unbound,
                "code_at": unbound,
                "counted": (unbound, unbound),
                "kept_for": None,
            },
        }

    def stale(self) -> None:
        """Due before anything other than this path uses the engine: the rows learned here go to ``Recent``, and
        the engine's arrays are read again at the next event."""
        self.flush()
        self.views, self.packed, self.carried, self.kept_for, self.fresh = (), None, None, None, None

    def flush(self) -> None:
        """Hand the rows learned here to the engine's ``Recent`` as they are now (it keeps a task's latest row):
        due before anything reads it or gives a row to another task."""
        if self.touched:
            rows = np.fromiter(self.touched, np.int64, len(self.touched))
            self.engine.recent.add(list(self.touched.values()), self.engine.tasks.cols, rows)
            self.touched = {}

    def _use(self, views: tuple[Any, ...]) -> Views:
        """``views`` (``FIELDS``) from now on; as ``Views``."""
        self.views, self.packed = views, _pack(*views)
        return self.packed

    def _views(self) -> Views:
        """``_one``'s arguments after the event's, read again: views of the engine's arrays, then its settings."""
        eng = self.engine
        kb, shared, cfg, mix = eng.kb, eng.shared, eng.cfg, eng.mixtures
        none = np.zeros((1, 1, 1))
        prior = mix.kb_log_prior()
        self.kept_for = self.since = None
        views = (
            *self._task_arrays(),
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
            *room(cfg.dim, self.learners.n_out, kb.B.shape[1], len(mix.top_log_prior()), kb.capacity, eng.n_pred),
        )
        return self._use(views)

    def _task_arrays(self) -> tuple[np.ndarray, ...]:
        """The first ``PER_TASK`` of ``FIELDS``: views of the arrays with a row per task."""
        eng = self.engine
        cols, kb = eng.tasks.cols, eng.kb
        self.kb_seen, self.code_at = cols["kb_seen"].numpy(), cols["code_at"].numpy()
        self.counted = cols["n_kb"].numpy(), cols["n_top"].numpy()  # each task's experts (``KbEntry.meet``)
        return (
            self.learners.params["mu"].numpy(),
            self.learners.params["S"].numpy(),
            kb.mu.numpy(),
            kb.S.numpy(),
            *(cols[k].numpy() for k in ("me_prec", "me_nat", "L_kb", "in_kb", "L_top", "in_top", "stats")),
            eng.tasks.counts,
        )

    def _grown(self, views: tuple[Any, ...]) -> bool:
        """Whether a table with a row per task has grown (been replaced) since ``views`` were read."""
        eng = self.engine
        now = (len(self.learners.params["mu"]), len(eng.kb.mu), len(eng.tasks.cols["stats"]), len(eng.tasks.counts))
        return now != (len(views[0]), len(views[2]), len(views[10]), len(views[11]))

    def _meet(self, t: int, task: str, views: tuple[Any, ...]) -> None:
        """Task row ``t`` (``task``) meets the KB as it is now, where it has not yet: ``KbEntry.meet`` of one row,
        its own member found by name and the KB's entry log read once per publication."""
        kb = self.engine.kb
        if self.kb_seen[t] >= kb.applied:
            return
        if self.since is None:
            self.since = np.array([kb.basis_since, *kb.entered], np.int64)
        own = np.full(1 + kb.capacity, -1, np.int64)  # each expert's own task (-1: another task's, or none)
        slot = kb.slot_of.get(task)
        if slot is not None:
            own[1 + slot] = t
        L_kb, in_kb, L_top, in_top, stats = views[6:11]
        (n_kb, n_top), rows = self.counted, np.array([t])
        loss_kb, loss = stats[:, STAT["loss_kb"]], stats[:, STAT["loss"]]
        enter_experts(
            rows, self.kb_seen, self.since, own, kb.applied, L_kb, in_kb, n_kb, L_top, in_top, n_top, loss_kb, loss
        )

    def _code(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Task row ``t``'s code carried into the current basis (``KnowledgeBase.carried_row``), kept aside."""
        kb, at = self.engine.kb, int(self.code_at[t])
        if self.carried is None or self.carried[:3] != (t, at, kb.basis_at):
            self.carried = (t, at, kb.basis_at, *kb.carried_row(t, at))
        return self.carried[3], self.carried[4]

    def predict(self, task: str, x: np.ndarray) -> np.ndarray | None:
        """``Engine.predict`` of one event of ``task`` with features ``x`` (float64), or None."""
        eng = self.engine
        t = eng.tasks.index.get(task)
        if not self.able or (t is None and eng.residency.store is not None):  # it may be in the store
            return None
        packed = self.packed or self._views()
        views = self.views
        self.kept_for = None  # ``kept`` is written over
        if t is None:  # a new task's rows: the same for every task not a KB member's source, until the KB moves
            if task in eng.kb.slot_of:
                new = _pack(*self._new(task), *views[PER_TASK:])
            else:
                new = self.fresh = self.fresh or _pack(*self._new(task), *views[PER_TASK:])
            _one(0, 0, x, 0.0, PREDICT, new)
            return self.pred
        self._meet(t, task, views)
        if self.code_at[t] == eng.kb.basis_at:
            _one(t, t, x, 0.0, PREDICT, packed)
            self.kept_for = (t, x)  # for ``learn`` of the same event, if it comes next
        else:
            code = self._code(t)
            _one(t, 0, x, 0.0, PREDICT, _pack(*views[:2], code[0][None], code[1][None], *views[4:]))
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
            if eng.residency.hands_over(1):  # rows that change hands go to ``Recent`` as they were
                self.flush()
            eng.residency.admit([task])
            t = tasks.index[task]
            self.carried = None
            if self.views and self._grown(self.views):  # its arrays are read again
                self._use((*self._task_arrays(), *self.views[PER_TASK:]))
        packed = self.packed or self._views()
        views = self.views
        kept = self.kept_for is not None and self.kept_for[0] == t and self.kept_for[1] is x
        self.kept_for = None
        if not kept:  # (else ``predict`` of this event met the KB and found the code current: nothing moved since)
            self._meet(t, task, views)
            if self.code_at[t] != eng.kb.basis_at:  # ``KbEntry.carry_codes``
                views[2][t], views[3][t] = self._code(t)
                self.code_at[t] = eng.kb.basis_at
        bad = _one(t, t, x, float(y), LEARN_KEPT if kept else LEARN, packed)
        clock.seen[clock.column[0]] = time.time()
        tasks.used[t], tasks.dirty[t] = tasks.batch, True
        counters = eng.counters
        counters["learned"] += 1
        counters["predicted"] += 1
        n = int(tasks.counts[t])
        if (self.every > 0 and n % self.every == 0) or n in self.at:  # a KB snapshot follows (``steps.compiled``)
            mu = views[0][t]  # ``Learners.members_from_ekf`` of one row, in numpy
            store = {"w": torch.from_numpy(mu[:, :-1].T.copy())[None], "b": torch.from_numpy(mu[:, -1].copy())[None]}
            eng.staging.stage(t, task, n, eng.events_seen, store)
        if bad:
            self._guard(t, bad)
        if eng.shared is not None:
            eng.shared.learned += 1
        self.touched[t] = task
        eng.events_seen += 1
        if eng.events_seen == eng.next_estimate:
            self.flush()
            eng._estimate()
            self.views, self.packed, self.fresh = (), None, None
        if eng.events_seen % eng.cfg.publish_every == 0:
            eng._publish()
            self.views, self.packed, self.fresh = (), None, None
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
