"""The live shared level: one pooled learner over every labelled event of every task, and per task a
mixed-effects learner, the pooled weights plus the task's own deviation.

Both predict in every task's top-level mixture (``mixtures.py``). Event by event in arrival order, compiled, on
the CPU, for both execution paths (the compiled one and the torch waves): so they are batch-exact, and CUDA
gives what the CPU gives.

- **Pooled** (``w``): a Bayesian logistic (softmax, linear) regression by EKF steps, full covariance, prior
  ``N(0, prior_var I)``: the population of tasks as one task, learned at every labelled event, live.
- **Mixed effects**: task τ predicts with ``(w + δ_τ)·x``, where ``δ_τ ~ N(0, Σ)`` is learned by EKF steps
  (diagonal covariance) with the pooled prediction as offset: the online counterpart of a generalised linear
  mixed model, and of what Vowpal Wabbit's ``-q tf`` learns by gradient. ``Σ`` (diagonal) is estimated by
  empirical Bayes: EM over the posteriors, means *and* variances (so that estimation noise does not inflate
  it), of the tasks that learned since the last estimate (``recent.py``), at fixed engine-event counts
  (``Engine._estimate``). A task keeps the *data's* part of its posterior (precision ``me_prec`` and natural
  mean ``me_nat``, per output and input, task-table columns), so its posterior under the current ``Σ`` is
  exact for the Gaussian approximation: ``s = 1 / (1/Σ + prec)``, ``δ = s · nat``. A task learned before ``Σ``
  moved then leans on the new ``Σ`` at once, as EM assumes. A new task's columns are zeros: its deviation
  starts at the prior.

In scale-out each replica keeps its own shared level, fed by its partitions; the knowledge base carries the
pooled mean between replicas as the ``_population`` member (``staging.py``).
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch

from lifelong.config import EngineConfig
from lifelong.core.learners.ekf import TASK_CODES, label_step, start_bias

EM_ITERATIONS = 30  # per estimate, warm-started from the last one
MIN_VARIANCE = 1e-4  # floor of Σ: a deviation may always grow back


@numba.njit(cache=True, error_model="numpy")
def _step(
    w: np.ndarray,
    w_S: np.ndarray,
    prec: np.ndarray,
    nat: np.ndarray,
    sigma: np.ndarray,
    tasks: np.ndarray,
    z: np.ndarray,
    y: np.ndarray,
    labelled: np.ndarray,
    task: int,
    out: np.ndarray,
    kept: np.ndarray,
    kept_m: np.ndarray,
    forward: bool = True,
) -> None:
    """Rows in arrival order: both learners' predictive logits (``out`` [n, 2, C]: pooled, mixed; probit-corrected
    as ``ekf.predictive_logits``), then, for labelled rows, one EKF step of each. ``kept`` [3, C, r] and ``kept_m``
    [4, C]: room for a row's forward pass; without ``forward``, the one row's forward pass is the one they hold,
    and only its learning steps are taken (the single-event path learning what it just predicted)."""
    n, r = z.shape
    n_out = w.shape[0]
    inv_sigma = 1.0 / sigma
    sz, d, s = kept[0], kept[1], kept[2]
    m, v, md, vd = kept_m[0], kept_m[1], kept_m[2], kept_m[3]
    p = np.empty(n_out)
    g = np.empty(n_out)
    h = np.empty(n_out)
    mean = np.empty(n_out)
    for i in range(n):
        t = tasks[i]
        for c in range(n_out if forward else 0):
            # S z as a sum of S's rows (S is symmetric): contiguous, no reduction in the inner loop
            sz[c, :] = 0.0
            for b in range(r):
                zb = z[i, b]
                for a in range(r):
                    sz[c, a] += w_S[c, b, a] * zb
            mc = 0.0
            vc = 0.0
            mdc = 0.0
            vdc = 0.0
            for a in range(r):
                za = z[i, a]
                mc += w[c, a] * za
                vc += sz[c, a] * za
                s[c, a] = 1.0 / (inv_sigma[c, a] + prec[t, c, a])
                d[c, a] = s[c, a] * nat[t, c, a]
                mdc += d[c, a] * za
                vdc += s[c, a] * za * za
            m[c], v[c], md[c], vd[c] = mc, max(vc, 0.0), mdc, vdc
            if task == 2:
                out[i, 0, c], out[i, 1, c] = m[c], m[c] + md[c]
            else:
                out[i, 0, c] = m[c] / math.sqrt(1.0 + math.pi * v[c] / 8.0)
                out[i, 1, c] = (m[c] + md[c]) / math.sqrt(1.0 + math.pi * (v[c] + vd[c]) / 8.0)
        if not labelled[i]:
            continue
        for level in range(2):  # 0: the deviation, with the pooled prediction as offset; 1: the pooled weights
            for c in range(n_out):
                mean[c] = m[c] + (md[c] if level == 0 else 0.0)
            label_step(task, mean, y[i], p, g, h)
            for c in range(n_out):
                if level == 0:
                    denom = 1.0 + h[c] * vd[c]
                    for a in range(r):
                        za = z[i, a]
                        d[c, a] += s[c, a] * za * g[c] / denom
                        prec[t, c, a] += h[c] * za * za
                        nat[t, c, a] = d[c, a] * (inv_sigma[c, a] + prec[t, c, a])
                else:
                    denom = 1.0 + h[c] * v[c]
                    k = h[c] / denom
                    step = g[c] / denom
                    for a in range(r):
                        for b in range(r):
                            w_S[c, a, b] -= k * sz[c, a] * sz[c, b]
                        w[c, a] += step * sz[c, a]


@numba.njit(cache=True, error_model="numpy")
def _em(prec: np.ndarray, nat: np.ndarray, sigma: np.ndarray, steps: int, low: float, high: float) -> None:
    """``SharedLevel.em``: ``sigma`` [C, r] updated in place (1/Σ taken once a step: the inner loop, across Σ's
    entries, vectorises)."""
    n = prec.shape[0]
    acc = np.empty_like(sigma)
    inv = np.empty_like(sigma)
    for _ in range(steps):
        acc[:] = 0.0
        inv[:] = 1.0 / sigma
        for t in range(n):
            for c in range(sigma.shape[0]):
                for a in range(sigma.shape[1]):
                    s = 1.0 / (inv[c, a] + prec[t, c, a])
                    d = s * nat[t, c, a]
                    acc[c, a] += d * d + s
        for c in range(sigma.shape[0]):
            for a in range(sigma.shape[1]):
                sigma[c, a] = max(acc[c, a] / n, low)
    for c in range(sigma.shape[0]):
        for a in range(sigma.shape[1]):
            sigma[c, a] = min(sigma[c, a], high)


class SharedLevel:
    """The pooled learner's weights and covariance, ``Σ``, and the EM schedule; the per-task columns
    (``me_prec``, ``me_nat``) are the task table's."""

    def __init__(self, cfg: EngineConfig, n_out: int):
        self.cfg = cfg
        r = cfg.dim + 1
        self.task = TASK_CODES[cfg.task]
        self.lo, self.hi = cfg.target_range
        self.w = np.zeros((n_out, r))
        self.w[:, -1] = start_bias(cfg.task)
        self.w_S = np.broadcast_to(np.eye(r) * cfg.prior_var, (n_out, r, r)).copy()
        self.sigma = np.full((n_out, r), cfg.prior_var)
        self.learned = 0  # labelled events the pooled learner has learned

    def sequence(
        self, cols: dict[str, torch.Tensor], tasks: np.ndarray, x1: torch.Tensor, y: np.ndarray, labelled: np.ndarray
    ) -> torch.Tensor:
        """Predictive logits ``[n, 2, C]`` (pooled, mixed; CPU, float64) of a segment's rows (task rows ``tasks``
        of the table ``cols``; features with the bias column ``x1``), each learner learning the labelled rows in
        order."""
        n = len(tasks)
        on_cpu = cols["me_prec"].device.type == "cpu"
        uniq, local = (tasks, tasks) if on_cpu else np.unique(tasks, return_inverse=True)
        if on_cpu:
            prec, nat = cols["me_prec"].numpy(), cols["me_nat"].numpy()
        else:
            at = torch.as_tensor(uniq, device=cols["me_prec"].device)
            prec, nat = cols["me_prec"][at].cpu().numpy(), cols["me_nat"][at].cpu().numpy()
        target = (y - self.lo) / (self.hi - self.lo) if self.cfg.task == "regression" else y
        out = np.empty((n, 2, self.w.shape[0]))
        _step(
            self.w,
            self.w_S,
            prec,
            nat,
            self.sigma,
            np.ascontiguousarray(local, np.int64),
            np.ascontiguousarray(x1.cpu().numpy(), np.float64),
            np.asarray(target, np.float64),
            labelled.astype(np.bool_),
            self.task,
            out,
            np.empty((3, *self.w.shape)),
            np.empty((4, self.w.shape[0])),
        )
        if not on_cpu:
            cols["me_prec"][at] = torch.as_tensor(prec, device=at.device)
            cols["me_nat"][at] = torch.as_tensor(nat, device=at.device)
        self.learned += int(labelled.sum())
        return torch.from_numpy(out)

    def em(self, prec: np.ndarray, nat: np.ndarray) -> None:
        """Re-estimate ``Σ`` from tasks' data parts (``prec``, ``nat`` [tasks, C, r]): ``EM_ITERATIONS`` steps
        (from the last estimate) of Σ ← mean over tasks of (δ² + s) with each task's posterior under the current
        Σ, then Σ within [``MIN_VARIANCE``, prior_var]."""
        if len(prec):
            _em(prec, nat, self.sigma, EM_ITERATIONS, MIN_VARIANCE, self.cfg.prior_var)

    def state(self) -> dict[str, torch.Tensor]:
        """The pooled learner, Σ and the count, as tensors (checkpoint)."""
        return {
            "shared.w": torch.from_numpy(self.w),
            "shared.w_S": torch.from_numpy(self.w_S),
            "shared.sigma": torch.from_numpy(self.sigma),
            "shared.learned": torch.tensor(self.learned),
        }

    def load_state(self, tensors: dict[str, Any]) -> None:
        """Restore what ``state`` gave (a checkpoint without it: the shared level starts afresh)."""
        if "shared.w" in tensors:
            self.w = tensors["shared.w"].numpy().copy()
            self.w_S = tensors["shared.w_S"].numpy().copy()
            self.sigma = tensors["shared.sigma"].numpy().copy()
            self.learned = int(tensors["shared.learned"])
