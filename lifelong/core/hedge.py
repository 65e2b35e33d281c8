"""Exponential weights: losses, learning rates, mixed predictions and the regret bounds they guarantee.

Experts are mixed per task with weights ``w_k ∝ exp(-η L_k)`` computed in log space. An expert that joins
a running mixture (a new KB member, or the KB level itself) starts with ``L_k`` equal to the mixture's own
cumulative loss so far. That is the "sleeping experts" reduction: the run is the same as if the expert had
been there from the start predicting exactly what the mixture predicted, so every bound below holds with
``N`` = the number of experts that ever took part, against each expert on the stretch it took part in.

- ``log`` loss (classification): probabilities mixed with η = 1 (Bayes mixture), regret ≤ ln N.
  With prior weights ``π_k`` (``log_prior``, fixed per expert; fixed-rate losses only) the weights are
  ``∝ π_k exp(-η L_k)`` and the regret against expert k is ≤ ln(M / π_k) / η, M = the prior weight of all
  experts that took part: with weight 1 for most experts, ``bound(n, N, mass=M)`` ≤ ln M / η holds against
  every expert of weight ≥ 1.
- ``squared`` loss on a known target range [a, b]: Vovk's aggregating algorithm, η = 2 / (b-a)² (the loss is
  η-mixable), regret ≤ ln N / η. The prediction is not the weighted mean but the substitution
  (a+b)/2 + ln(S_b / S_a) / (2η(b-a)), S_y = Σ_k w_k exp(-η (y - p_k)²) over the experts' predictions clipped
  to [a, b]: for every label in [a, b] its loss is at most -ln(Σ_k w_k exp(-η λ_k)) / η (Vovk 2001, "Competitive
  on-line statistics"), at four times the rate the weighted mean allows (1 / (2 (b-a)²)).
- ``hedge`` (absolute loss, scaled to [0, 1]; not mixable): anytime rate η_t = sqrt(8 ln M / t) with a
  fixed M, regret ≤ (2/η_{n+1} − 1/η_1) ln N + Σ_t η_t / 8 (Cesa-Bianchi & Lugosi 2006, Thm 2.3 proof).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

EPS = 1e-6  # experts' probabilities are smoothed by this much, so no log loss is infinite


class Mixing:
    """The loss, learning rate and bound of one mixing mode.

    >>> m = Mixing("log")
    >>> round(m.bound(n=100, n_experts=2), 4)
    0.6931
    """

    def __init__(self, loss: str, target_range: tuple[float, float] = (0.0, 1.0), hedge_m: int = 2):
        if loss not in ("log", "squared", "hedge"):
            raise ValueError(f"unknown mixing loss {loss!r}")
        self.loss_name = loss
        self.lo, self.hi = target_range
        self.hedge_m = max(2, hedge_m)
        self.squared_eta = 2.0 / (self.hi - self.lo) ** 2  # the aggregating algorithm's rate (``mix``)
        self.fixed_eta = {"log": 1.0, "squared": self.squared_eta}.get(loss)

    def eta(self, n: torch.Tensor) -> torch.Tensor:
        """Learning rate for round ``n`` (1-based, per task)."""
        if self.fixed_eta is not None:
            return torch.full_like(n, self.fixed_eta, dtype=torch.float64)
        return torch.sqrt(8.0 * math.log(self.hedge_m) / n.to(torch.float64))

    def weights(
        self, cum_loss: torch.Tensor, present: torch.Tensor, n: torch.Tensor, log_prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Normalised weights ``[..., K]`` from cumulative losses (and log prior weights ``[K]``); absent experts
        get weight 0."""
        logits = -self.eta(n).unsqueeze(-1) * cum_loss
        if log_prior is not None:
            logits = logits + log_prior
        logits = logits.masked_fill(~present, -math.inf)
        return torch.softmax(logits, dim=-1)

    def mix(self, weights: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
        """The mixed prediction ``[..., C]`` of experts ``preds`` ``[..., K, C]`` under ``weights`` ``[..., K]``:
        the weighted mean, or for squared loss the aggregating algorithm's substitution (``_substitute``)."""
        if self.loss_name != "squared":
            return mix(weights, preds)
        eta, lo, hi = self.squared_eta, self.lo, self.hi
        p = preds[..., 0].double().clamp(lo, hi)
        s_lo = (weights * torch.exp(-eta * (p - lo) ** 2)).sum(-1)
        s_hi = (weights * torch.exp(-eta * (hi - p) ** 2)).sum(-1)
        out = 0.5 * (lo + hi) + torch.log(s_hi / s_lo) / (2.0 * eta * (hi - lo))
        return torch.where(s_lo > 0, out, 0.0).unsqueeze(-1)

    def loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of predictions ``[..., C]`` (probabilities, or ``C = 1`` values for regression)."""
        if self.loss_name == "squared":
            return (pred[..., 0].double() - y.double()) ** 2
        if self.loss_name == "hedge" and pred.shape[-1] == 1:
            return (pred[..., 0].double() - y.double()).abs() / (self.hi - self.lo)
        p_true = torch.gather(pred, -1, _expand_index(y, pred)).squeeze(-1).double()
        if self.loss_name == "hedge":
            return 1.0 - p_true
        return -torch.log(p_true)

    def bound(self, n: int, n_experts: int, mass: float | None = None) -> float:
        """Regret bound after ``n`` rounds against any of ``n_experts`` experts; with prior weights, ``mass`` is
        the prior weight of all of them (each at least 1), and the bound holds against those of weight ≥ 1."""
        if n_experts <= 1 or n <= 0:
            return 0.0
        if self.fixed_eta is not None:
            return math.log(n_experts if mass is None else mass) / self.fixed_eta
        lm = math.log(self.hedge_m)
        eta_1, eta_next = math.sqrt(8 * lm), math.sqrt(8 * lm / (n + 1))
        eta_sum = (
            sum(math.sqrt(8 * lm / t) for t in range(1, n + 1)) if n < 10_000 else math.sqrt(8 * lm) * 2 * math.sqrt(n)
        )
        return (2 / eta_next - 1 / eta_1) * math.log(n_experts) + eta_sum / 8

    def bounds(self, n: np.ndarray, n_experts: np.ndarray, mass: np.ndarray | None = None) -> np.ndarray:
        """``bound`` for many tasks at once (vectorised for the fixed-rate losses: /metrics reads every task)."""
        if self.fixed_eta is None:
            return np.array([self.bound(int(a), int(b)) for a, b in zip(n, n_experts, strict=True)], np.float64)
        size = np.asarray(n_experts if mass is None else mass, np.float64)
        return np.where((n_experts <= 1) | (n <= 0), 0.0, np.log(np.maximum(size, 1.0)) / self.fixed_eta)


def mix(weights: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
    """Mixed prediction ``[..., C]`` from weights ``[..., K]`` and expert predictions ``[..., K, C]``, in float64
    (the bounds are checked to 1e-9)."""
    return (weights.unsqueeze(-1) * preds.double()).sum(-2)


def smooth(proba: torch.Tensor) -> torch.Tensor:
    """Keep every class probability at least ~EPS, so that log losses stay finite (still sums to 1)."""
    return (proba + EPS).div_(1.0 + EPS * proba.shape[-1])


def _expand_index(y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    idx = y.long()
    while idx.dim() < pred.dim():
        idx = idx.unsqueeze(-1)
    return idx.expand(*pred.shape[:-1], 1)


LOSS_CODES = {"log": 0, "squared": 1, "hedge": 2}


@numba.njit(cache=True, error_model="numpy")
def _loss(code: int, p: np.ndarray, y: float, lo: float, hi: float) -> float:
    if code == 1:
        return float((p[0] - y) ** 2)
    if code == 2 and p.shape[0] == 1:
        return float(abs(p[0] - y) / (hi - lo))
    if code == 2:
        return float(1.0 - p[int(y)])
    return -math.log(p[int(y)])


@numba.njit(cache=True, error_model="numpy")
def _add_losses(
    code: int, preds: np.ndarray, y: float, lo: float, hi: float, present: np.ndarray, acc: np.ndarray
) -> None:
    """``acc[k] +=`` the loss of ``preds[k]`` for every present expert k (log loss inline: the hot case)."""
    c = int(y)
    for k in range(preds.shape[0]):
        if present[k]:
            acc[k] += -math.log(preds[k, c]) if code == 0 else _loss(code, preds[k], y, lo, hi)


@numba.njit(cache=True, error_model="numpy")
def _substitute(eta: float, lo: float, hi: float, w: np.ndarray, preds: np.ndarray) -> float:
    """The aggregating algorithm's prediction for squared loss from experts ``preds`` [K, 1] under weights ``w``
    (any positive scale; ``Mixing.mix``)."""
    s_lo = s_hi = 0.0
    for k in range(len(w)):
        if w[k] > 0.0:
            p = min(max(preds[k, 0], lo), hi)
            s_lo += w[k] * math.exp(-eta * (p - lo) ** 2)
            s_hi += w[k] * math.exp(-eta * (hi - p) ** 2)
    return 0.5 * (lo + hi) + math.log(s_hi / s_lo) / (2.0 * eta * (hi - lo)) if s_lo > 0.0 else 0.0


@numba.njit(cache=True, error_model="numpy")
def _softmax(logits: np.ndarray, present: np.ndarray, out: np.ndarray) -> None:
    """``Mixing.weights`` for one row: weight 0 for absent experts (and for all, when none is present)."""
    top = -np.inf
    for k in range(len(logits)):
        if present[k] and logits[k] > top:
            top = logits[k]
    total = 0.0
    for k in range(len(logits)):
        out[k] = math.exp(logits[k] - top) if present[k] else 0.0
        total += out[k]
    for k in range(len(logits)):
        out[k] = out[k] / total if total > 0.0 else 0.0


@numba.njit(cache=True, error_model="numpy")
def _eta(fixed: float, m: float, rounds: float) -> float:
    return fixed if fixed > 0.0 else math.sqrt(8.0 * math.log(m) / rounds)


@numba.njit(cache=True, error_model="numpy")
def _score(code: int, regression: bool, p: np.ndarray, y: float, lo: float, hi: float) -> tuple[float, float]:
    """(mixing loss, error) of one prediction: 0/1 error for classes, squared error for values."""
    if regression:
        return _loss(code, p, y, lo, hi), (p[0] - y) ** 2
    return _loss(code, p, y, lo, hi), 0.0 if np.argmax(p) == int(y) else 1.0


@numba.njit(cache=True, error_model="numpy")
def top_k(w: np.ndarray, slots: np.ndarray, weights: np.ndarray) -> None:
    """The ``len(slots)`` heaviest weights, heaviest first (the lower index first on ties)."""
    m = len(slots)
    for s in range(m):
        slots[s], weights[s] = -1, -1.0
    for k in range(len(w)):
        if w[k] <= weights[m - 1]:
            continue
        s = m - 1
        while s > 0 and w[k] > weights[s - 1]:
            slots[s], weights[s] = slots[s - 1], weights[s - 1]
            s -= 1
        slots[s], weights[s] = k, w[k]


# One compiled loop over the segment's events, long on purpose: both levels' weights, losses and statistics of an
# event depend on every earlier event of its task, and the loop keeps them in registers and local arrays from one
# event to the next; split into functions it would pass that state back and forth on every event.
@numba.njit(cache=True, error_model="numpy")
def mix_events(
    tasks: np.ndarray,
    group: np.ndarray,
    has_x: np.ndarray,
    lab: np.ndarray,
    src: np.ndarray,
    n_before: np.ndarray,
    y: np.ndarray,
    p_top: np.ndarray,
    kb_x: np.ndarray,
    stored: np.ndarray,
    s_kb: np.ndarray,
    s_top: np.ndarray,
    s_pred: np.ndarray,
    L_kb: np.ndarray,
    in_kb: np.ndarray,
    L_top: np.ndarray,
    in_top: np.ndarray,
    stats: np.ndarray,
    log_prior: np.ndarray,
    top_prior: np.ndarray,
    code: int,
    regression: bool,
    eta_fixed: float,
    m_kb: float,
    lo: float,
    hi: float,
    early_n: int,
    top_local: np.ndarray,
    top_kb: np.ndarray,
    pred: np.ndarray,
    w_local: np.ndarray,
    kb_slots: np.ndarray,
    kb_weights: np.ndarray,
    errors: np.ndarray,
    losses: np.ndarray,
) -> None:
    """Both mixtures of a segment, event by event in arrival order (``Mixtures._torch``, compiled).

    Per event with features: the KB level's weights from its task's cumulative losses so far, the top level's
    experts (``p_top``: the local learner, a column the KB level fills, the shared level's learners; written
    back: ``top_local``, ``top_kb``), the top level's weights (log prior ``top_prior``) and the prediction;
    rows without features are left as they are. Per labelled event, scored on the row ``src`` that predicted
    it (or the ``stored`` pending prediction ``s_*``, whose refilled slots carry the KB level's prediction):
    each expert's loss enters its task's row of ``L_kb`` / ``L_top``, and the three predictions' (combined,
    local, KB) losses and errors the statistics.

    With log loss and η = 1 the KB weights of a task (``group``: its row among the segment's tasks) are computed
    from ``L_kb`` once per segment and then multiplied by each expert's probability of the label: the same
    weights, as exp(-L - loss) = exp(-L) p, without an exponential per expert and event.
    """
    n, n_kb, n_p = kb_x.shape
    product = code == 0 and eta_fixed == 1.0
    n_groups = group.max() + 1 if n else 0
    w_group = np.empty((n_groups, n_kb))
    ready = np.zeros(n_groups, np.bool_)
    # log loss: each group's product of the experts' probabilities of its labels (and the logs of what was
    # taken out of it to keep it in range), not yet in L_kb: one logarithm per expert and task per segment
    owed = np.ones((n_groups, n_kb))
    owed_log = np.zeros((n_groups, n_kb))
    owes = np.zeros(n_groups, np.bool_)
    task_of = np.empty(n_groups, np.int64)
    logits = np.empty(n_kb)
    n_top = p_top.shape[1]
    wt = np.empty(n_top)
    lt = np.empty(n_top)
    three = np.empty((3, n_p))
    for i in range(n):
        t, g = tasks[i], group[i]
        awake = in_top[t, 1]
        rounds = n_before[i] + 1.0
        task_of[g] = t
        if has_x[i]:
            if not (product and ready[g]):
                if owes[g]:
                    _settle(L_kb[t], in_kb[t], owed[g], owed_log[g])
                    owes[g] = False
                eta = _eta(eta_fixed, m_kb, rounds)
                for k in range(n_kb):
                    logits[k] = -eta * L_kb[t, k] + log_prior[k]
                _softmax(logits, in_kb[t], w_group[g])
                ready[g] = product
            total = 0.0
            for k in range(n_kb):
                total += w_group[g, k]
            scale = 1.0 / total if total > 0.0 else 0.0
            for c in range(n_p):
                acc = 0.0
                for k in range(n_kb):
                    acc += w_group[g, k] * kb_x[i, k, c]
                top_local[i, c] = p_top[i, 0, c]
                top_kb[i, c] = acc * scale if awake else p_top[i, 0, c]
                p_top[i, 1, c] = top_kb[i, c]
            if code == 1 and awake:
                top_kb[i, 0] = p_top[i, 1, 0] = _substitute(eta_fixed, lo, hi, w_group[g], kb_x[i])
            eta = _eta(eta_fixed, float(n_top), rounds)
            for k in range(n_top):
                lt[k] = -eta * L_top[t, k] + top_prior[k]
            _softmax(lt, in_top[t], wt)
            for c in range(n_p):
                acc = 0.0
                for k in range(n_top):
                    acc += wt[k] * p_top[i, k, c]
                pred[i, c] = acc if code != 1 else _substitute(eta, lo, hi, wt, p_top[i])
                if not awake:  # a sleeping KB level "predicts" the mixture
                    top_kb[i, c] = pred[i, c]
                    p_top[i, 1, c] = pred[i, c]
            w_local[i] = wt[0]
            top_k(w_group[g], kb_slots[i], kb_weights[i])
            for s in range(kb_slots.shape[1]):
                kb_weights[i, s] *= scale
        if not lab[i]:
            continue
        yi = y[i]
        j = src[i]
        experts = kb_x[j] if j >= 0 else s_kb[stored[i]]
        if product:
            c = int(yi)
            top_w = 0.0
            for k in range(n_kb):
                if in_kb[t, k]:
                    owed[g, k] *= experts[k, c]
                    if owed[g, k] < 1e-250:
                        owed_log[g, k] += math.log(owed[g, k])
                        owed[g, k] = 1.0
                    w_group[g, k] *= experts[k, c]
                    top_w = max(top_w, w_group[g, k])
            owes[g] = True
            if ready[g] and 0.0 < top_w < 1e-200:  # keep the weights in range
                for k in range(n_kb):
                    w_group[g, k] /= top_w
        else:
            _add_losses(code, experts, yi, lo, hi, in_kb[t], L_kb[t])
        if j >= 0:
            # the KB level's loss while it sleeps is its stand-in's (the local prediction)
            L_top[t, 0] += _loss(code, top_local[j], yi, lo, hi)
            L_top[t, 1] += _loss(code, top_kb[j] if awake else top_local[j], yi, lo, hi)
            for k in range(2, n_top):
                if in_top[t, k]:
                    L_top[t, k] += _loss(code, p_top[j, k], yi, lo, hi)
            three[0], three[1], three[2] = pred[j], top_local[j], top_kb[j]
        else:
            q = stored[i]
            for k in range(n_top):
                if k < 2 or in_top[t, k]:
                    L_top[t, k] += _loss(code, s_top[q, k], yi, lo, hi)
            three[0], three[1], three[2] = s_pred[q], s_top[q, 0], s_top[q, 1] if awake else s_pred[q]
        early = 1.0 if n_before[i] < early_n else 0.0
        for m in range(3):
            losses[i, m], errors[i, m] = _score(code, regression, three[m], yi, lo, hi)
            stats[t, m] += losses[i, m]
            stats[t, 3 + m] += errors[i, m]
        stats[t, 6] += errors[i, 0] * early
        stats[t, 7] += errors[i, 1] * early
        stats[t, 8] += early
    for g in range(n_groups):
        if owes[g]:
            _settle(L_kb[task_of[g]], in_kb[task_of[g]], owed[g], owed_log[g])


@numba.njit(cache=True, error_model="numpy")
def _settle(L: np.ndarray, present: np.ndarray, owed: np.ndarray, owed_log: np.ndarray) -> None:
    """Add the log losses a product of probabilities ``owed`` (times exp(``owed_log``)) stands for to ``L``."""
    for k in range(len(L)):
        if present[k]:
            L[k] -= owed_log[k] + math.log(owed[k])
        owed[k], owed_log[k] = 1.0, 0.0


@numba.njit(cache=True, error_model="numpy")
def prior_em(L: np.ndarray, present: np.ndarray, pi: np.ndarray, eta: float, steps: int) -> np.ndarray:
    """EM for a prior ``pi`` [K] over experts shared by tasks, from each task's cumulative losses ``L`` [n, K]:
    each step, ``pi`` ← the mean over tasks of the task's posterior ∝ pi_k exp(-η L_k) over its ``present``
    experts, scaled to their prior mass (an absent expert keeps its share ``pi_k``). Returns the new ``pi``.
    A step's sum over tasks is pi_k (Σ_t lik_tk r_t + tasks without expert k), r_t = a task's prior mass over
    its posterior's normaliser: one division per task, not per task and expert (~1.5x faster)."""
    n, k = L.shape
    lik = np.zeros((n, k))  # each task's likelihood of each present expert, up to a factor of the task's (0: absent)
    mass_of = np.zeros((n, k))  # 1 for a present expert: its prior share counts in the task's mass
    absent = np.zeros(k)
    for t in range(n):
        low = np.inf
        for j in range(k):
            if present[t, j]:
                low = min(low, L[t, j])
        for j in range(k):
            if present[t, j]:
                lik[t, j] = math.exp(-eta * (L[t, j] - low))
                mass_of[t, j] = 1.0
            else:
                absent[j] += 1.0
    pi = pi.copy()
    acc = np.empty(k)
    for _ in range(steps):
        acc[:] = absent
        for t in range(n):
            mass = 0.0
            total = 0.0
            for j in range(k):
                mass += mass_of[t, j] * pi[j]
                total += lik[t, j] * pi[j]
            r = mass / total if total > 0.0 else 0.0  # (total > 0 wherever an expert is present: one has lik 1)
            for j in range(k):
                acc[j] += lik[t, j] * r
        for j in range(k):
            pi[j] = pi[j] * acc[j] / n
    return pi


@numba.njit(cache=True, error_model="numpy")
def enter_experts(
    rows: np.ndarray,
    seen: np.ndarray,
    since: np.ndarray,
    own: np.ndarray,
    now: int,
    L_kb: np.ndarray,
    in_kb: np.ndarray,
    n_kb: np.ndarray,
    L_top: np.ndarray,
    in_top: np.ndarray,
    n_top: np.ndarray,
    loss_kb: np.ndarray,
    loss: np.ndarray,
) -> None:
    """KB experts that entered (at log position ``since[k]``, 0: absent) after task ``t`` last met the KB
    (``seen[t]``) join its mixture at its KB level's loss so far (sleeping-expert entry), waking its KB level if it
    slept; the expert of a task's own member (``own[k] == t``) stays out, as if it had never entered, and a KB
    level left without experts sleeps. Then ``seen[t] = now``. For each task of ``rows``."""
    for t in rows:
        if seen[t] >= now:
            continue
        joined = False
        for k in range(len(since)):
            if since[k] <= seen[t]:
                continue
            if own[k] == t:
                in_kb[t, k] = False
                L_kb[t, k] = 0.0
            else:
                L_kb[t, k] = loss_kb[t]
                in_kb[t, k] = True
                n_kb[t] += 1
                joined = True
        if joined and not in_top[t, 1]:
            L_top[t, 1] = loss[t]
            in_top[t, 1] = True
            n_top[t] += 1
        if in_top[t, 1] and not in_kb[t].any():
            in_top[t, 1] = False
            n_top[t] -= 1
            L_top[t, 1] = 0.0
        seen[t] = now
