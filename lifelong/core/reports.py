"""Reports read from the tasks' tables: regrets against their bounds, cumulative figures per method and per
task, and the KB's members with their total weight. Nothing here changes state."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from lifelong.core.knowledge import KnowledgeBase
from lifelong.core.mixtures import EARLY_N, SHARED_PRIOR, Mixtures
from lifelong.core.tasks import STAT


def regrets(mixtures: Mixtures, tables: dict[str, torch.Tensor], counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per task (tables ``tables``, labelled counts ``counts``): regret of the combined predictor vs the better level,
    of the KB vs its best expert, and the bound of each."""
    n = len(counts)
    st = tables["stats"][:n]
    best_level = torch.where(tables["in_top"][:n], tables["L_top"][:n], math.inf).min(1).values
    top = (st[:, STAT["loss"]] - best_level).cpu().numpy()
    best_kb = torch.where(tables["in_kb"][:n], tables["L_kb"][:n], math.inf).min(1).values
    kb = torch.where(torch.isfinite(best_kb), st[:, STAT["loss_kb"]] - best_kb, 0.0).cpu().numpy()
    counts = np.array(counts, np.int64)
    top_bound = _top_bounds(mixtures, tables, counts)
    n_kb = tables["n_kb"][:n].cpu().numpy()
    prior = mixtures.kb_log_prior()
    mass = None
    if prior is not None:  # the shared experts that took part weigh e^SHARED_PRIOR instead of 1
        shared = (tables["in_kb"][:n] & (prior > 0)).sum(1).cpu().numpy()
        mass = n_kb + shared * (math.exp(SHARED_PRIOR) - 1.0)
    kb_bound = mixtures.kb_mix.bounds(counts, n_kb, mass)
    return {"top": top, "top_bound": top_bound, "kb": kb, "kb_bound": kb_bound}


def _top_bounds(mixtures: Mixtures, tables: dict[str, torch.Tensor], counts: np.ndarray) -> np.ndarray:
    """The top level's regret bound per task. With the learned prior π (fixed-rate losses): ln(M / π_min) / η,
    M the prior mass of the experts in the task's mixture and π_min the least of theirs, plus the prior's drift
    since the task started (``Mixtures.learn_prior``); for anytime Hedge, its bound with a uniform prior."""
    n = len(counts)
    n_top = tables["n_top"][:n].cpu().numpy()
    eta = mixtures.top_mix.fixed_eta
    if eta is None:
        return mixtures.top_mix.bounds(counts, n_top)
    present = tables["in_top"][:n]
    prior = mixtures.top_prior.to(present.device)
    mass = (prior * present).sum(1)
    least = torch.where(present, prior, 1.0).min(1).values
    drift = mixtures.tasks.drift - tables["drift_at"][:n]
    bound = ((torch.log(mass / least) + drift) / eta).cpu().numpy()
    return np.where((counts > 0) & (n_top > 1), bound, 0.0)


def report(
    mixtures: Mixtures,
    kb: KnowledgeBase,
    blocks: Iterable[tuple[list[str], dict[str, torch.Tensor], np.ndarray]],
    counters: dict[str, int],
) -> dict[str, Any]:
    """Cumulative figures per method, regrets and early errors over ``blocks`` of tasks (names, tables, labelled
    counts; ``Residency.task_blocks``) taken one at a time (the core of ``lifelong evaluate``'s report)."""
    sums = np.zeros(len(STAT))
    labelled = 0
    worst = {"top": (-math.inf, 0.0, 0.0), "kb": (-math.inf, 0.0, 0.0)}  # (regret - bound, regret, bound)
    totals = {"top": 0.0, "kb": 0.0}
    for names, tables, counts in blocks:
        if not names:
            continue
        sums += tables["stats"][: len(names)].cpu().numpy().sum(0)
        labelled += int(counts.sum())
        reg = regrets(mixtures, tables, counts)
        for level in ("top", "kb"):
            value, bound = reg[level], reg[f"{level}_bound"]
            i = int(np.argmax(value - bound))
            worst[level] = max(worst[level], (float(value[i] - bound[i]), float(value[i]), float(bound[i])))
            totals[level] += float(value.sum())
    total = max(1, labelled)
    early_n = max(1.0, float(sums[STAT["early_n"]]))

    def method(err: str, loss: str) -> dict[str, float]:
        return {
            "cumulative_error": float(sums[STAT[err]] / total),
            "cumulative_log_loss": float(sums[STAT[loss]] / total),
        }

    return {
        "labelled": labelled,
        "methods": {
            "lifelong": method("errors", "loss"),
            "local": method("errors_local", "loss_local"),
            "kb_only": method("errors_kb", "loss_kb"),
        },
        "regret": {
            "top_level_max": worst["top"][1],
            "top_level_bound": worst["top"][2],
            "kb_max": worst["kb"][1],
            "kb_bound": worst["kb"][2],
            "top_level_total": totals["top"],
            "kb_total": totals["kb"],
        },
        "early": {
            "first_n": EARLY_N,
            "lifelong": float(sums[STAT["early_errors"]] / early_n),
            "local": float(sums[STAT["early_errors_local"]] / early_n),
        },
        "kb": {"size": kb.size, "capacity": kb.capacity, **kb.counts},
        "counters": dict(counters),
    }


def task_figures(
    mixtures: Mixtures, blocks: Iterable[tuple[list[str], dict[str, torch.Tensor], np.ndarray]]
) -> Iterator[tuple[str, dict[str, float | int]]]:
    """Each task's name and figures (the report's ``tasks``), a block of tasks at a time."""
    for names, tables, counts in blocks:
        if not names:
            continue
        st = tables["stats"][: len(names)].cpu().numpy()
        reg = regrets(mixtures, tables, counts)
        for i, name in enumerate(names):
            c = max(1, int(counts[i]))
            yield (
                name,
                {
                    "events": int(counts[i]),
                    "cumulative_error": float(st[i, STAT["errors"]] / c),
                    "cumulative_error_local": float(st[i, STAT["errors_local"]] / c),
                    "regret": float(reg["top"][i]),
                    "regret_bound": float(reg["top_bound"][i]),
                    "kb_regret": float(reg["kb"][i]),
                    "kb_regret_bound": float(reg["kb_bound"][i]),
                },
            )


def kb_summary(
    mixtures: Mixtures, kb: KnowledgeBase, tables: dict[str, torch.Tensor], counts: np.ndarray
) -> list[dict[str, Any]]:
    """One row per KB member: slot, id, source task and its total weight over tasks ."""
    n = len(counts)
    if n:
        rounds = torch.as_tensor(counts, device=kb.device) + 1
        weights = mixtures.kb_mix.weights(tables["L_kb"][:n], tables["in_kb"][:n], rounds, mixtures.kb_log_prior())
        weights = torch.nan_to_num(weights).sum(0)
    else:
        weights = torch.zeros(mixtures.n_experts)
    rows = [{"slot": "basis", "id": "basis", "source": "-", "weight": float(weights[0])}] if kb.basis_ready else []
    for s, mid in enumerate(kb.ids):
        if mid is not None and bool(kb.valid[s]):
            rows.append({"slot": s, "id": mid, "source": kb.source[s], "weight": float(weights[1 + s])})
    return rows
