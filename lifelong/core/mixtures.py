"""The two levels' mixtures of a segment: the KB level mixes the basis expert and every member, the top level
mixes the task's own learner and the KB level, each with exponential weights (``hedge.py``).

The KB is fixed within a segment, so given the experts' predictions the weights are per-task cumulative sums:
computed event by event in compiled code on the CPU (``hedge.mix_events``), or for a whole segment at once in
torch (what CUDA runs). Absent experts sleep: they "predict" the mixture, so they are charged exactly its loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lifelong.config import EngineConfig
from lifelong.core.arrivals import PendingPrediction
from lifelong.core.events import RESERVED_TASK
from lifelong.core.hedge import LOSS_CODES, Mixing, mix_events, prior_em
from lifelong.core.knowledge import KnowledgeBase
from lifelong.core.learners.base import Learners
from lifelong.core.plan import Plan
from lifelong.core.results import KB_TOP, LABEL_JOINED, LEARNED, PREDICTED, BatchResult
from lifelong.core.tasks import TOP, TaskTable

EARLY_N = 20  # "early" error: each task's first EARLY_N labelled events
POPULATION = RESERVED_TASK  # the KB member (source) of the population learner
# Log prior weight of the KB's shared experts (the basis and the population member) over one member's 0: a task
# trusts what all tasks share from its first events, and its own evidence moves it to a member when one fits
# better. The KB bound becomes ln(M) / η with M = members + e^5 per shared expert (``hedge.py``).
SHARED_PRIOR = 5.0
# The top level's prior is learned across tasks (``Mixtures.learn_prior``): EM steps per estimate, and the least
# prior share an expert keeps (a task whose best level is a rare one still reaches it: its regret against it is
# at most ln(1 / PRIOR_FLOOR) plus the prior's drift, instead of ln 4 with a uniform prior).
PRIOR_ITERATIONS = 100
PRIOR_FLOOR = 0.02
# An estimate reads the tasks active since the last one: the prior moves this share of the way to it (an average
# over the last few estimates), so that it does not swing with each set of tasks, and its drift stays small.
PRIOR_STEP = 0.25


@dataclass
class Inputs:
    """What the mixtures of a segment read, per row: whether it has features and a label, the row whose
    predictions a label is scored on (-1: a prediction ``s_*`` stored in an earlier segment), the label, the
    task, the top level's experts (``TOP``; the KB level's column is filled in here) and the KB experts'
    predictions."""

    has_x: np.ndarray
    lab: np.ndarray
    src: np.ndarray
    y: torch.Tensor
    idx: torch.Tensor
    p_top: torch.Tensor
    kb_x: torch.Tensor
    s_kb: torch.Tensor
    s_top: torch.Tensor
    s_pred: torch.Tensor


class Mixtures:
    """The mixing rules of both levels and the per-task tables they read and update (``tables``: the resident
    tasks' columns, ``TaskTable.cols``)."""

    def __init__(self, cfg: EngineConfig, learners: Learners, kb: KnowledgeBase, tasks: TaskTable) -> None:
        self.cfg, self.learners, self.kb, self.tasks = cfg, learners, kb, tasks
        self.device = kb.device
        self.n_pred = learners.n_pred
        self.n_experts = 1 + cfg.kb_capacity
        loss = "hedge" if cfg.mixing == "hedge" else "squared" if cfg.task == "regression" else "log"
        self.top_mix = Mixing(loss, cfg.target_range, hedge_m=len(TOP))
        # The top level's prior over its experts, learned across tasks (``learn_prior``); uniform to begin with.
        self.top_prior = torch.full((len(TOP),), 1.0 / len(TOP), dtype=torch.float64)
        self.kb_mix = Mixing(loss, cfg.target_range, hedge_m=self.n_experts)
        # On the CPU, EKF learners run event by event in compiled code; otherwise (CUDA, AdaGrad, MLP,
        # River) in torch. Both give the same results to float tolerance (tested).
        self.compiled = learners.can_sequence

    def segment(
        self,
        plan: Plan,
        result: BatchResult,
        rows: slice,
        x: torch.Tensor,
        y: torch.Tensor,
        p_top: torch.Tensor,
        p_basis: torch.Tensor,
        stored: list[PendingPrediction],
        stored_rows: np.ndarray,
        kb_version: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both mixtures of a segment (rows ``rows`` of ``result``; compiled event by event, or in torch for the
        whole segment at once) into ``result`` and the tasks' tables, given the top level's experts ``p_top``
        ``[n, len(TOP), P]`` (the KB level's column is filled in here); returns the KB experts' and the top
        level's experts' predictions."""
        dev, n = self.device, len(plan.ref)
        outcome = result.outcome[rows]
        has_x = (outcome == PREDICTED) | (outcome == LEARNED)
        lab = (outcome == LEARNED) | (outcome == LABEL_JOINED)
        # Which row's predictions each labelled row is scored on: itself, the earlier row it labels, or -1
        # for a prediction stored in an earlier segment.
        src = np.where(plan.ref >= 0, plan.ref, np.arange(n))
        src[stored_rows] = -1
        kb_x = self.kb_experts(p_basis, x)
        s_kb = torch.zeros((0, *kb_x.shape[1:]), dtype=torch.float64, device=dev)
        s_top, s_pred = torch.zeros((0, *p_top.shape[1:]), dtype=torch.float64, device=dev), s_kb[:, 0]
        if stored:
            s_kb = torch.stack([en.kb_experts for en in stored]).double()
            s_top = torch.stack([en.top for en in stored]).double()
            s_pred = torch.stack([en.pred for en in stored]).double()
            stale = torch.stack([en.versions for en in stored]) != kb_version
            # A slot refilled since that prediction is another expert: it slept, so it "predicted" the mixture.
            s_kb = torch.where(stale.unsqueeze(-1), s_top[:, 1:2].expand_as(s_kb), s_kb)
        idx = torch.as_tensor(plan.tasks, device=dev)
        inputs = Inputs(has_x, lab, src, y, idx, p_top.double(), kb_x, s_kb, s_top, s_pred)
        (self._events if self.compiled else self._torch)(plan, inputs, result, rows)
        return kb_x, inputs.p_top

    def _events(self, plan: Plan, m: Inputs, result: BatchResult, rows: slice) -> None:
        """``_torch``, event by event in compiled code (CPU), written straight into ``result``."""
        tables = self.tasks.cols
        stored = np.full(len(m.src), -1, np.int64)
        stored[m.src < 0] = np.arange(int((m.src < 0).sum()))
        prior = self.kb_log_prior()
        k = min(KB_TOP, self.n_experts)
        mix_events(
            tasks=m.idx.numpy(),
            group=plan.group,
            has_x=m.has_x,
            lab=m.lab,
            src=m.src,
            n_before=plan.n_before,
            y=m.y.double().numpy(),
            p_top=m.p_top.numpy(),
            kb_x=m.kb_x.numpy(),
            stored=stored,
            s_kb=m.s_kb.numpy(),
            s_top=m.s_top.numpy(),
            s_pred=m.s_pred.numpy(),
            L_kb=tables["L_kb"].numpy(),
            in_kb=tables["in_kb"].numpy(),
            L_top=tables["L_top"].numpy(),
            in_top=tables["in_top"].numpy(),
            stats=tables["stats"].numpy(),
            log_prior=np.zeros(self.n_experts) if prior is None else prior.numpy(),
            top_prior=self.top_log_prior().numpy(),
            code=LOSS_CODES[self.kb_mix.loss_name],
            regression=self.cfg.task == "regression",
            eta_fixed=self.kb_mix.fixed_eta or 0.0,
            m_kb=float(self.kb_mix.hedge_m),
            lo=self.cfg.target_range[0],
            hi=self.cfg.target_range[1],
            early_n=EARLY_N,
            top_local=result.p_local[rows],
            top_kb=result.p_kb[rows],
            pred=result.pred[rows],
            w_local=result.w_local[rows],
            kb_slots=result.kb_slots[rows, :k],
            kb_weights=result.kb_weights[rows, :k],
            errors=result.errors[rows],
            losses=result.losses[rows],
        )

    def _torch(self, plan: Plan, m: Inputs, result: BatchResult, rows: slice) -> None:
        """The mixtures of a whole segment in torch: the KB is fixed within a segment, so given the experts'
        predictions, the weights are per-task cumulative sums (what CUDA runs)."""
        dev, tables, n = self.device, self.tasks.cols, len(m.src)
        lab_np, src_np, y, idx, kb_x = m.lab, m.src, m.y, m.idx, m.kb_x
        lab = torch.as_tensor(lab_np, device=dev)
        n_before = torch.as_tensor(plan.n_before, device=dev)
        st_rows = torch.as_tensor(np.flatnonzero(src_np < 0), dtype=torch.long, device=dev)
        src = torch.as_tensor(np.where(src_np < 0, np.arange(n), src_np), device=dev)
        lab_kb_x = kb_x[src]
        lab_kb_x[st_rows] = m.s_kb
        y_col = y.unsqueeze(-1)
        in_kb = tables["in_kb"][idx]
        c_kb = torch.where(lab.unsqueeze(-1) & in_kb, self.kb_mix.loss(lab_kb_x, y_col), 0.0)
        round_n = n_before + 1
        earlier = EarlierSum(idx)
        in_top = tables["in_top"][idx]
        w_kb, top = self.kb_level(kb_x, tables["L_kb"][idx] + earlier(c_kb), in_kb, in_top, round_n, m.p_top)
        lab_top = top[src]
        lab_top[st_rows] = m.s_top
        counted = in_top.clone()
        counted[:, :2] = True  # a sleeping KB level is charged its stand-in's loss (reset when it wakes)
        c_top = torch.where(lab.unsqueeze(-1) & counted, self.top_mix.loss(lab_top, y_col), 0.0)
        w_top, pred = self.top_level(top, tables["L_top"][idx] + earlier(c_top), in_top, round_n)
        three = torch.cat([pred.unsqueeze(1), top[:, :2]], dim=1)[src]
        three[st_rows] = torch.cat([m.s_pred.unsqueeze(1), m.s_top[:, :2]], dim=1)
        three[st_rows, 2] = torch.where(in_top[st_rows, 1:2], three[st_rows, 2], three[st_rows, 0])
        li = torch.as_tensor(np.flatnonzero(lab_np), device=dev)
        if len(li):
            ti = idx[li]
            loss3 = self.top_mix.loss(three[li], y_col[li])
            err3 = self.errors(three[li], y[li])
            early = (n_before[li] < EARLY_N).double().unsqueeze(-1)
            tables["L_kb"].index_add_(0, ti, c_kb[li])
            tables["L_top"].index_add_(0, ti, c_top[li])
            tables["stats"].index_add_(0, ti, torch.cat([loss3, err3, err3[:, :2] * early, early], dim=1))
            result.errors[rows][lab_np], result.losses[rows][lab_np] = err3.cpu().numpy(), loss3.cpu().numpy()
        pi = torch.as_tensor(np.flatnonzero(m.has_x), device=dev)
        k = min(KB_TOP, w_kb.shape[1])
        tw, ts = torch.topk(w_kb[pi], k, dim=1)
        out = {
            "pred": pred,
            "p_local": top[:, 0],
            "p_kb": top[:, 1],
            "w_local": w_top[:, 0],
        }
        for name, values in out.items():
            getattr(result, name)[rows][m.has_x] = values[pi].cpu().numpy()
        result.kb_slots[rows, :k][m.has_x] = ts.cpu().numpy()
        result.kb_weights[rows, :k][m.has_x] = tw.cpu().numpy()

    def kb_experts(self, p_basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Predictions ``[n, 1 + capacity, P]`` of the KB experts: the basis expert, then every slot."""
        out = torch.empty((len(x), self.n_experts, self.n_pred), dtype=torch.float64, device=self.device)
        out[:, 0] = p_basis
        self.learners.member_predict(self.kb.store, x, out[:, 1:])
        return out

    def kb_level(
        self,
        kb_x: torch.Tensor,
        loss_kb: torch.Tensor,
        in_kb: torch.Tensor,
        in_top: torch.Tensor,
        rounds: torch.Tensor,
        p_top: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The KB level's weights, and the top level's experts ``p_top`` ``[n, len(TOP), P]`` with the KB level's
        prediction in its column."""
        w_kb = torch.nan_to_num(self.kb_mix.weights(loss_kb, in_kb, rounds, self.kb_log_prior()))
        # a finite stand-in (the local prediction) while the KB level sleeps: weight 0 until it joins
        p_top[:, 1] = torch.where(in_top[:, 1:2], self.kb_mix.mix(w_kb, kb_x), p_top[:, 0])
        return w_kb, p_top

    def kb_log_prior(self) -> torch.Tensor | None:
        """Each KB expert's log prior weight (``SHARED_PRIOR`` for the shared experts, 0 for members); None
        (uniform) for anytime Hedge, whose bound assumes it."""
        if self.kb_mix.fixed_eta is None:
            return None
        prior = torch.zeros(self.n_experts, dtype=torch.float64, device=self.device)
        prior[0] = SHARED_PRIOR
        if (slot := self.kb.slot_of.get(POPULATION)) is not None:
            prior[1 + slot] = SHARED_PRIOR
        return prior

    def top_log_prior(self) -> torch.Tensor:
        """The top level's log prior over its experts (``TOP``): learned across tasks (``learn_prior``) for the
        fixed-rate losses; uniform for anytime Hedge, whose bound assumes it."""
        if self.top_mix.fixed_eta is None:
            return torch.zeros(len(TOP), dtype=torch.float64, device=self.device)
        return self.top_prior.log().to(self.device)

    def learn_prior(self, L: np.ndarray, present: np.ndarray) -> None:
        """Re-estimate the top level's prior from tasks' cumulative losses ``L`` and which experts took part
        (``present``), [tasks, len(TOP)] (empirical Bayes: EM for the share of tasks each expert is right for,
        ``hedge.prior_em``), warm-started from the last estimate, mixed with ``PRIOR_FLOOR`` per expert; the prior
        moves ``PRIOR_STEP`` of the way to it. The move's log ratio max_k ln(π_k new / π_k old) adds to the drift:
        a task's regret bound grows by the drift over its life (``reports.regrets``). Anytime Hedge keeps its
        uniform prior."""
        eta = self.top_mix.fixed_eta
        if eta is None or not len(L):
            return
        old = self.top_prior.numpy()
        pi = prior_em(L, present, old.copy(), eta, PRIOR_ITERATIONS)
        pi = PRIOR_FLOOR + (1.0 - len(pi) * PRIOR_FLOOR) * pi / pi.sum()
        self.top_prior = torch.from_numpy((1.0 - PRIOR_STEP) * old + PRIOR_STEP * pi)
        self.tasks.drift += max(0.0, float(np.log(self.top_prior.numpy() / old).max()))

    def top_level(
        self,
        top: torch.Tensor,
        loss_top: torch.Tensor,
        in_top: torch.Tensor,
        rounds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top level's weights and the combined prediction; a sleeping KB level then "predicts" it."""
        w_top = self.top_mix.weights(loss_top, in_top, rounds, self.top_log_prior())
        pred = self.top_mix.mix(w_top, top)
        top[:, 1] = torch.where(in_top[:, 1:2], top[:, 1], pred)
        return w_top, pred

    def errors(self, preds: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each prediction's error: squared (regression) or a mistake (classification)."""
        if self.cfg.task == "regression":
            return (preds[..., 0].double() - y.double().unsqueeze(-1)) ** 2
        return (preds.argmax(-1) != y.unsqueeze(-1)).double()


class EarlierSum:
    """For rows in order, each tagged with a group: the sum of values over the earlier rows of its group."""

    def __init__(self, group: torch.Tensor):
        self.order = torch.argsort(group, stable=True)
        g = group[self.order]
        first = torch.ones_like(g, dtype=torch.bool)
        first[1:] = g[1:] != g[:-1]
        pos = torch.arange(len(g), device=g.device)
        self.start = torch.cummax(torch.where(first, pos, 0), 0).values

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """Per row, the sum of ``values`` over the earlier rows of its group."""
        v = values[self.order]
        finite = torch.isfinite(v)
        out = torch.empty_like(values)
        if bool(finite.all()):
            out[self.order] = self._earlier(v)
        else:  # one cumulative sum runs over every group: keep a non-finite value inside its own group
            spoilt = self._earlier((~finite).to(v.dtype)) > 0
            out[self.order] = torch.where(spoilt, torch.nan, self._earlier(torch.where(finite, v, 0.0)))
        return out

    def _earlier(self, v: torch.Tensor) -> torch.Tensor:
        total = v.cumsum(0)
        return total - v - (total[self.start] - v[self.start])
