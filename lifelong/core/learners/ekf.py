"""Online Bayesian linear models by extended Kalman filter (Laplace) steps, for many tasks at once.

A task's weights per output are Gaussian, ``N(mu, S)`` over the inputs ``z`` (bias included by the
caller). One step costs O(r²) per output for r inputs, needs no step size, and its predictive
probability (the probit approximation) is calibrated while few events have been seen: the right tool for
small per-task inputs (the basis codes, or raw features up to a few hundred dimensions).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

REG_NOISE = 0.05  # observation noise variance for regression, on the target scaled to [0, 1]
MIN_CURVATURE = 1e-4


def start_bias(task: str) -> float:
    """The output bias an untrained learner starts from: the middle of the scaled target for regression (so it
    predicts the middle of ``target_range``, the least it can miss by, not the range's low end); 0 otherwise."""
    return 0.5 if task == "regression" else 0.0


def forward(
    mu_all: torch.Tensor, S_all: torch.Tensor, idx: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None, task: str
) -> torch.Tensor:
    """Predictive mean and variance ``[n, 2C]`` of rows ``idx`` for inputs ``z [n, r]``, before learning;
    with ``y`` (class labels, or regression targets scaled to [0, 1]) each row then takes one EKF step.

    Multiclass outputs are updated one-vs-rest with the softmax gradient (a diagonal-in-classes
    approximation of the Hessian). Written with few, plain tensor ops: on small batches the per-op cost
    dominates.
    """
    mu, S = mu_all.index_select(0, idx), S_all.index_select(0, idx)
    zc = z.unsqueeze(1)  # [n, 1, r], broadcast over outputs
    sz = (S * zc.unsqueeze(2)).sum(-1)
    m = torch.linalg.vecdot(mu, zc)
    v = torch.linalg.vecdot(sz, zc).clamp_min_(0.0)
    if y is not None:
        if task == "regression":
            h = torch.full_like(m, 1.0 / REG_NOISE)
            g = (y.to(m.dtype).unsqueeze(-1) - m) * h
        else:
            if task == "binary":
                p = torch.sigmoid(m)
                g = y.to(m.dtype).unsqueeze(-1) - p
            else:
                p = torch.softmax(m, dim=-1)
                g = torch.nn.functional.one_hot(y.long(), m.shape[-1]).to(m.dtype) - p
            h = (p - p * p).clamp_min_(MIN_CURVATURE)
        denom = (h * v).add_(1.0)
        r = z.shape[-1]
        S_new = torch.baddbmm(
            S.view(-1, r, r), (sz * (h / denom).unsqueeze(-1)).view(-1, r, 1), sz.view(-1, 1, r), alpha=-1
        )
        S_all.index_copy_(0, idx, S_new.view(S.shape))
        mu_all.index_copy_(0, idx, torch.addcmul(mu, (g / denom).unsqueeze(-1), sz))
    return torch.cat([m, v], dim=-1)


def predictive_logits(raw: torch.Tensor, task: str) -> torch.Tensor:
    """Logits of the predictive distribution from ``forward``'s output (probit approximation); the mean
    for regression."""
    m, v = raw.chunk(2, dim=-1)
    if task == "regression":
        return m
    return m / torch.sqrt(1.0 + math.pi * v / 8.0)


TASK_CODES = {"binary": 0, "multiclass": 1, "regression": 2}


@numba.njit(cache=True, error_model="numpy")
def softmax(values: np.ndarray, out: np.ndarray) -> None:
    """``out`` = the softmax of one row ``values``."""
    top = values.max()
    total = 0.0
    for c in range(len(values)):
        out[c] = np.exp(values[c] - top)
        total += out[c]
    for c in range(len(values)):
        out[c] /= total


@numba.njit(cache=True, error_model="numpy")
def label_step(task: int, means: np.ndarray, y: float, p: np.ndarray, g: np.ndarray, h: np.ndarray) -> None:
    """One event's EKF gradient ``g`` and curvature ``h`` per output at the means ``means`` for label ``y``
    (``TASK_CODES``: binary, one-vs-rest softmax, or regression on the scaled target), as ``forward``;
    ``p``: room for the probabilities, in the precision the caller keeps them."""
    n_out = len(means)
    if task == 1:
        softmax(means, p)
    for c in range(n_out):
        if task == 2:
            h[c] = 1.0 / REG_NOISE
            g[c] = (y - means[c]) * h[c]
        else:
            if task == 0:
                p[c] = 1.0 / (1.0 + np.exp(-means[c]))
                target = y
            else:
                target = 1.0 if int(y) == c else 0.0
            h[c] = max(p[c] - p[c] * p[c], MIN_CURVATURE)
            g[c] = target - p[c]


@numba.njit(cache=True, error_model="numpy")
def _sequence(
    mu: np.ndarray,
    S: np.ndarray,
    tasks: np.ndarray,
    z: np.ndarray,
    y: np.ndarray,
    labelled: np.ndarray,
    task: int,
    out: np.ndarray,
    snap_row: np.ndarray,
    snaps: np.ndarray,
    sz: np.ndarray,
    forward: bool = True,
) -> None:
    """``sequence``'s steps (``sz`` [C, r]: room for ``S z``, in ``mu``'s dtype). Without ``forward``, the one row's
    forward pass is the one ``out`` and ``sz`` already hold, and only its learning step is taken (the single-event
    path learning what it just predicted)."""
    n, r = z.shape
    n_out = mu.shape[1]
    m = np.empty(n_out, mu.dtype)
    v = np.empty(n_out, mu.dtype)
    p = np.empty(n_out, mu.dtype)
    g = np.empty(n_out)
    h = np.empty(n_out)
    acc = np.empty(r)
    for i in range(n):
        t = tasks[i]
        for c in range(n_out):
            if not forward:
                m[c], v[c] = out[i, c], out[i, n_out + c]
                continue
            # S z as a sum of S's rows (S is symmetric): contiguous, no reduction in the inner loop
            acc[:] = 0.0
            for b in range(r):
                zb = z[i, b]
                for a in range(r):
                    acc[a] += S[t, c, b, a] * zb
            mc = 0.0
            vc = 0.0
            for a in range(r):
                sz[c, a] = acc[a]
                mc += mu[t, c, a] * z[i, a]
                vc += acc[a] * z[i, a]
            m[c] = mc
            v[c] = max(vc, 0.0)
            out[i, c] = m[c]
            out[i, n_out + c] = v[c]
        if labelled[i]:
            label_step(task, m, y[i], p, g, h)
            for c in range(n_out):
                denom = 1.0 + h[c] * v[c]
                k = h[c] / denom
                step = g[c] / denom
                for a in range(r):
                    for b in range(r):
                        S[t, c, a, b] -= k * sz[c, a] * sz[c, b]
                    mu[t, c, a] += step * sz[c, a]
        if snap_row[i] >= 0:
            snaps[snap_row[i]] = mu[t]


def sequence(
    mu_all: torch.Tensor,
    S_all: torch.Tensor,
    tasks: np.ndarray,
    z: torch.Tensor,
    y: np.ndarray,
    labelled: np.ndarray,
    task: str,
    snap_row: np.ndarray | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """The same steps as ``forward``, event by event in order, compiled (CPU tensors only): no waves needed.

    Returns the raw outputs ``[n, 2C]`` (before each event's own step) and, for rows with
    ``snap_row >= 0``, a copy of that task's ``mu`` right after the row's step (for KB snapshots).
    """
    n = len(tasks)
    mu, S = mu_all.numpy(), S_all.numpy()
    out = np.empty((n, 2 * mu.shape[1]), mu.dtype)
    rows = snap_row if snap_row is not None else np.full(n, -1, np.int64)
    snaps = np.empty((max(1, int(rows.max()) + 1), *mu.shape[1:]), mu.dtype)
    _sequence(
        mu,
        S,
        tasks.astype(np.int64),
        np.ascontiguousarray(z.numpy()),
        y.astype(mu.dtype),
        labelled.astype(np.bool_),
        TASK_CODES[task],
        out,
        rows,
        snaps,
        np.empty((mu.shape[1], z.shape[1]), mu.dtype),
    )
    return torch.from_numpy(out), snaps
