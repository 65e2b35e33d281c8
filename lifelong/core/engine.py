"""The engine: task states, the knowledge base and the two-level combination (no Kafka inside).

``Engine.process(events)`` predicts every event that has features, accounts the loss of every labelled
one, then learns from it, in arrival order. Events of different tasks are independent given the KB, so a
micro-batch is computed in waves: the k-th event of each task in the batch goes in wave k, and wave k is
predicted after wave k-1 was learned. Snapshots for the KB are taken when triggered (every
``snapshot_every`` learned events of a task, and on ``control: end``) and published every
``publish_every`` engine events, a count that does not depend on how the stream is cut into batches; so
a batched run equals an event-by-event run.

Per task, the prediction mixes two levels with exponential weights (``hedge.py``): the task's own learner
and the KB level, itself a mixture of the basis expert and every member. Absent experts (before the KB
has members, or a slot not yet filled) are treated as sleeping: they "predict" the mixture, so they are
charged exactly the mixture's loss and the bounds hold against each expert from when it joined.

The engine orchestrates; each job has its own room:

- ``arrivals.py``: pending labels, the duplicate window, event time, each event's outcome;
- ``entry.py``: KB experts joining each task's mixtures when the task next meets the KB;
- ``residency.py``: which tasks are resident, and the on-disk store of the others;
- ``steps.py``: each task's learner and basis code, compiled or in torch waves;
- ``mixtures.py``: both levels' mixtures and the statistics they accumulate;
- ``staging.py``: KB snapshots waiting for publication, and the population learner;
- ``reports.py``: regrets, bounds and per-task figures;
- ``handover.py``: tasks moving between replicas (the changelog).
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lifelong.config import EngineConfig, LabelsConfig
from lifelong.core import features, reports, steps
from lifelong.core.arrivals import Arrivals, PendingPrediction
from lifelong.core.entry import KbEntry
from lifelong.core.events import Event, Schema
from lifelong.core.handover import Handover
from lifelong.core.knowledge import KnowledgeBase, Staged
from lifelong.core.learners import make_learners, pick_device
from lifelong.core.mixtures import Mixtures
from lifelong.core.plan import Plan, count_labelled
from lifelong.core.recent import Recent
from lifelong.core.residency import Residency
from lifelong.core.results import CONTROL, KB_TOP, LABEL_JOINED, LEARNED, PREDICTED, BatchResult
from lifelong.core.shared import SharedLevel
from lifelong.core.staging import Staging
from lifelong.core.tasks import STATS, TOP, TaskTable
from lifelong.errors import StateError

# Engine events before the first estimate of the shared priors (``Engine._estimate``); the gap doubles up to
# ESTIMATE_EVERY.
FIRST_ESTIMATE = 32
ESTIMATE_EVERY = 1024
COUNTERS = (
    "predicted",
    "learned",
    "label_expired",
    "label_unmatched",
    "controls",
    "tasks_created",
    "snapshots",
    "duplicates",
    "pending_replaced",
    "reset_learner",
    "reset_code",
    "snapshots_not_finite",
    "tasks_evicted",
    "tasks_loaded",
    "tasks_dropped",
    "time_future",
    "time_late",
)


class Engine:
    """Two-level lifelong online learner over many tasks.

    Examples
    --------
    >>> from lifelong.config import EngineConfig
    >>> from lifelong.core.events import Event
    >>> import numpy as np
    >>> eng = Engine(EngineConfig(dim=2))
    >>> batch = [Event("a", f"e{i}", np.array([1.0, float(i % 2)], np.float32), i % 2) for i in range(40)]
    >>> result = eng.process(batch)
    >>> eng.counters["learned"]
    40
    >>> eng.report()["tasks"]["a"]["events"]
    40
    """

    def __init__(self, cfg: EngineConfig, labels: LabelsConfig | None = None, store_dir: str | Path | None = None):
        if cfg.dim <= 0:
            raise StateError("engine.dim must be known before the engine starts (set it, or infer it from data)")
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        self.schema = Schema(cfg.dim, cfg.task, cfg.n_classes, cfg.target_range, frozenset(cfg.tasks))
        self.features = features.Standardiser(cfg.dim)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.learners = make_learners(cfg, cfg.dim, self.device)
        self.kb = KnowledgeBase(cfg, self.learners, cfg.dim, self.device)
        self.n_pred = self.learners.n_pred
        # the live shared level (pooled and mixed-effects learners) comes with the population learner
        use_ekf = getattr(self.learners, "use_ekf", False)
        self.shared = SharedLevel(cfg, self.learners.n_out) if cfg.population and use_ekf else None
        self.tasks = TaskTable(
            1 + cfg.kb_capacity,
            (self.learners.n_out, cfg.dim + 1),
            self.device,
            cfg.max_resident_tasks,
            self.shared is not None,
        )
        self.kb_version = torch.zeros(1 + cfg.kb_capacity, dtype=torch.long, device=self.device)
        self.labels = labels or LabelsConfig()
        self.arrivals = Arrivals(self.labels, self.counters)
        self.residency = Residency(cfg, self.tasks, self.learners, self.kb, self.counters, store_dir)
        self.mixtures = Mixtures(cfg, self.learners, self.kb, self.tasks)
        self.staging = Staging(self.learners, self.shared, self.counters)
        self.entry = KbEntry(self.tasks, self.kb)
        self.handover = Handover(self.tasks, self.learners, self.kb, self.residency, self.arrivals, self.entry)
        # Where published members go: None, into this engine's KB at once; else to this callable (the daemon's
        # knowledge log in scale-out: they join every replica's KB through ``apply`` when read back from it).
        self.publisher: Callable[[list[Staged]], None] | None = None
        self.events_seen = 0
        self.next_estimate = FIRST_ESTIMATE  # the engine-event count of the next ``_estimate``
        self.recent = Recent()  # the tasks that learned since the last ``_estimate``

    @property
    def compiled(self) -> bool:
        """True when the sequential part and the mixtures run in compiled code (CPU, EKF learners)."""
        return self.mixtures.compiled

    @property
    def n_labelled(self) -> np.ndarray:
        """Labelled events learned so far, per task (a view: the engine keeps counting in it)."""
        return self.tasks.counts[: self.n_tasks]

    @property
    def n_tasks(self) -> int:
        """Task rows in the engine's tensors: the resident tasks."""
        return len(self.tasks.names)

    @property
    def n_known(self) -> int:
        """Tasks known: resident or in the store."""
        return self.residency.known

    # --- lazy KB entry (``entry.py``) ---

    def settle(self) -> None:
        """Every task's mixtures hold every KB expert now (reports read every task; events do it task by task)."""
        self.entry.meet(np.arange(self.n_tasks))

    # --- processing ---

    def process(self, events: list[Event]) -> BatchResult:
        """Predict, account and learn a batch of valid events in arrival order."""
        result = BatchResult.empty(events, self.n_pred)
        result.seq0 = self.events_seen
        self.tasks.batch += 1
        start = 0
        while start < len(events):
            # segments end at publications and at estimates: counts that do not depend on how the stream is cut
            # into batches
            room = self.cfg.publish_every - self.events_seen % self.cfg.publish_every
            stop = min(len(events), start + room, start + self.next_estimate - self.events_seen)
            self._segment(events, start, stop, result)
            self.events_seen += stop - start
            if self.events_seen == self.next_estimate:
                self._estimate()
            if self.events_seen % self.cfg.publish_every == 0:
                self._publish()
            start = stop
        return result

    def _estimate(self) -> None:
        """Empirical Bayes across tasks that learned since the last estimate (``recent.py``): Σ (``SharedLevel.em``),
        the top level's prior (``Mixtures.learn_prior``); new tasks start from the pooled learner as it is now
        (``Staging.start_new``). The next estimate comes after twice as many events, up to ``ESTIMATE_EVERY``."""
        self.staging.start_new()
        _, rows = self.recent.take()
        if rows:
            if self.shared is not None:
                self.shared.em(rows["me_prec"], rows["me_nat"])
            self.mixtures.learn_prior(rows["L_top"], rows["in_top"])
        self.next_estimate = self.events_seen + min(self.events_seen, ESTIMATE_EVERY)

    def _plan(self, events: list[Event], start: int, stop: int, result: BatchResult) -> Plan:
        """Arrival-order bookkeeping: each event's task and outcome, pending labels and their TTL, the
        duplicate window (``Arrivals.sort_out``), then each task's labelled counts and the snapshot triggers."""
        evs = events[start:stop]
        self.residency.admit([e.task for e in evs])  # every task of the segment has a row from here on
        arrived = self.arrivals.sort_out(evs, self.tasks.index, result.seq0 + start)
        self.arrivals.expire_window()
        outcome, tasks = arrived.outcome, arrived.tasks
        labelled = (outcome == LEARNED) | (outcome == LABEL_JOINED)
        uniq, inv = np.unique(tasks, return_inverse=True)
        self.tasks.used[uniq], self.tasks.dirty[uniq] = self.tasks.batch, True
        self.entry.meet(uniq)
        self.entry.carry_codes(uniq)
        n_before, trigger = np.empty(len(tasks), np.int64), np.empty(len(tasks), np.bool_)
        at = np.array(self.cfg.snapshot_at, np.int64)
        every = self.cfg.snapshot_every
        count_labelled(tasks, labelled, outcome == CONTROL, self.tasks.counts, every, at, n_before, trigger)
        result.outcome[start:stop] = outcome
        result.task_index[start:stop] = tasks
        result.label_delay[start:stop] = arrived.delay
        return Plan(tasks, arrived.ref, n_before, inv, uniq, trigger)

    def _segment(self, events: list[Event], start: int, stop: int, result: BatchResult) -> None:
        """The sequential part (each task's learner and basis code: ``steps.py``), then both mixtures
        (``mixtures.py``), then what waits for a label and the population learner."""
        plan = self._plan(events, start, stop, result)
        rows, evs = slice(start, stop), events[start:stop]
        outcome = result.outcome[rows]
        labelled = (outcome == LEARNED) | (outcome == LABEL_JOINED)
        x, stored, stored_rows = self._features(evs, plan, outcome)
        y_np = np.array([0 if e.y is None else e.y for e in evs], np.float64)
        y = torch.as_tensor(y_np, dtype=self.dtype if self.cfg.task == "regression" else torch.long, device=self.device)
        x1 = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        step = steps.compiled if self.compiled else steps.waves
        raw_local, raw_basis, snapshots = step(self.learners, self.kb, plan, labelled, x1, y)
        for snap in snapshots:
            name = self.tasks.names[snap.task]
            self.staging.stage(snap.task, name, snap.learned, result.seq0 + start + snap.at, snap.store)
        p_local, p_basis = self._guard(plan.touched, self.learners.finish(raw_local), self.kb.finish_basis(raw_basis))
        shared_logits = None
        if self.shared is not None:
            shared_logits = self.shared.sequence(self.tasks.cols, plan.tasks, x1, y_np, labelled)
        p_top = self._top_experts(p_local, shared_logits)
        kb_x, top = self.mixtures.segment(
            plan, result, rows, x, y, p_top, p_basis, stored, stored_rows, self.kb_version
        )
        has_x = (outcome == PREDICTED) | (outcome == LEARNED)
        result.learned_before[rows][has_x] = plan.n_before[has_x]
        self.counters["learned"] += int(labelled.sum())
        self.counters["predicted"] += int(has_x.sum())
        self._keep_pending(evs, start, outcome, result, x, kb_x, top)
        learned = plan.touched[self.tasks.counts[plan.touched] > 0]
        self.recent.add([self.tasks.names[i] for i in learned.tolist()], self.tasks.cols, learned)
        result.segment[rows] = len(result.kb_names)
        result.kb_names.append(["basis"] + [m or "" for m in self.kb.ids])

    def _features(
        self, evs: list[Event], plan: Plan, outcome: np.ndarray
    ) -> tuple[torch.Tensor, list[PendingPrediction], np.ndarray]:
        """Each event's features as its learners see them: its own (scaled), or for a label, those of the
        prediction it joins; with the pending predictions stored in earlier segments that labels join here,
        and their rows."""
        n, dev = len(evs), self.device
        has_x = (outcome == PREDICTED) | (outcome == LEARNED)
        joined = outcome == LABEL_JOINED
        x_np = np.zeros((n, self.cfg.dim), np.float64)
        rows_x = np.flatnonzero(has_x)
        if len(rows_x):
            # concatenate + reshape: several times faster than np.stack on many small arrays
            given = np.concatenate(
                [e.x for e in evs] if len(rows_x) == n else [evs[j].x for j in rows_x.tolist()]
            ).reshape(len(rows_x), -1)
            given = given.astype(np.float64, copy=False)
            self.features.scale(given)
            x_np[rows_x] = given
        same = joined & (plan.ref >= 0)
        x_np[same] = x_np[plan.ref[same]]
        x = torch.as_tensor(x_np, dtype=self.dtype, device=dev)
        stored_rows = np.flatnonzero(joined & (plan.ref < 0))
        waiting = self.arrivals.pending.inputs
        stored = [waiting.pop((evs[j].task, evs[j].id or "")) for j in stored_rows]
        if stored:
            x[torch.as_tensor(stored_rows, device=dev)] = torch.stack([en.x for en in stored])
        return x, stored, stored_rows

    def _keep_pending(
        self,
        evs: list[Event],
        start: int,
        outcome: np.ndarray,
        result: BatchResult,
        x: torch.Tensor,
        kb_x: torch.Tensor,
        top: torch.Tensor,
    ) -> None:
        """Predictions still waiting for their label at the end of their segment keep what accounting and
        learning will need when it comes."""
        pending, dev = self.arrivals.pending, self.device
        for j in np.flatnonzero(outcome == PREDICTED).tolist():
            e = evs[j]
            key = (e.task, e.id or "")
            if key in pending.keys:
                i = start + j
                pending.inputs[key] = PendingPrediction(
                    x[j].clone(),
                    kb_x[j].to(self.dtype),
                    top[j].clone(),
                    torch.as_tensor(result.pred[i], device=dev),
                    self.kb_version.clone(),
                )

    def _guard(
        self,
        touched: np.ndarray,
        p_local: torch.Tensor,
        p_basis: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A non-finite learner or basis code never leaves its task: the task's learner (or code) restarts
        untrained, counted in ``counters["reset_learner"]`` (``["reset_code"]``), and what it predicted on the
        way is replaced by the uninformed prediction, so no mixture, loss or other task ever sees it."""
        bad = self.learners.not_finite(touched)
        for i in touched[bad].tolist():
            self.learners.load_task(i, None)
        bad_code = self.kb.not_finite(touched)
        for i in touched[bad_code].tolist():
            self.kb.mu[i], self.kb.S[i] = self.kb.prior_mu, self.kb.prior_S
        self.counters["reset_learner"] += int(bad.sum())
        self.counters["reset_code"] += int(bad_code.sum())
        return self.learners.safe(p_local), self.learners.safe(p_basis)

    def _top_experts(self, p_local: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """The top level's experts ``[n, len(TOP), P]`` (float64): the task's learner, a column for the KB level
        (the mixtures fill it), the shared level's pooled and mixed-effects learners from their logits
        ``shared`` (the local prediction stands in where there is no shared level: those experts never take part
        then)."""
        top = p_local.double().unsqueeze(1).repeat(1, len(TOP), 1)
        if shared is not None:
            if top.device.type == "cpu":
                self.learners.to_pred(shared, out=top[:, 2:])
            else:
                top[:, 2:] = self.learners.to_pred(shared.to(self.device)).double()
            top[:, 2:] = self.learners.safe(top[:, 2:])
        return top

    def predict(self, events: list[Event]) -> BatchResult:
        """What ``process`` would predict for each event with features if it came next, changing nothing: no
        task is registered, no prediction waits for its label, no counter, scale or learner moves. Labels
        are ignored; events without features get no prediction. Rows are independent of each other.

        >>> from lifelong.config import EngineConfig
        >>> eng = Engine(EngineConfig(dim=2))
        >>> before = eng.state()[1]
        >>> eng.predict([Event("new", "q", np.array([3.0, 1.0]))]).pred.round(3).tolist()
        [[0.5, 0.5]]
        >>> eng.state()[1] == before
        True
        """
        result = BatchResult.empty(events, self.n_pred)
        rows = np.array([j for j, e in enumerate(events) if e.x is not None], np.int64)
        if not len(rows):
            return result
        dev = self.device
        names = [events[j].task for j in rows.tolist()]
        self.residency.admit(names, create=False)
        new = {
            name: self.n_tasks + k
            for k, name in enumerate(dict.fromkeys(n for n in names if n not in self.tasks.index))
        }
        index = np.array([self.tasks.index.get(name, new.get(name, -1)) for name in names], np.int64)
        known = index < self.n_tasks
        p_local, p_basis, x = self._peek_levels(events, rows, index, known)
        tables = self._peek_tables(names, index, known)
        rounds = (
            torch.as_tensor([self.n_labelled[i] if i < self.n_tasks else 0 for i in index.tolist()], device=dev) + 1
        )
        shared_logits = None
        if self.shared is not None:  # nothing is labelled: nothing learns
            x1 = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            none = np.zeros(len(rows), np.bool_)
            shared_logits = self.shared.sequence(tables, np.arange(len(rows)), x1, np.zeros(len(rows)), none)
        mix = self.mixtures
        kb_x = mix.kb_experts(p_basis, x)
        top = self._top_experts(p_local, shared_logits)
        w_kb, top = mix.kb_level(kb_x, tables["L_kb"], tables["in_kb"], tables["in_top"], rounds, top)
        w_top, pred = mix.top_level(top, tables["L_top"], tables["in_top"], rounds)
        result.outcome[rows] = PREDICTED
        result.task_index[rows] = index
        result.pred[rows] = pred.cpu().numpy()
        result.p_local[rows] = top[:, 0].cpu().numpy()
        result.p_kb[rows] = top[:, 1].cpu().numpy()
        result.w_local[rows] = w_top[:, 0].cpu().numpy()
        result.learned_before[rows] = rounds.cpu().numpy() - 1
        top_k = min(KB_TOP, w_kb.shape[1])
        tw, ts = torch.topk(w_kb, top_k, dim=1)
        result.kb_slots[rows, :top_k] = ts.cpu().numpy()
        result.kb_weights[rows, :top_k] = tw.cpu().numpy()
        result.kb_names.append(["basis"] + [m or "" for m in self.kb.ids])
        return result

    def _peek_levels(
        self, events: list[Event], rows: np.ndarray, index: np.ndarray, known: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``predict``'s task level and basis expert for events ``rows`` (tasks ``index``; ``known``: resident
        ones, the others new), and their features as learners would see them; nothing changes."""
        dev, tables = self.device, self.tasks.cols
        kt = torch.as_tensor(index[known], device=dev)
        x_np = self.features.peek(np.stack([typing.cast(np.ndarray, events[j].x) for j in rows.tolist()]))
        x = torch.as_tensor(x_np, dtype=self.dtype, device=dev)
        x1 = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        z = x1 @ self.kb.B
        kn = torch.as_tensor(known, device=dev)
        raw_local = _by_rows(
            known, lambda: self.learners.forward(kt, x1[kn]), lambda: self.learners.forward_new(index[~known], x1[~kn])
        )
        codes = self.kb.carried(kt, tables["code_at"][kt].cpu().numpy())  # as the tasks' next event would carry them
        raw_basis = _by_rows(
            known,
            lambda: self.kb.forward_basis(torch.arange(len(kt), device=dev), z[kn], codes=codes),
            lambda: self.kb.forward_basis_new(z[~kn]),
        )
        p_local = self.learners.safe(self.learners.finish(raw_local)).double()
        p_basis = self.learners.safe(self.kb.finish_basis(raw_basis))
        return p_local, p_basis, x

    def _peek_tables(self, names: list[str], index: np.ndarray, known: np.ndarray) -> dict[str, torch.Tensor]:
        """``predict``'s mixture tables, one row per event: with the KB experts its task would meet at its next
        event (a task's own member left out)."""
        dev, cols = self.device, self.tasks.cols
        kt = torch.as_tensor(index[known], device=dev)
        kn = torch.as_tensor(known, device=dev)
        fresh = self.tasks.empty(int((~known).sum()))
        self.tasks.start(fresh, slice(None), self.kb.basis_at)
        tables = {k: torch.empty((len(names), *v.shape[1:]), dtype=v.dtype, device=dev) for k, v in fresh.items()}
        for k, v in tables.items():
            v[kn], v[~kn] = cols[k][kt], fresh[k]
        # with the KB experts they would meet at their next event (a task's own member left out), one row per task
        first: dict[str, int] = {}
        for j, name in enumerate(names):
            first.setdefault(name, j)
        self.entry.meet(np.array(sorted(first.values()), np.int64), tables, names=first)
        same = torch.as_tensor([first[name] for name in names], device=dev)
        return {k: v[same] for k, v in tables.items()}

    def _publish(self) -> None:
        members = self.staging.ready(self.events_seen)
        if not members:
            return
        if self.publisher is not None:
            self.publisher(members)
        else:
            self.apply(members)

    def apply(self, members: list[Staged]) -> None:
        """Members join the KB in this order (between batches); new experts join each task's mixture when
        the task next meets the KB (``KbEntry.meet``)."""
        if not members:
            return
        slots = self.kb.publish(members)
        # pending predictions' experts in these slots slept (``mixtures``); tasks meet them in ``KbEntry.meet``
        if slots:
            self.kb_version[torch.tensor(slots, dtype=torch.long, device=self.device) + 1] += 1
        self.learners.prior_S = self.kb.task_S

    def drop_tasks(self, names: Iterable[str]) -> None:
        """Forget tasks, resident or stored, and their pending predictions (another replica owns them now)."""
        names = set(names)
        self.residency.drop(names)
        self.arrivals.forget_tasks(names)

    # --- reporting (``reports.py``) ---

    def task_stats(self) -> np.ndarray:
        """Each resident task's statistics (columns ``STATS``)."""
        return self.tasks.cols["stats"][: self.n_tasks].cpu().numpy()

    def local_weights(self) -> np.ndarray:
        """Each resident task's top-level weight on its own learner (the rest is on the KB level)."""
        n, tables = self.n_tasks, self.tasks.cols
        rounds = torch.as_tensor(self.n_labelled, device=self.device) + 1
        return self.mixtures.top_mix.weights(tables["L_top"][:n], tables["in_top"][:n], rounds)[:, 0].cpu().numpy()

    def regrets(self) -> dict[str, np.ndarray]:
        """Per resident task: regret of the combined predictor vs the better level, of the KB vs its best
        expert, and the bound of each."""
        self.settle()
        return reports.regrets(self.mixtures, self.tasks.view(), self.n_labelled)

    def report(self, per_task: bool = True) -> dict[str, Any]:
        """Cumulative figures per method and (``per_task``) per task (``lifelong evaluate``'s report's core)."""
        self.settle()
        out = reports.report(self.mixtures, self.kb, self.residency.task_blocks(self.entry.meet), self.counters)
        if per_task:
            out["tasks"] = dict(self.task_figures())
        return out

    def task_figures(self) -> Iterator[tuple[str, dict[str, float | int]]]:
        """Each task's name and its figures of ``report``, a block of tasks at a time (memory: one block)."""
        self.settle()
        return reports.task_figures(self.mixtures, self.residency.task_blocks(self.entry.meet))

    def kb_summary(self) -> list[dict[str, Any]]:
        """One row per KB member: slot, id, source task and its total weight over tasks."""
        self.settle()
        return reports.kb_summary(self.mixtures, self.kb, self.tasks.cols, self.n_labelled)

    def state(self, tasks: bool = True, detach: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """All state as tensors plus JSON metadata; ``load_state`` of the pair restores it exactly. Every task
        is in it (stored tasks are read back into memory first); without ``tasks``, none: the global state
        that goes with a snapshot of the task store (``Residency.flush``, ``TaskStore.snapshot``). ``detach``:
        none of it is shared with the engine (tensors copied): the caller may go on processing while another thread
        writes the pair."""
        if tasks:
            self.residency.recall()
        n = self.n_tasks if tasks else 0
        tensors: dict[str, Any] = {f"task.{k}": v[:n].cpu() for k, v in self.tasks.cols.items()}
        tensors["task.n_labelled"] = torch.from_numpy(self.n_labelled[:n].copy())
        tensors.update({f"learner.{k}": v if tasks else v[:0] for k, v in self.learners.state().items()})
        tensors.update(self.kb.state())
        tensors["kb.mu"], tensors["kb.S"] = tensors["kb.mu"][:n], tensors["kb.S"][:n]
        tensors["kb_version"] = self.kb_version.cpu()
        tensors["features.stats"] = torch.from_numpy(self.features.stats)
        tensors["mixtures.top_prior"] = self.mixtures.top_prior
        if self.shared is not None:
            tensors.update(self.shared.state())
        parts = (self.staging.state(), self.arrivals.state(), self.recent.state())
        for part_tensors, _ in parts:
            tensors.update(part_tensors)
        meta = {
            "version": 1,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.cfg.__dict__.items()},
            "task_names": self.tasks.names[:n],
            "events_seen": self.events_seen,
            "counters": dict(self.counters),
            "kb": copy.deepcopy(self.kb.meta()),
            **parts[0][1],
            **parts[1][1],
            **parts[2][1],
            # without tasks, every task is in the store when this state is loaded
            "stats_away": self.residency.stats_total().tolist() if not tasks else [0.0] * len(STATS),
            "drift": self.tasks.drift,
            "next_estimate": self.next_estimate,
        }
        # a view of a larger tensor (rows in use of a table with spare capacity) is saved as its own copy: a
        # saved view holds its whole storage
        for k, v in tensors.items():
            if isinstance(v, torch.Tensor) and (detach or v.untyped_storage().nbytes() > v.numel() * v.element_size()):
                tensors[k] = v.clone()
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what ``state`` returned; ``StateError`` if it was saved with another shape of engine."""
        if meta.get("version") != 1:
            raise StateError(f"unsupported state version {meta.get('version')!r}")
        saved = meta["config"]
        for key in ("dim", "task", "n_classes", "backend", "model", "hidden", "kb_capacity", "basis_rank"):
            if saved.get(key) != getattr(self.cfg, key):
                raise StateError(
                    f"state was saved with engine.{key}={saved.get(key)!r}, config has {getattr(self.cfg, key)!r}"
                )
        dev = self.device
        n = len(meta["task_names"])
        # a checkpoint from before a table was added: that column stays zeros
        cols = {k: tensors[f"task.{k}"] for k in self.tasks.cols if f"task.{k}" in tensors}
        self.tasks.load(meta["task_names"], cols, tensors["task.n_labelled"].numpy())
        missing = [k for k in ("kb_seen", "code_at") if f"task.{k}" not in tensors]
        self.learners.load_state({k[len("learner.") :]: v for k, v in tensors.items() if k.startswith("learner.")})
        self.kb.load_state(tensors, meta["kb"])
        self.learners.prior_S = self.kb.task_S
        for k in missing:  # saved before lazy entry: every task had met the KB and held its codes in its basis
            self.tasks.cols[k][:n] = self.kb.applied if k == "kb_seen" else self.kb.basis_at
        if "task.me_prec" not in tensors:  # saved before the shared level
            self.tasks.join_shared(self.tasks.cols, slice(0, n))
        self.kb_version = tensors["kb_version"].to(dev)
        # saved before the shared standardiser, the top prior and the shared level: they start afresh
        if "features.stats" in tensors:
            self.features.stats = tensors["features.stats"].numpy().astype(np.float64, copy=True)
        if "mixtures.top_prior" in tensors:
            self.mixtures.top_prior = tensors["mixtures.top_prior"].double().clone()
        if self.shared is not None:
            self.shared.load_state(tensors)
        self.tasks.drift = float(meta.get("drift", 0.0))
        self.staging.load_state(tensors, meta)
        self.recent.load_state(tensors, meta)
        self.arrivals.load_state(tensors, meta, dev)
        self.residency.away = np.array(meta.get("stats_away", [0.0] * len(STATS)), np.float64)
        self.events_seen = int(meta["events_seen"])
        self.next_estimate = int(meta.get("next_estimate", self.events_seen + FIRST_ESTIMATE))
        self.counters.update({**dict.fromkeys(COUNTERS, 0), **meta["counters"]})


def _by_rows(
    known: np.ndarray,
    old: typing.Callable[[], torch.Tensor],
    new: typing.Callable[[], torch.Tensor],
) -> torch.Tensor:
    """Rows of known tasks from ``old()``, rows of new tasks from ``new()``, back in row order."""
    parts, order = [], []
    if known.any():
        parts.append(old())
        order.append(np.flatnonzero(known))
    if not known.all():
        parts.append(new())
        order.append(np.flatnonzero(~known))
    out = torch.cat(parts)
    return out[torch.as_tensor(np.argsort(np.concatenate(order)), device=out.device)]
