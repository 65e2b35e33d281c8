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
- ``squared`` loss on a known target range [a, b]: η = 1 / (2 (b-a)²) (exp-concave), regret ≤ ln N / η.
- ``hedge`` (absolute loss, scaled to [0, 1]; not mixable): anytime rate η_t = sqrt(8 ln M / t) with a
  fixed M, regret ≤ (2/η_{n+1} − 1/η_1) ln N + Σ_t η_t / 8 (Cesa-Bianchi & Lugosi 2006, Thm 2.3 proof).
"""

from __future__ import annotations

import math

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
        self.fixed_eta = {"log": 1.0, "squared": 1.0 / (2.0 * (self.hi - self.lo) ** 2)}.get(loss)

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
    return (proba + EPS) / (1.0 + EPS * proba.shape[-1])


def _expand_index(y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    idx = y.long()
    while idx.dim() < pred.dim():
        idx = idx.unsqueeze(-1)
    return idx.expand(*pred.shape[:-1], 1)
