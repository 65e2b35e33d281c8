"""The knowledge base: frozen members from earlier tasks, their eviction, and the shared-basis expert.

Members are snapshots of task learners, one slot per source task (a newer snapshot of the same task
replaces the older one in place). A snapshot that is a near-duplicate of another task's member (cosine of
the parameter vectors at least ``engine.duplicate_cosine``) is dropped. When all ``kb_capacity`` slots are
used, the member whose latest snapshot is oldest is evicted. These rules read nothing but the sequence of
snapshots, so replicas applying the same knowledge log hold the same KB. All members are evaluated for a
batch in one batched operation.

The basis expert (ELLA-style, linear learners only) keeps the top right singular vectors of the members'
weight vectors (bias included, not centred, so the mean direction is kept) and learns per task a code in
that basis online, by an extended Kalman filter (Laplace) update that starts from the members' own code
distribution: a task related to earlier ones needs a few events instead of hundreds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lifelong.config import EngineConfig
from lifelong.core.events import RESERVED_TASK
from lifelong.core.learners import ekf
from lifelong.core.learners.base import Learners, rows_not_finite
from lifelong.core.tasks import grow_rows, grown
from lifelong.storage import wire

JITTER = 1e-2  # added to the prior covariance of codes, so that it stays positive definite
# The task-level prior (``task_prior``): from this many members on, shrunk at least this much towards the plain
# prior (more while members are fewer than weights): a fixed, larger shrinkage cost related and short tasks, a
# fixed smaller one the digit pairs (docs/DESIGN.md).
PRIOR_MEMBERS = 8
PRIOR_SHRINK = 0.1
# bases kept to carry a returning task's code into the current one (``KnowledgeBase.carried``); a task away for
# longer restarts its code from the prior
BASES_KEPT = 64


@dataclass
class Staged:
    """A snapshot waiting for the next publication: taken when triggered, published every publish_every."""

    task: int  # -1 for a member read from the knowledge log
    task_name: str
    learned: int
    seq: int  # engine event count of the trigger: publication order is arrival order
    store: Any  # a one-slot member store holding the snapshot's parameters


class KnowledgeBase:
    """Members, per-slot metadata and the basis expert. Expert 0 is the basis; expert ``1 + s`` is slot s."""

    def __init__(self, cfg: EngineConfig, learners: Learners, dim: int, device: torch.device):
        self.cfg = cfg
        self.learners = learners
        self.capacity = cfg.kb_capacity
        self.device = device
        self.dtype = getattr(torch, cfg.dtype)
        self.store = learners.new_store(self.capacity)
        self.ids: list[str | None] = [None] * self.capacity
        self.source: list[str | None] = [None] * self.capacity
        self.slot_of: dict[str, int] = {}  # source task -> slot
        self.valid = torch.zeros(self.capacity, dtype=torch.bool, device=device)
        self.vectors: torch.Tensor | None = None  # unit parameter vectors per slot, for duplicate checks
        self.counts = {"added": 0, "replaced": 0, "evicted": 0, "duplicates": 0}
        self.applied = 0  # member records applied so far: the position in the (shared) knowledge log
        self.updated = [-1] * self.capacity  # per slot, the position of its latest record
        self.entered = [0] * self.capacity  # per slot, the position of the record its expert entered with (0: none)
        self.n_out = learners.n_pred if cfg.task == "multiclass" else 1
        self.basis_on = cfg.basis and learners.linear
        self.basis_ready = False
        self.basis_at = 0  # ``applied`` when the basis was last computed: identifies it across replicas
        self.basis_since = 0  # ``applied`` when the basis expert first existed (0: not yet)
        self.bases: dict[int, torch.Tensor] = {}  # recent bases by ``basis_at``, the current one included
        r, c = cfg.basis_rank, self.n_out
        self.B = torch.zeros(dim + 1, r, dtype=self.dtype, device=device)
        self.prior_mu = torch.zeros(c, r, dtype=self.dtype, device=device)
        self.prior_S = torch.eye(r, dtype=self.dtype, device=device)
        self.turns: tuple[torch.Tensor, dict[tuple[int, bool], Any]] = (self.B, {})  # ``turn``'s, for this ``B``
        self.mu = torch.zeros(0, c, r, dtype=self.dtype, device=device)  # codes of tasks 0 .. _n - 1
        self.task_S: torch.Tensor | None = None  # the covariance new tasks' learners start from (``_task_prior``)
        self.S = torch.zeros(0, c, r, r, dtype=self.dtype, device=device)
        self._n = 0

    @property
    def size(self) -> int:
        """Members held now."""
        return int(self.valid.sum())

    def ensure(self, n_tasks: int) -> None:
        """Give new tasks the prior code (the members' code distribution); rows grow by doubling."""
        if n_tasks <= self._n:
            return
        cap = self.mu.shape[0]
        if n_tasks > cap:
            new_cap = grown(n_tasks, cap, self.cfg.max_resident_tasks)
            self.mu, self.S = (grow_rows(a, new_cap) for a in (self.mu, self.S))
        self.mu[self._n : n_tasks] = self.prior_mu
        self.S[self._n : n_tasks] = self.prior_S
        self._n = n_tasks

    # --- prediction and learning ---

    def forward_basis(
        self,
        idx: torch.Tensor,
        z: torch.Tensor,
        y: torch.Tensor | None = None,
        codes: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Raw outputs of the basis expert for codes' inputs ``z = x1 @ B``; with ``y``, then one EKF step.
        ``codes``: (mu, S) to read rows ``idx`` from instead of the tasks' own (no learning then)."""
        if not self.basis_on:
            return torch.zeros(len(idx), 2 * self.n_out, dtype=self.dtype, device=self.device)
        if y is not None and self.cfg.task == "regression":
            lo, hi = self.cfg.target_range
            y = (y - lo) / (hi - lo)
        mu, S = codes or (self.mu, self.S)
        return ekf.forward(mu, S, idx, z, y, self.cfg.task)

    def forward_basis_new(self, z: torch.Tensor) -> torch.Tensor:
        """``forward_basis`` (no learning) for tasks not created yet: their codes are the prior."""
        if not self.basis_on:
            return torch.zeros(len(z), 2 * self.n_out, dtype=self.dtype, device=self.device)
        n = len(z)
        mu = self.prior_mu.expand(n, *self.prior_mu.shape).contiguous()
        S = self.prior_S.expand(n, self.n_out, *self.prior_S.shape).contiguous()
        return ekf.forward(mu, S, torch.arange(n, device=self.device), z, None, self.cfg.task)

    def sequence_basis(self, tasks: np.ndarray, z: torch.Tensor, y: np.ndarray, labelled: np.ndarray) -> torch.Tensor:
        """``forward_basis`` for a whole segment, event by event in order (compiled, CPU)."""
        if not self.basis_on:
            return torch.zeros(len(tasks), 2 * self.n_out, dtype=self.dtype)
        if self.cfg.task == "regression":
            lo, hi = self.cfg.target_range
            y = (y - lo) / (hi - lo)
        return ekf.sequence(self.mu, self.S, tasks, z, y, labelled, self.cfg.task)[0]

    def finish_basis(self, raw: torch.Tensor) -> torch.Tensor:
        """Predictions of the basis expert from ``forward_basis``'s raw outputs."""
        if not self.basis_on:  # a placeholder; the basis expert never joins a mixture
            return torch.zeros(len(raw), self.learners.n_pred, dtype=self.dtype, device=self.device)
        return self.learners.to_pred(ekf.predictive_logits(raw, self.cfg.task))

    def not_finite(self, tasks: np.ndarray) -> np.ndarray:
        """Which of ``tasks`` hold a non-finite basis code."""
        if not self.basis_on:
            return np.zeros(len(tasks), bool)
        return rows_not_finite([self.mu, self.S], tasks)

    # --- membership ---

    def publish(self, staged: list[Staged]) -> list[int]:
        """Apply member records in log order; return the slots whose expert is new (empty or evicted before).

        The result depends only on the records and their order, never on local timing or local tasks: every
        replica that applies the same log holds the same members in the same slots.
        """
        if not staged:
            return []
        # the small dense arithmetic of a publication in numpy, on the CPU (torch's cost per operation is several
        # times numpy's on arrays this small)
        vecs = self.learners.member_vectors([snap.store for snap in staged]).cpu().numpy()
        shared = bool(vecs.shape[1])  # parameter vectors in a common form: near-duplicates are dropped
        if shared:
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            if self.vectors is None:
                self.vectors = torch.zeros(self.capacity, vecs.shape[1], dtype=self.dtype, device=self.device)
            # each record's cosine to what each slot holds as the slots fill (-inf: empty): a slot's column becomes
            # its new record's cosines to the others
            near = vecs @ self.vectors.cpu().numpy().T
            cos_new = vecs @ vecs.T
        holder = np.full(self.capacity, -1)  # which record each slot holds now (-1: what it held before)
        valid = self.valid.cpu().numpy()
        if shared:
            near[:, ~valid] = -np.inf
        n_valid = int(valid.sum())
        updated = np.array(self.updated)
        entered: list[int] = []
        for i, snap in enumerate(staged):
            self.applied += 1
            slot = self.slot_of.get(snap.task_name)
            if slot is None and shared and n_valid and near[i].max() >= self.cfg.duplicate_cosine:
                self.counts["duplicates"] += 1
                continue
            if slot is not None:
                self.counts["replaced"] += 1
            else:
                if n_valid < self.capacity:
                    slot = int(valid.argmin())
                    n_valid += 1
                else:  # the member whose latest record is oldest
                    slot = int(updated.argmin())
                    self.counts["evicted"] += 1
                entered.append(slot)
                self.entered[slot] = self.applied
                self.counts["added"] += 1
            self.updated[slot] = updated[slot] = self.applied
            holder[slot], valid[slot] = i, True
            if shared:
                near[:, slot] = cos_new[:, i]
            self.ids[slot] = f"{snap.task_name}@{snap.learned}"
            old = self.source[slot]
            if old is not None:
                del self.slot_of[old]
            self.source[slot] = snap.task_name
            self.slot_of[snap.task_name] = slot
        slots = np.flatnonzero(holder >= 0).tolist()
        if slots:
            self.learners.copy_members(self.store, slots, [staged[holder[s]].store for s in slots])
            self.valid[slots] = True
            if self.vectors is not None and shared:
                self.vectors[slots] = self._tensor(vecs[[holder[s] for s in slots]])
        members = self._members()
        # the population member changes at every publication: alone, it does not move the basis (whose refresh
        # rotates every task's code)
        real = any(snap.task_name != RESERVED_TASK for snap in staged)
        if self.basis_on and members is not None and len(members) >= 2 and real:
            self._refresh_basis(members)
        if self.cfg.task_prior:
            self.task_S = self._task_prior(members)
        return entered

    def _members(self) -> np.ndarray | None:
        """The members as ``[K, d + 1, C]`` (weights with the bias last) in float64 numpy, or None (non-linear)."""
        weights = self.learners.linear_weights(self.store)
        return None if weights is None else weights[self.valid].cpu().numpy().astype(np.float64)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.dtype)

    def _task_prior(self, members: np.ndarray | None) -> torch.Tensor | None:
        """The covariance ``[C, d + 1, d + 1]`` new tasks' EKF learners start from (an empirical-Bayes prior):
        the members' weight covariance, shrunk towards ``prior_var`` x I; None (the plain prior) while fewer than
        ``PRIOR_MEMBERS`` members, or for non-linear ones. Recomputed at every publication."""
        if members is None or len(members) < PRIOR_MEMBERS:
            return None
        w = members.transpose(2, 0, 1)  # [C, K, d + 1]
        centred = w - w.mean(1, keepdims=True)
        cov = centred.transpose(0, 2, 1) @ centred / (w.shape[1] - 1)
        # fewer members than weights: the sample covariance is singular, so lean on the plain prior more
        shrink = max(PRIOR_SHRINK, 1.0 - w.shape[1] / w.shape[2])
        return self._tensor((1 - shrink) * cov + shrink * self.cfg.prior_var * np.eye(w.shape[-1]))

    def _refresh_basis(self, members: np.ndarray) -> None:
        """The basis from the members ``[K, d + 1, C]`` (``_members``), and the prior of codes in it."""
        rows = members.transpose(0, 2, 1).reshape(-1, members.shape[1])  # [K*C, d+1]
        # the top right singular vectors: eigenvectors of the small Gram matrix, largest first (cheaper than
        # an SVD of the members; float64, so the rank cut at singular values 1e-6 of the largest stays exact)
        ev, vec = np.linalg.eigh(rows.T @ rows)
        ev, vec = ev[::-1], vec[:, ::-1]
        r_max = self.cfg.basis_rank
        keep = min(r_max, int((ev > ev[0] * 1e-12).sum()))
        B = np.zeros((len(rows.T), r_max))
        B[:, :keep] = vec[:, :keep]
        codes = members.transpose(0, 2, 1) @ B  # [K, C, r]
        prior_mu = codes.mean(0)
        centred = (codes - prior_mu).reshape(-1, r_max)
        prior_S = centred.T @ centred / max(1, centred.shape[0] - 1) + JITTER * np.eye(r_max)
        self.B, self.prior_mu, self.prior_S = (self._tensor(a) for a in (B, prior_mu, prior_S))
        if not self.basis_ready:
            self.basis_since = self.applied
        self.basis_ready = True
        self.basis_at = self.applied
        self.bases[self.applied] = self.B
        for old in sorted(self.bases)[:-BASES_KEPT]:
            del self.bases[old]

    def carried(self, rows: torch.Tensor, at: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes of tasks ``rows``, learned in the bases computed at ``at`` (one per row), carried into the
        current basis (directions it lacked get the prior); from a basis no longer kept (or none), the prior;
        codes learned in the current basis as they are. A task's code is carried when it next meets the KB
        (``KbEntry.carry_codes``), never for every task at a refresh. Every row at once: one rotation per basis
        the codes were learned in, gathered per row; on the CPU in numpy (torch's cost per operation is several
        times numpy's on arrays this small), elsewhere in torch."""
        return self._carry(rows, at, self.device.type == "cpu")

    def _carry(self, rows: torch.Tensor, at: np.ndarray, in_numpy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``carried``, computed in numpy (CPU tensors only) or in torch."""
        arr: Any = (lambda t: t.numpy()) if in_numpy else (lambda t: t)
        index: Any = (lambda a: a) if in_numpy else (lambda a: torch.as_tensor(a, device=self.device))
        at_rows = index(rows.cpu().numpy())
        mu, S = arr(self.mu)[at_rows], arr(self.S)[at_rows]
        prior_mu, prior_S = arr(self.prior_mu), arr(self.prior_S)
        stale = at != self.basis_at
        kept = np.array(sorted(self.bases), np.int64)
        j = np.minimum(np.searchsorted(kept, at), len(kept) - 1)
        has = (kept[j] == at) & stale if len(kept) else np.zeros(len(at), bool)
        lost = index(stale & ~has)
        mu[lost], S[lost] = prior_mu, prior_S
        if has.any():
            used, which = np.unique(j[has], return_inverse=True)
            turns = zip(*(self.turn(int(b), in_numpy) for b in kept[used]), strict=True)
            rot, prior_mu, prior_S = (np.stack(t) if in_numpy else torch.stack(t) for t in turns)  # per basis
            rot, at_row, per_row = rot[index(which)], index(has), index(which)  # gathered per row
            mu[at_row] = mu[at_row] @ rot.mT + prior_mu[per_row]
            S[at_row] = rot[:, None] @ S[at_row] @ rot[:, None].mT + prior_S[per_row][:, None]
        return (torch.from_numpy(mu), torch.from_numpy(S)) if in_numpy else (mu, S)

    def carried_row(self, row: int, at: int) -> tuple[np.ndarray, np.ndarray]:
        """``carried`` of one row on the CPU, in numpy (the single-event path): by its basis's ``turn``, without the
        batch form's searches and stacks, which cost more than the arithmetic for one row."""
        mu, S = self.mu[row].numpy(), self.S[row].numpy()
        if at == self.basis_at:
            return mu.copy(), S.copy()
        if at not in self.bases:  # from a basis no longer kept: the prior
            return self.prior_mu.numpy().copy(), np.broadcast_to(self.prior_S.numpy(), S.shape).copy()
        rot, prior_mu, prior_S = self.turn(at, True)
        return mu @ rot.T + prior_mu, rot @ S @ rot.T + prior_S

    def turn(self, at: int, in_numpy: bool) -> tuple[Any, Any, Any]:
        """From the kept basis computed at ``at`` into the current one: the rotation ``[r_new, r_old]`` and the
        prior's mean and covariance in the directions the old basis lacked (``I - rot rot'`` applied); made once per
        basis (a publication that refreshes the basis starts afresh), in numpy or in torch (``_carry``)."""
        if self.turns[0] is not self.B:
            self.turns = (self.B, {})
        made = self.turns[1].get((at, in_numpy))
        if made is None:
            arr: Any = (lambda t: t.numpy()) if in_numpy else (lambda t: t)
            rot = arr(self.B).mT @ arr(self.bases[at])
            perp = arr(torch.eye(rot.shape[0], dtype=self.dtype, device=self.device)) - rot @ rot.mT
            made = self.turns[1][at, in_numpy] = (rot, arr(self.prior_mu) @ perp.mT, perp @ arr(self.prior_S) @ perp.mT)
        return made

    # --- state ---

    def state(self) -> dict[str, Any]:
        """Members, basis and codes as tensors (with ``meta``, what ``load_state`` restores)."""
        out: dict[str, Any] = {f"kb.store.{k}": v for k, v in self.learners.store_state(self.store).items()}
        out.update(
            {
                "kb.valid": self.valid.cpu(),
                "kb.B": self.B.cpu(),
                "kb.prior_mu": self.prior_mu.cpu(),
                "kb.prior_S": self.prior_S.cpu(),
                "kb.mu": self.mu[: self._n].cpu(),
                "kb.S": self.S[: self._n].cpu(),
            }
        )
        if self.vectors is not None:
            out["kb.vectors"] = self.vectors.cpu()
        if self.task_S is not None:
            out["kb.task_S"] = self.task_S.cpu()
        if self.bases:
            out["kb.bases"] = torch.stack([self.bases[at].cpu() for at in sorted(self.bases)])
        return out

    def meta(self) -> dict[str, Any]:
        """Slot metadata and counters as JSON-able values."""
        return {
            "ids": self.ids,
            "source": self.source,
            "counts": self.counts,
            "basis_ready": self.basis_ready,
            "applied": self.applied,
            "updated": self.updated,
            "basis_at": self.basis_at,
            "basis_since": self.basis_since,
            "entered": self.entered,
            "bases": sorted(self.bases),
        }

    def load_state(self, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Restore what ``state`` and ``meta`` returned."""
        prefix = "kb.store."
        self.store = self.learners.load_store({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        dev = self.device
        self.valid = state["kb.valid"].to(dev)
        self.B, self.prior_mu, self.prior_S = (state[k].to(dev) for k in ("kb.B", "kb.prior_mu", "kb.prior_S"))
        self.mu, self.S = state["kb.mu"].to(dev), state["kb.S"].to(dev)
        self._n = len(self.mu)
        self.vectors = state["kb.vectors"].to(dev) if "kb.vectors" in state else None
        self.task_S = state["kb.task_S"].to(dev) if "kb.task_S" in state else None
        self.ids, self.source = list(meta["ids"]), list(meta["source"])
        self.slot_of = {name: slot for slot, name in enumerate(self.source) if name is not None}
        self.counts, self.basis_ready = dict(meta["counts"]), bool(meta["basis_ready"])
        self.applied, self.updated, self.basis_at = int(meta["applied"]), list(meta["updated"]), int(meta["basis_at"])
        # (state from before lazy entry: every task had met the KB, as ``Engine.load_state`` records)
        self.entered = list(meta.get("entered", [0] * self.capacity))
        self.basis_since = int(meta.get("basis_since", self.basis_at if self.basis_ready else 0))
        at = meta.get("bases", [self.basis_at] if self.basis_ready else [])
        stacked = state.get("kb.bases", self.B[None].cpu())
        self.bases = {int(a): stacked[j].to(dev) for j, a in enumerate(at)}

    # --- the knowledge log (shared by replicas) ---

    def encode(self, snaps: list[Staged]) -> list[bytes]:
        """A member record for the knowledge topic per snapshot: its arrays and JSON metadata (never pickle),
        the arrays of all of them laid out at once (one snapshot at a time took 8% of a replica's loop)."""
        if not snaps:
            return []
        metas = [{"id": f"{s.task_name}@{s.learned}", "source": s.task_name, "learned": s.learned} for s in snaps]
        states = [self.learners.store_state(s.store) for s in snaps]
        return wire.pack_many("member", metas, {k: torch.stack([st[k] for st in states]) for k in states[0]})

    def decode(self, data: bytes | None, max_bytes: int) -> Staged:
        """A member record from the knowledge topic, checked against this KB's member shapes (``wire.Refused``)."""
        wire.check_shareable(self.learners)
        spec = wire.spec_of(self.learners.store_state(self.learners.new_store(1)))
        meta, arrays = wire.unpack(data, "member", spec, max_bytes)
        source, learned = meta.get("source"), meta.get("learned")
        if not isinstance(source, str) or not 0 < len(source) <= 256 or type(learned) is not int or learned < 1:
            raise wire.Refused("malformed", f"bad member metadata {meta!r:.200}")
        return Staged(-1, source, learned, 0, self.learners.load_store(arrays))
