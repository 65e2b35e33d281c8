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
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import math
import shutil
import tempfile
import time
import typing
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, KeysView
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import orjson
import torch

from lifelong.config import EngineConfig, LabelsConfig
from lifelong.core import features
from lifelong.core.events import RESERVED_TASK, Event, Schema
from lifelong.core.hedge import LOSS_CODES, Mixing, enter_experts, mix, mix_events
from lifelong.core.knowledge import KnowledgeBase, Staged
from lifelong.core.learners import make_learners, pick_device
from lifelong.core.results import (
    CONTROL,
    DUPLICATE,
    KB_TOP,
    LABEL_JOINED,
    LABEL_UNMATCHED,
    LEARNED,
    PREDICTED,
    BatchResult,
)
from lifelong.core.tasks import STATS, S, TaskTable
from lifelong.errors import StateError
from lifelong.storage import wire
from lifelong.storage.task_store import TaskStore, pack_rows, unpack_rows

EARLY_N = 20  # "early" error: each task's first EARLY_N labelled events
FLUSH_ROWS = 8192  # task rows written to the store at a time by ``flush_tasks``
IDLE_BATCHES = 2  # a changed task unused for this many batches may be written to the store (``write_behind``)
LOCAL = ("kb_seen", "code_at")  # task columns that refer to this replica's KB log: never in a changelog record
POPULATION = RESERVED_TASK  # the KB member (source) of the population learner
# Log prior weight of the KB's shared experts (the basis and the population member) over one member's 0: a task
# trusts what all tasks share from its first events, and its own evidence moves it to a member when one fits
# better. The KB bound becomes ln(M) / η with M = members + e^5 per shared expert (``hedge.py``).
SHARED_PRIOR = 5.0

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
)


@dataclass
class _Pending:
    """Everything needed to account and learn when the label of an unlabelled prediction arrives."""

    x: torch.Tensor
    kb_experts: torch.Tensor
    top: torch.Tensor
    pred: torch.Tensor
    versions: torch.Tensor


PENDING_FIELDS = ("x", "kb_experts", "top", "pred", "versions")


class PendingLabels:
    """Predictions waiting for their label, oldest first: ``keys`` maps (task, id) to (engine event count,
    event time); ``stored`` holds a prediction's inputs once its segment is over (within its segment, a label
    joins the prediction's row instead)."""

    def __init__(self) -> None:
        self.keys: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self.stored: dict[tuple[str, str], _Pending] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def drop(self, key: tuple[str, str]) -> None:
        """Forget one pending prediction."""
        del self.keys[key]
        self.stored.pop(key, None)

    def drop_tasks(self, names: set[str] | dict[str, Any]) -> None:
        """Forget the pending predictions of tasks ``names``."""
        for key in [k for k in self.keys if k[0] in names]:
            self.drop(key)

    def state(self) -> tuple[dict[str, torch.Tensor], str]:
        """Tensors (each field stacked) and the keys as one JSON string (checkpoints)."""
        keys = list(self.keys)
        tensors = {}
        if keys:
            entries = [self.stored[k] for k in keys]
            for name in PENDING_FIELDS:
                tensors[f"pending.{name}"] = torch.stack([getattr(en, name) for en in entries]).cpu()
        return tensors, _json([(*k, *self.keys[k]) for k in keys])

    def load_state(self, tensors: dict[str, torch.Tensor], keys: str | list[Any], device: torch.device) -> None:
        """Restore what ``state`` returned."""
        self.keys, self.stored = OrderedDict(), {}
        for j, (task, eid, seq, ts) in enumerate(_listed(keys)):
            key = (task, eid)
            self.keys[key] = (int(seq), float(ts))
            self.stored[key] = _Pending(*(tensors[f"pending.{name}"][j].to(device) for name in PENDING_FIELDS))


@numba.njit(cache=True)
def _count(
    tasks: np.ndarray,
    labelled: np.ndarray,
    control: np.ndarray,
    counts: np.ndarray,
    every: int,
    at: np.ndarray,
    n_before: np.ndarray,
    trigger: np.ndarray,
) -> None:
    """Each event's task's labelled count before it (``counts`` advance), and whether a KB snapshot follows
    it: a control, or a labelled event that brings its task's count to a multiple of ``every`` or into ``at``."""
    for j in range(len(tasks)):
        c = counts[tasks[j]]
        n_before[j] = c
        trigger[j] = control[j]
        if labelled[j]:
            c += 1
            counts[tasks[j]] = c
            trigger[j] = every > 0 and c % every == 0
            for a in at:
                trigger[j] = trigger[j] or c == a


class _Window:
    """(task, id) of the labelled events learned within the pending window, with the event time each was
    learned at, oldest first: a second delivery of one is a duplicate. A key learned again keeps its place;
    the oldest leave first. Kept so that a checkpoint copies it without a loop over its keys (``encoded``):
    each key learned gets the next entry number (``at``), its time is in an array by entry number (NaN once
    it has left), and the keys are JSON-encoded a chunk at a time as they come."""

    CHUNK = 1024  # keys encoded together

    def __init__(self, items: Iterable[tuple[tuple[str, str], float]] = ()):
        self.at: dict[tuple[str, str], int] = {}  # key -> entry number
        self.order: deque[tuple[str, str]] = deque()  # the keys here, oldest first
        self.base, self.n = 0, 0  # entry number of ``times[0]``; of the next key
        self.times = np.empty(self.CHUNK, np.float64)
        self.chunks: deque[tuple[int, bytes]] = deque()  # (first entry number, its keys as JSON)
        self.fresh: list[tuple[str, str]] = []  # keys not encoded yet, from entry number ``n - len(fresh)``
        pairs = list(items)
        self.add([k for k, _ in pairs], [t for _, t in pairs], len(pairs), new=True)

    def __len__(self) -> int:
        return len(self.at)

    def __contains__(self, key: object) -> bool:
        return key in self.at

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.order)

    def __getitem__(self, key: tuple[str, str]) -> float:
        return float(self.times[self.at[key] - self.base])

    def keys(self) -> KeysView[tuple[str, str]]:
        return self.at.keys()

    def items(self) -> Iterator[tuple[tuple[str, str], float]]:
        return ((k, self[k]) for k in self.order)

    def add(self, keys: list[tuple[str, str]], times: list[float], cap: int, new: bool = False) -> None:
        """Learn ``keys`` at ``times``; ``new``: none of them is here yet (nor twice in ``keys``)."""
        fresh = keys if new else [k for k in dict.fromkeys(keys) if k not in self.at]
        n0, end = self.n, self.n + len(fresh)
        if end - self.base > len(self.times):
            self._room(end)
        self.n = end
        self.at.update(zip(fresh, range(n0, end), strict=True))
        self.order.extend(fresh)
        self.fresh.extend(fresh)
        if len(self.fresh) >= self.CHUNK:
            self.chunks.append((end - len(self.fresh), orjson.dumps(self.fresh)))
            self.fresh = []
        if new:
            self.times[n0 - self.base : end - self.base] = times
        else:  # the last time of a key wins
            learned = dict(zip(keys, times, strict=True))
            self.times[[self.at[k] - self.base for k in learned]] = list(learned.values())
        if len(self.at) > cap:  # the oldest leave, together
            order = self.order
            gone = [order.popleft() for _ in range(len(self.at) - cap)]
            self.times[np.fromiter(map(self.at.pop, gone), np.int64, len(gone)) - self.base] = np.nan

    def _pop(self) -> None:
        self.times[self.at.pop(self.order.popleft()) - self.base] = np.nan

    def _first(self) -> int:
        """Entry number of the first key still encoded: chunks whose keys have all left are dropped first."""
        head = self.at[self.order[0]] if self.order else self.n
        while len(self.chunks) > 1 and self.chunks[1][0] <= head:
            self.chunks.popleft()
        return self.chunks[0][0] if self.chunks else self.n - len(self.fresh)

    def _room(self, end: int) -> None:
        """Room in ``times`` for entries up to ``end``: it starts again at the first entry still encoded."""
        first = self._first()
        old = self.times[first - self.base : self.n - self.base]
        self.times = np.empty(max(self.CHUNK, 2 * (end - first)), np.float64)
        self.times[: len(old)] = old
        self.base = first

    def expire(self, limit: float) -> None:
        """Forget the keys learned before ``limit``."""
        while self.order and self.times[self.at[self.order[0]] - self.base] < limit:
            self._pop()

    def forget(self, tasks: set[str] | dict[str, Any]) -> None:
        """Forget the keys of ``tasks`` (their state was replaced: replayed events are not duplicates)."""
        for key in [k for k in self.at if k[0] in tasks]:
            self.times[self.at.pop(key) - self.base] = np.nan
        self.order = deque(k for k in self.order if k in self.at)

    def encoded(self) -> tuple[str, np.ndarray]:
        """Copies of the keys of the entries from the first chunk not wholly gone on, as one JSON array of
        chunks of keys, and of their times (NaN: gone): what ``decoded`` turns back into the window."""
        first = self._first()
        parts = [c for _, c in self.chunks] + ([orjson.dumps(self.fresh)] if self.fresh else [])
        return (b"[" + b",".join(parts) + b"]").decode(), self.times[first - self.base : self.n - self.base].copy()

    @classmethod
    def decoded(cls, chunks: str, times: np.ndarray) -> _Window:
        """The window ``encoded`` described."""
        keys = [k for chunk in orjson.loads(chunks) for k in chunk]
        return cls(((k[0], k[1]), float(t)) for k, t in zip(keys, times.tolist(), strict=True) if t == t)


@dataclass
class _Plan:
    """Per event of a segment: the row of the prediction a label joins (-1: stored earlier), the task's
    labelled count before it, its task's row among the segment's tasks, and whether a KB snapshot follows it."""

    ref: np.ndarray
    n_before: np.ndarray
    group: np.ndarray  # the event's task's row among the segment's tasks ``touched`` (0 .. len(touched) - 1)
    touched: np.ndarray  # the segment's tasks, in increasing order
    trigger: np.ndarray


@dataclass
class _Inputs:
    """What the mixtures of a segment read, per row: whether it has features and a label, the row whose
    predictions a label is scored on (-1: a prediction ``s_*`` stored in an earlier segment), the label, the
    task, the task level's and the KB experts' predictions."""

    has_x: np.ndarray
    lab: np.ndarray
    src: np.ndarray
    y: torch.Tensor
    idx: torch.Tensor
    p_local: torch.Tensor
    kb_x: torch.Tensor
    s_kb: torch.Tensor
    s_top: torch.Tensor
    s_pred: torch.Tensor


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
        self.labels = labels or LabelsConfig()
        self.device = pick_device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        self.schema = Schema(cfg.dim, cfg.task, cfg.n_classes, cfg.target_range, frozenset(cfg.tasks))
        self.learners = make_learners(cfg, cfg.dim, self.device)
        self.kb = KnowledgeBase(cfg, self.learners, cfg.dim, self.device)
        self.n_pred = self.learners.n_pred
        self.n_experts = 1 + cfg.kb_capacity
        loss = "hedge" if cfg.mixing == "hedge" else "squared" if cfg.task == "regression" else "log"
        self.top_mix = Mixing(loss, cfg.target_range, hedge_m=2)
        self.kb_mix = Mixing(loss, cfg.target_range, hedge_m=self.n_experts)
        self.tasks = TaskTable(self.n_experts, cfg.dim, self.device, cfg.max_resident_tasks)
        self.kb_version = torch.zeros(self.n_experts, dtype=torch.long, device=self.device)
        self.pending = PendingLabels()
        # (task, id) of labelled events learned within the pending window (TTL and count): a second delivery
        # of one is a duplicate, not learned again
        self.learned_keys = _Window()
        self.staged: list[Staged] = []
        self.share = False  # True: published snapshots go to ``outbox`` and join the KB via ``apply``
        self.outbox: list[Staged] = []
        self._task_spec: wire.Spec | None = None  # what a changelog record must hold (``decode_task``)
        # tasks beyond ``max_resident_tasks`` live in an on-disk store (``store.py``): in ``store_dir`` (the
        # daemon's, kept across restarts) or, when first needed, in a temporary directory removed with the engine
        self.store_dir = store_dir
        self.store: TaskStore | None = None
        self.tiered = isinstance(getattr(self.learners, "params", None), dict)  # River's models are not arrays
        self._away = np.zeros(len(STATS))  # the statistics of tasks in the store, summed (``stats_total``)
        self.flushed = 0  # tasks the last ``flush_tasks`` wrote, with those ``write_behind`` wrote before it
        self._behind = 0  # tasks ``write_behind`` wrote since the last ``flush_tasks``
        self.events_seen = 0
        self.now_ts = -math.inf
        self.counters = dict.fromkeys(COUNTERS, 0)
        # On the CPU, EKF learners run event by event in compiled code; otherwise (CUDA, AdaGrad, MLP,
        # River) in torch waves. Both give the same results to float tolerance (tested).
        self.compiled = self.learners.can_sequence
        # One learner over every labelled event of every task (on the CPU, compiled), learning each segment's
        # events at its end in arrival order; published as a KB member, and new tasks start from its mean.
        self.population = None
        if cfg.population and getattr(self.learners, "use_ekf", False):
            from lifelong.core.learners.stacked import TorchLearners

            self.population = TorchLearners(cfg, cfg.dim, torch.device("cpu"))
            self.population.ensure(1)
        self.population_n = 0

    # --- per-task tables ---

    def _init_tasks(self, first: int) -> None:
        """Learners, codes and mixture tables for tasks ``first ..`` (they meet the KB in ``_sync_kb``)."""
        n = self.n_tasks
        self.learners.ensure(n)
        self.kb.ensure(n)
        self.tasks.start(self.tasks.cols, slice(first, n), self.kb.basis_at)
        if first < min(n, self.tasks.high):  # rows that held dropped tasks (``drop_tasks``)
            self._reset(np.arange(first, min(n, self.tasks.high)))
        self.tasks.high = max(self.tasks.high, n)

    def _sync_kb(
        self,
        rows: np.ndarray,
        tables: dict[str, torch.Tensor] | None = None,
        since: Any = None,
        names: dict[str, int] | None = None,
    ) -> None:
        """KB experts that entered since tasks ``rows`` (increasing) of ``tables`` last met the KB join their
        mixtures (``hedge.enter_experts``). A publication never sweeps over every task: a task catches up when
        it next meets the KB, where entry gives what it would have given at the publication (its losses have
        not moved since). ``since``: the log position each expert entered at, for a task moved from another KB;
        ``names``: the row of each task in ``tables`` other than the engine's own (own members stay out)."""
        kb, dev = self.kb, self.device
        t = self.tasks.cols if tables is None else tables
        if not len(rows) or kb.applied == 0:
            return
        keys = ("kb_seen", "L_kb", "in_kb", "n_kb", "L_top", "in_top", "n_top", "stats")
        on_cpu = dev.type == "cpu"
        idx = torch.as_tensor(rows, device=dev)
        a = {k: t[k].numpy() if on_cpu else t[k][idx].cpu().numpy() for k in keys}
        own = np.full(1 + kb.capacity, -1, np.int64)  # each expert's own task here (its row in ``a``), or -1
        lookup = self.tasks.index if tables is None else names
        if lookup is not None:
            for s, src in enumerate(kb.source):
                i = lookup.get(src, -1) if src is not None else -1
                j = i if on_cpu else int(np.searchsorted(rows, i))
                own[1 + s] = j if i >= 0 and (on_cpu or (j < len(rows) and rows[j] == i)) else -1
        enter_experts(
            rows if on_cpu else np.arange(len(rows)),
            a["kb_seen"],
            np.array([kb.basis_since, *kb.entered], np.int64) if since is None else since,
            own,
            kb.applied,
            a["L_kb"],
            a["in_kb"],
            a["n_kb"],
            a["L_top"],
            a["in_top"],
            a["n_top"],
            a["stats"][:, S["loss_kb"]],
            a["stats"][:, S["loss"]],
        )
        if not on_cpu:
            for k in keys:
                t[k][idx] = torch.as_tensor(a[k], device=dev)

    def _carry_codes(self, rows: np.ndarray) -> None:
        """Tasks ``rows``' basis codes, learned in an earlier basis, carried into the current one
        (``KnowledgeBase.carried``): a basis refresh never sweeps over every task either."""
        at = self.tasks.cols["code_at"][torch.as_tensor(rows, device=self.device)].cpu().numpy()
        stale = at != self.kb.basis_at
        if stale.any():
            moved = torch.as_tensor(rows[stale], device=self.device)
            self.kb.mu[moved], self.kb.S[moved] = self.kb.carried(moved, at[stale])
            self.tasks.cols["code_at"][moved] = self.kb.basis_at

    def settle(self) -> None:
        """Every task's mixtures hold every KB expert now (reports read every task; events do it task by task)."""
        self._sync_kb(np.arange(self.n_tasks))

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
        return self.counters["tasks_created"] - self.counters["tasks_dropped"]

    # --- resident and stored tasks (``store.py``) ---

    def _columns(self) -> dict[str, torch.Tensor]:
        """Every per-task column (row i: task i's values), in the order of a store's rows."""
        cols = {f"t.{k}": v for k, v in self.tasks.cols.items()}
        cols.update({f"learner.{k}": v for k, v in self.learners.columns().items()})
        cols["code.mu"], cols["code.S"] = self.kb.mu, self.kb.S
        cols["n_labelled"] = torch.from_numpy(self.tasks.counts)
        return cols

    def open_store(self) -> TaskStore:
        """The task store, opened (or made) on first use."""
        if self.store is None:
            path = self.store_dir
            if path is None:
                path = tempfile.mkdtemp(prefix="lifelong-tasks-")
                weakref.finalize(self, shutil.rmtree, path, True)
            self.store = TaskStore(path, self.layout())
        return self.store

    def layout(self) -> wire.Spec:
        """The shape of one task's row in the store."""
        spec = wire.spec_of({k: v[:0] for k, v in self._columns().items()})
        return {k: (dtype, shape[1:]) for k, (dtype, shape) in spec.items()}

    def _admit(self, names: list[str], create: bool = True, evict: bool = True) -> None:
        """Tasks ``names`` are resident after this: those in the store are read back and new ones (with
        ``create``) registered, in arrival order. When that would pass ``max_resident_tasks`` (and ``evict``),
        the least recently used tasks (none of ``names``) go to the store first, and their rows take the tasks
        coming in."""
        index = self.tasks.index
        wanted = dict.fromkeys(names)
        missing = list(itertools.filterfalse(index.__contains__, wanted))
        if not missing or (not create and self.store is None):
            return
        values = self.store.get(missing) if self.store is not None else [None] * len(missing)
        back = [(name, v) for name, v in zip(missing, values, strict=True) if v is not None]
        new = [name for name, v in zip(missing, values, strict=True) if v is None] if create else []
        room = self.cfg.max_tasks - self.n_known
        if len(new) > room:
            raise StateError(f"engine.max_tasks ({self.cfg.max_tasks}) reached; task {new[max(0, room)]!r} refused")
        coming = len(back) + len(new)
        free: list[int] = []
        if evict and self.tiered and coming > self.cfg.max_resident_tasks - self.n_tasks:
            self.tasks.used[self.tasks.rows([n for n in wanted if n in index])] = self.tasks.batch
            free = self._evict(min(coming, coming - (self.cfg.max_resident_tasks - self.n_tasks)))
        first = len(self.tasks)
        rows = self.tasks.add([name for name, _ in back] + new, free)
        self.counters["tasks_created"] += len(new)
        rows_back, rows_new = rows[: len(back)], rows[len(back) :]
        self._init_tasks(first)
        reused = [r for r in rows_new if r < first]
        if reused:
            self._reset(np.array(reused, np.int64))
        if back:
            at = torch.as_tensor(rows_back, device=self.device)
            unpack_rows(self._columns(), at, [v for _, v in back])
            self._away -= self.tasks.cols["stats"][at].sum(0).cpu().numpy()
            self.tasks.stored[rows_back], self.tasks.dirty[rows_back] = True, False
            self.counters["tasks_loaded"] += len(back)

    def _evict(self, k: int) -> list[int]:
        """Write the ``k`` least recently used tasks not used in this batch to the store (those changed since
        they were last written: the others are there as they are); their rows, freed."""
        rows = self.tasks.least_used(k)
        if not len(rows):
            return []
        changed = rows[self.tasks.dirty[rows]]
        if len(changed):
            self._store_rows(changed)
        self._away += self.tasks.cols["stats"][torch.as_tensor(rows, device=self.device)].sum(0).cpu().numpy()
        self.tasks.release(rows)
        self.counters["tasks_evicted"] += len(rows)
        return [int(r) for r in rows]

    def _reset(self, rows: np.ndarray) -> None:
        """Rows freed by ``_evict`` that take new tasks: as ``_init_tasks`` sets up new rows."""
        at = torch.as_tensor(rows, device=self.device)
        for table in self.tasks.cols.values():
            if table.device.type == "cpu":  # numpy's fancy assignment: several times cheaper on small batches
                table.numpy()[rows] = 0
            else:
                table[at] = 0
        self.tasks.start(self.tasks.cols, at, self.kb.basis_at)
        self.learners.reset(at)
        self.kb.mu[at], self.kb.S[at] = self.kb.prior_mu, self.kb.prior_S

    def drop_tasks(self, names: Iterable[str]) -> None:
        """Forget tasks, resident or stored, and their pending predictions (another replica owns them now).
        The last resident rows move into the rows they leave, so resident rows stay ``0 .. n_tasks - 1``."""
        names = set(names)
        store = self.store
        if store is not None:
            stored = [(k, v) for k, v in zip(sorted(names), store.get(sorted(names)), strict=True) if v is not None]
            gone = [k for k, _ in stored if k not in self.tasks.index]
            if gone:  # their statistics leave the stored sum
                stats = {"t.stats": torch.zeros(len(gone), len(STATS), dtype=torch.float64)}
                values = dict(stored)
                unpack_rows(stats, torch.arange(len(gone)), [values[k] for k in gone], store.spec)
                self._away -= stats["t.stats"].sum(0).numpy()
            store.delete([k for k, _ in stored])
            self.counters["tasks_dropped"] += len(gone)
        holes = sorted(self.tasks.index[k] for k in names if k in self.tasks.index)
        self.counters["tasks_dropped"] += len(holes)
        self.pending.drop_tasks(names)
        self.learned_keys.forget(names)
        if not holes:
            return
        src, dst = self.tasks.remove(holes)
        if src:
            src_t, dst_t = (torch.as_tensor(r, device=self.device) for r in (src, dst))
            for key, col in self._columns().items():
                if key != "n_labelled":  # moved with the table's host values
                    col[dst_t.to(col.device)] = col[src_t.to(col.device)]

    def stored_tasks(self, names: list[str]) -> set[str]:
        """Which of ``names`` the task store holds: every known task not resident (and resident ones written
        to it before)."""
        if self.store is None:
            return set()
        return {n for n, v in zip(names, self.store.get(names), strict=True) if v is not None}

    def recall(self) -> None:
        """Every stored task back in memory, whatever ``max_resident_tasks`` (a whole state in one object)."""
        if self.store is not None:
            self._admit([k for k, _ in self.store.items()], create=False, evict=False)

    def task_stats(self) -> np.ndarray:
        """Each resident task's statistics (columns ``STATS``)."""
        return self.tasks.cols["stats"][: self.n_tasks].cpu().numpy()

    def local_weights(self) -> np.ndarray:
        """Each resident task's top-level weight on its own learner (the rest is on the KB level)."""
        n, t = self.n_tasks, self.tasks.cols
        rounds = torch.as_tensor(self.n_labelled, device=self.device) + 1
        return self.top_mix.weights(t["L_top"][:n], t["in_top"][:n], rounds)[:, 0].cpu().numpy()

    def stats_total(self) -> np.ndarray:
        """Every task's statistics (``STATS``), summed: resident and stored tasks."""
        return self.tasks.cols["stats"][: self.n_tasks].sum(0).cpu().numpy() + self._away

    def flush_tasks(self) -> int:
        """Write every resident task changed since it was last written to the store; returns how many."""
        dirty = np.flatnonzero(self.tasks.dirty[: self.n_tasks])
        self.flushed, self._behind = len(dirty) + self._behind, 0
        for rows in np.array_split(dirty, -(-len(dirty) // FLUSH_ROWS)) if len(dirty) else []:  # bounded memory
            self._store_rows(rows)
        return len(dirty)

    def write_behind(self, limit: int) -> int:
        """Write to the store up to ``limit`` changed tasks that no event of the last ``IDLE_BATCHES`` batches
        used, least recently used first (the daemon calls it after each batch): the next ``flush_tasks`` (a
        checkpoint) then finds few to write, and evicting them writes nothing. Returns how many."""
        if self.store is None or limit <= 0:
            return 0
        n = self.n_tasks
        rows = np.flatnonzero(self.tasks.dirty[:n] & (self.tasks.used[:n] <= self.tasks.batch - IDLE_BATCHES))
        if len(rows) > limit:
            rows = rows[np.argpartition(self.tasks.used[rows], limit - 1)[:limit]]
        if len(rows):
            self._store_rows(rows)
            self._behind += len(rows)
        return len(rows)

    def _store_rows(self, rows: np.ndarray) -> None:
        """Write resident tasks ``rows`` to the store, in one write."""
        values = pack_rows(self._columns(), torch.as_tensor(rows, device=self.device))
        names = [self.tasks.names[r] for r in rows.tolist()]
        self.open_store().write(dict(zip(names, values, strict=True)), int((~self.tasks.stored[rows]).sum()))
        self.tasks.stored[rows], self.tasks.dirty[rows] = True, False

    # --- processing ---

    def process(self, events: list[Event]) -> BatchResult:
        """Predict, account and learn a batch of valid events in arrival order."""
        result = BatchResult.empty(events, self.n_pred)
        result.seq0 = self.events_seen
        self.tasks.batch += 1
        start = 0
        while start < len(events):
            room = self.cfg.publish_every - self.events_seen % self.cfg.publish_every
            stop = min(len(events), start + room)
            self._segment(events, start, stop, result)
            self.events_seen += stop - start
            if self.events_seen % self.cfg.publish_every == 0:
                self._publish()
            start = stop
        return result

    def _plan(self, events: list[Event], start: int, stop: int, result: BatchResult) -> _Plan:
        """Arrival-order bookkeeping: each event's task and outcome, pending labels and their TTL, the
        duplicate window (``_sort_out``), then each task's labelled counts and the snapshot triggers."""
        self._admit([e.task for e in events[start:stop]])  # every task of the segment has a row from here on
        outcome, tasks, ref = self._sort_out(events, start, stop, result)
        self.learned_keys.expire(self.now_ts - self.labels.pending_ttl_s)
        labelled = (outcome == LEARNED) | (outcome == LABEL_JOINED)
        uniq, inv = np.unique(tasks, return_inverse=True)
        self.tasks.used[uniq], self.tasks.dirty[uniq] = self.tasks.batch, True
        self._sync_kb(uniq)
        self._carry_codes(uniq)
        n_before, trigger = np.empty(len(tasks), np.int64), np.empty(len(tasks), np.bool_)
        at = np.array(self.cfg.snapshot_at, np.int64)
        _count(tasks, labelled, outcome == CONTROL, self.tasks.counts, self.cfg.snapshot_every, at, n_before, trigger)
        result.outcome[start:stop] = outcome
        result.task_index[start:stop] = tasks
        return _Plan(ref, n_before, inv, uniq, trigger)

    def _sort_out(
        self, events: list[Event], start: int, stop: int, result: BatchResult
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each event's outcome, task and the row of the prediction a label joins (-1: none, or stored earlier),
        in arrival order: pending predictions expire by count and TTL, labels join them, duplicates are spotted.

        A plain Python loop over plain Python lists: it runs once per event; the common case takes a shorter
        road with the same result (``_plain``).
        """
        n = stop - start
        evs = events[start:stop]
        index, learned, now = self.tasks.index, self.learned_keys, self.now_ts
        if not self.pending.keys:
            plain = self._plain(evs)
            if plain is not None:
                return plain
        ref, outcome, tasks = [-1] * n, [0] * n, [0] * n
        ttl, cap = self.labels.pending_ttl_s, self.labels.pending_max
        pending = self.pending.keys
        seg0 = result.seq0 + start
        for j, e in enumerate(evs):
            if e.ts is not None and e.ts > now:
                now = e.ts
            while pending:  # the oldest entries expire first; arrival order, so independent of batching
                key, (_, ts) = next(iter(pending.items()))
                if ts >= now - ttl:
                    break
                self._drop_pending(key)
            tasks[j] = index[e.task]
            if e.control is not None:
                outcome[j] = CONTROL
                self.counters["controls"] += 1
            elif e.x is None:
                key = (e.task, e.id or "")
                entry = pending.pop(key, None)
                if entry is None:
                    if key in learned and learned[key] >= now - ttl:
                        outcome[j] = DUPLICATE
                        self.counters["duplicates"] += 1
                    else:
                        outcome[j] = LABEL_UNMATCHED
                        self.counters["label_unmatched"] += 1
                    continue
                outcome[j] = LABEL_JOINED
                learned.add([key], [now], cap)
                result.label_delay[start + j] = now - entry[1]
                if entry[0] >= seg0:
                    ref[j] = entry[0] - seg0
            elif e.y is None:
                outcome[j] = PREDICTED
                key = (e.task, e.id or "")
                if pending.pop(key, None) is not None:
                    self.counters["pending_replaced"] += 1
                self.pending.stored.pop(key, None)
                pending[key] = (seg0 + j, e.ts if e.ts is not None else now)
                while len(pending) > cap:
                    self._drop_pending(next(iter(pending)))
            else:
                if e.id is not None:  # a later delivery of the same (task, id) is a duplicate
                    key = (e.task, e.id)
                    if key in learned and learned[key] >= now - ttl:
                        outcome[j] = DUPLICATE
                        self.counters["duplicates"] += 1
                        continue
                    learned.add([key], [now], cap)
                outcome[j] = LEARNED
        self.now_ts = now
        return np.array(outcome, np.int8), np.array(tasks, np.int64), np.array(ref, np.int64)

    def _plain(self, evs: list[Event]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``_sort_out`` for a segment of labelled events with ids and controls only, when no prediction is
        pending and no (task, id) was seen within the window (else None): the common case, in a few passes."""
        keys = typing.cast(list[tuple[str, str]], [(e.task, e.id) for e in evs])  # ids checked below
        control = [e.control is not None for e in evs]
        if any(control):
            with_label = (e.x is not None and e.y is not None and e.id is not None for e in evs)
            if not all(c or ok for c, ok in zip(control, with_label, strict=True)):
                return None
            learned = [k for k, c in zip(keys, control, strict=True) if not c]
        elif all(e.x is not None and e.y is not None and e.id is not None for e in evs):
            learned = keys
        else:
            return None
        window = self.learned_keys
        if len(set(learned)) < len(learned) or not window.keys().isdisjoint(learned):
            return None
        tasks = self.tasks.rows([k[0] for k in keys])
        ts = [e.ts for e in evs]
        if None in ts:
            ts = [-math.inf if v is None else v for v in ts]
        nows = np.maximum.accumulate(np.maximum(np.array(ts, np.float64), self.now_ts))
        outcome = np.full(len(evs), LEARNED, np.int8)
        if learned is keys:
            window.add(keys, nows.tolist(), self.labels.pending_max, new=True)
        else:
            at = np.array(control)
            outcome[at] = CONTROL
            self.counters["controls"] += int(at.sum())
            window.add(learned, nows[~at].tolist(), self.labels.pending_max, new=True)
        self.now_ts = float(nows[-1])
        return outcome, tasks, np.full(len(evs), -1, np.int64)

    def _drop_pending(self, key: tuple[str, str]) -> None:
        self.pending.drop(key)
        self.counters["label_expired"] += 1

    def _segment(self, events: list[Event], start: int, stop: int, result: BatchResult) -> None:
        """The sequential part (each task's learner and basis code: compiled or in waves), then both mixtures
        (compiled event by event, or as per-task cumulative sums over the segment: the KB is fixed within it)."""
        plan = self._plan(events, start, stop, result)
        n, dev, evs = stop - start, self.device, events[start:stop]
        outcome = result.outcome[start:stop]
        tasks = result.task_index[start:stop]
        has_x = (outcome == PREDICTED) | (outcome == LEARNED)
        joined = outcome == LABEL_JOINED
        labelled = (outcome == LEARNED) | joined
        x_np = np.zeros((n, self.cfg.dim), np.float64)
        rows_x = np.flatnonzero(has_x)
        if len(rows_x):
            # concatenate + reshape: several times faster than np.stack on many small arrays
            x_np[rows_x] = self._scaled(
                np.concatenate([e.x for e in evs] if len(rows_x) == n else [evs[j].x for j in rows_x.tolist()]).reshape(
                    len(rows_x), -1
                ),
                plan.touched,
                plan.group[rows_x],
            )
        y_np = np.array([0 if e.y is None else e.y for e in evs], np.float64)
        same = joined & (plan.ref >= 0)
        x_np[same] = x_np[plan.ref[same]]
        x = torch.as_tensor(x_np, dtype=self.dtype, device=dev)
        stored_rows = np.flatnonzero(joined & (plan.ref < 0))
        stored = [self.pending.stored.pop((events[start + j].task, events[start + j].id or "")) for j in stored_rows]
        if stored:
            x[torch.as_tensor(stored_rows, device=dev)] = torch.stack([en.x for en in stored])
        y = torch.as_tensor(y_np, dtype=self.dtype if self.cfg.task == "regression" else torch.long, device=dev)
        idx = torch.as_tensor(tasks, device=dev)

        x1 = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        z = x1 @ self.kb.B
        seq0 = result.seq0 + start
        if self.compiled:
            raw_local, raw_basis = self._compiled(plan, tasks, labelled, x1, y, z, seq0)
        else:
            raw_local, raw_basis = self._waves(plan, tasks, labelled, x1, y, z, idx, seq0)
        p_local, p_basis = self._guard(plan.touched, self.learners.finish(raw_local), self.kb.finish_basis(raw_basis))
        self._mix(events, start, plan, result, x, y, idx, p_local, p_basis, stored, stored_rows)
        if self.population is not None and labelled.any():
            rows = torch.as_tensor(np.flatnonzero(labelled), device=dev)
            self.population.sequence(
                np.zeros(len(rows), np.int64),
                x1[rows].cpu(),
                y[rows].cpu().numpy(),
                np.ones(len(rows), bool),
                np.full(len(rows), -1, np.int64),
            )
            self.population_n += len(rows)
        result.segment[start:stop] = len(result.kb_names)
        result.kb_names.append(["basis"] + [m or "" for m in self.kb.ids])

    def _scaled(self, x: np.ndarray, tasks: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows of ``x`` (float64, arrival order; row i of task ``tasks[rows[i]]``) bounded per task
        (``features.py``); their tasks' peaks advance."""
        u = torch.as_tensor(tasks, device=self.device)
        peak = self.tasks.cols["peak"][u].cpu().numpy()
        features.scale(peak, rows, x)
        self.tasks.cols["peak"][u] = torch.as_tensor(peak, device=self.device)
        return x

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

    def _waves(
        self,
        plan: _Plan,
        tasks: np.ndarray,
        labelled: np.ndarray,
        x1: torch.Tensor,
        y: torch.Tensor,
        z: torch.Tensor,
        idx: torch.Tensor,
        seq0: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequential part in waves: wave k holds the k-th event of each task. Rows are sorted by (wave,
        labelled), so that every call takes contiguous slices. Returns raw local and basis outputs."""
        n, dev = len(tasks), self.device
        # wave k: the k-th row of its task in the segment
        by_task = np.argsort(tasks, kind="stable")
        ranked = tasks[by_task]
        first = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        wave = np.empty(n, np.int64)
        wave[by_task] = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))
        key = wave * 2 + labelled
        order = np.argsort(key, kind="stable")
        perm = torch.as_tensor(order, device=dev)
        idx_p, x1_p, z_p, y_p = idx[perm], x1[perm], z[perm], y[perm]
        raw_local, raw_basis = [], []
        cuts = [0, *(np.flatnonzero(np.diff(key[order])) + 1).tolist(), n]
        # KB snapshots are taken right after the group holding their trigger has learned.
        triggers: dict[int, list[int]] = {}
        for pos in np.flatnonzero(plan.trigger[order]).tolist():
            triggers.setdefault(int(np.searchsorted(cuts, pos, side="right")) - 1, []).append(int(order[pos]))
        is_labelled = labelled[order[cuts[:-1]]].tolist()
        for group, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            gy = y_p[a:b] if is_labelled[group] else None
            raw_local.append(self.learners.forward(idx_p[a:b], x1_p[a:b], gy))
            raw_basis.append(self.kb.forward_basis(idx_p[a:b], z_p[a:b], gy))
            for j in triggers.get(group, ()):
                store = self.learners.new_store(1)
                self.learners.write_member(store, 0, int(tasks[j]))
                self._stage(int(tasks[j]), int(plan.n_before[j] + labelled[j]), seq0 + j, store)
        out_local, out_basis = torch.cat(raw_local), torch.cat(raw_basis)
        local, basis = torch.empty_like(out_local), torch.empty_like(out_basis)
        local[perm], basis[perm] = out_local, out_basis
        return local, basis

    def _compiled(
        self,
        plan: _Plan,
        tasks: np.ndarray,
        labelled: np.ndarray,
        x1: torch.Tensor,
        y: torch.Tensor,
        z: torch.Tensor,
        seq0: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequential part event by event in arrival order, compiled (CPU, EKF learners): the same steps
        as the waves without their per-wave cost."""
        # A segment ends at most in one publication, which keeps each task's latest snapshot (``_publish``):
        # snapshot only each task's last trigger here, ordered by its first.
        spans: dict[int, tuple[int, int]] = {}
        for j in np.flatnonzero(plan.trigger).tolist():
            spans[int(tasks[j])] = (spans.get(int(tasks[j]), (j, j))[0], j)
        snap_row = np.full(len(tasks), -1, np.int64)
        for row, (_, last) in enumerate(spans.values()):
            snap_row[last] = row
        y_np = y.numpy()
        raw_local, snaps = self.learners.sequence(tasks, x1, y_np, labelled, snap_row)
        raw_basis = self.kb.sequence_basis(tasks, z, y_np, labelled)
        stores = self.learners.members_from_ekf(snaps[: len(spans)])
        for store, (task, (first, last)) in zip(stores, spans.items(), strict=True):
            self._stage(task, int(plan.n_before[last] + labelled[last]), seq0 + first, store)
        return raw_local, raw_basis

    def _mix(
        self,
        events: list[Event],
        start: int,
        plan: _Plan,
        result: BatchResult,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        p_local: torch.Tensor,
        p_basis: torch.Tensor,
        stored: list[_Pending],
        stored_rows: np.ndarray,
    ) -> None:
        """Both mixtures of a segment (compiled event by event, or in torch for the whole segment at once)
        into ``result``, then the statistics and the pending predictions."""
        dev, n = self.device, len(plan.ref)
        rows = slice(start, start + n)
        outcome = result.outcome[rows]
        has_x = (outcome == PREDICTED) | (outcome == LEARNED)
        lab = (outcome == LEARNED) | (outcome == LABEL_JOINED)
        # Which row's predictions each labelled row is scored on: itself, the earlier row it labels, or -1
        # for a prediction stored in an earlier segment.
        src = np.where(plan.ref >= 0, plan.ref, np.arange(n))
        src[stored_rows] = -1
        kb_x = self._kb_experts(p_basis, x)
        s_kb = torch.zeros((0, *kb_x.shape[1:]), dtype=torch.float64, device=dev)
        s_top, s_pred = s_kb[:, :2], s_kb[:, 0]
        if stored:
            s_kb = torch.stack([en.kb_experts for en in stored]).double()
            s_top = torch.stack([en.top for en in stored]).double()
            s_pred = torch.stack([en.pred for en in stored]).double()
            stale = torch.stack([en.versions for en in stored]) != self.kb_version
            # A slot refilled since that prediction is another expert: it slept, so it "predicted" the mixture.
            s_kb = torch.where(stale.unsqueeze(-1), s_top[:, 1:2].expand_as(s_kb), s_kb)
        inputs = _Inputs(has_x, lab, src, y, idx, p_local.double(), kb_x, s_kb, s_top, s_pred)
        (self._mix_events if self.compiled else self._mix_torch)(plan, inputs, result, rows)
        result.model_version[rows][has_x] = plan.n_before[has_x]
        self.counters["learned"] += int(lab.sum())
        self.counters["predicted"] += int(has_x.sum())
        for j in np.flatnonzero(outcome == PREDICTED).tolist():
            e = events[start + j]
            key = (e.task, e.id or "")
            if key in self.pending.keys:
                i = start + j
                self.pending.stored[key] = _Pending(
                    x[j].clone(),
                    kb_x[j].to(self.dtype),
                    torch.as_tensor(np.stack([result.p_local[i], result.p_kb[i]]), device=dev),
                    torch.as_tensor(result.pred[i], device=dev),
                    self.kb_version.clone(),
                )

    def _mix_events(self, plan: _Plan, m: _Inputs, result: BatchResult, rows: slice) -> None:
        """``_mix_torch``, event by event in compiled code (CPU), written straight into ``result``."""
        t = self.tasks.cols
        stored = np.full(len(m.src), -1, np.int64)
        stored[m.src < 0] = np.arange(int((m.src < 0).sum()))
        prior = self._kb_log_prior()
        k = min(KB_TOP, self.n_experts)
        mix_events(
            m.idx.numpy(),
            plan.group,
            m.has_x,
            m.lab,
            m.src,
            plan.n_before,
            m.y.double().numpy(),
            m.p_local.numpy(),
            m.kb_x.numpy(),
            stored,
            m.s_kb.numpy(),
            m.s_top.numpy(),
            m.s_pred.numpy(),
            t["L_kb"].numpy(),
            t["in_kb"].numpy(),
            t["L_top"].numpy(),
            t["in_top"].numpy(),
            t["stats"].numpy(),
            np.zeros(self.n_experts) if prior is None else prior.numpy(),
            LOSS_CODES[self.kb_mix.loss_name],
            self.cfg.task == "regression",
            self.kb_mix.fixed_eta or 0.0,
            float(self.kb_mix.hedge_m),
            *self.cfg.target_range,
            EARLY_N,
            result.p_local[rows],
            result.p_kb[rows],
            result.pred[rows],
            result.w_local[rows],
            result.kb_slots[rows, :k],
            result.kb_weights[rows, :k],
            result.errors[rows],
            result.losses[rows],
        )

    def _mix_torch(self, plan: _Plan, m: _Inputs, result: BatchResult, rows: slice) -> None:
        """The mixtures of a whole segment in torch: the KB is fixed within a segment, so given the experts'
        predictions, the weights are per-task cumulative sums (what CUDA runs)."""
        dev, t, n = self.device, self.tasks.cols, len(m.src)
        lab_np, src_np, y, idx, kb_x = m.lab, m.src, m.y, m.idx, m.kb_x
        lab = torch.as_tensor(lab_np, device=dev)
        n_before = torch.as_tensor(plan.n_before, device=dev)
        st_rows = torch.as_tensor(np.flatnonzero(src_np < 0), dtype=torch.long, device=dev)
        src = torch.as_tensor(np.where(src_np < 0, np.arange(n), src_np), device=dev)
        lab_kb_x = kb_x[src]
        lab_kb_x[st_rows] = m.s_kb
        y_col = y.unsqueeze(-1)
        in_kb = t["in_kb"][idx]
        c_kb = torch.where(lab.unsqueeze(-1) & in_kb, self.kb_mix.loss(lab_kb_x, y_col), 0.0)
        round_n = n_before + 1
        earlier = _EarlierSum(idx)
        in_top = t["in_top"][idx]
        w_kb, top = self._kb_level(kb_x, t["L_kb"][idx] + earlier(c_kb), in_kb, in_top, round_n, m.p_local)
        lab_top = top[src]
        lab_top[st_rows] = m.s_top
        c_top = torch.where(lab.unsqueeze(-1), self.top_mix.loss(lab_top, y_col), 0.0)
        w_top, pred = self._top_level(top, t["L_top"][idx] + earlier(c_top), in_top, round_n)
        three = torch.cat([pred.unsqueeze(1), top], dim=1)[src]
        three[st_rows] = torch.cat([m.s_pred.unsqueeze(1), m.s_top], dim=1)
        three[st_rows, 2] = torch.where(in_top[st_rows, 1:2], three[st_rows, 2], three[st_rows, 0])
        li = torch.as_tensor(np.flatnonzero(lab_np), device=dev)
        if len(li):
            ti = idx[li]
            loss3 = self.top_mix.loss(three[li], y_col[li])
            err3 = self._errors(three[li], y[li])
            early = (n_before[li] < EARLY_N).double().unsqueeze(-1)
            t["L_kb"].index_add_(0, ti, c_kb[li])
            t["L_top"].index_add_(0, ti, c_top[li])
            t["stats"].index_add_(0, ti, torch.cat([loss3, err3, err3[:, :2] * early, early], dim=1))
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

    def _kb_experts(self, p_basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Predictions ``[n, 1 + capacity, P]`` of the KB experts: the basis expert, then every slot."""
        out = torch.empty((len(x), self.n_experts, self.n_pred), dtype=torch.float64, device=self.device)
        out[:, 0] = p_basis
        self.learners.member_predict(self.kb.store, x, out[:, 1:])
        return out

    def _kb_level(
        self,
        kb_x: torch.Tensor,
        loss_kb: torch.Tensor,
        in_kb: torch.Tensor,
        in_top: torch.Tensor,
        rounds: torch.Tensor,
        p_local: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The KB level's weights, and the two levels ``[n, 2, P]`` (local, KB) the top level mixes."""
        w_kb = torch.nan_to_num(self.kb_mix.weights(loss_kb, in_kb, rounds, self._kb_log_prior()))
        p_kb = torch.where(in_top[:, 1:2], mix(w_kb, kb_x), p_local)  # finite stand-in; weight 0 until the KB joins
        return w_kb, torch.stack([p_local, p_kb], dim=1)

    def _kb_log_prior(self) -> torch.Tensor | None:
        """Each KB expert's log prior weight (``SHARED_PRIOR`` for the shared experts, 0 for members); None
        (uniform) for anytime Hedge, whose bound assumes it."""
        if self.kb_mix.fixed_eta is None:
            return None
        prior = torch.zeros(self.n_experts, dtype=torch.float64, device=self.device)
        prior[0] = SHARED_PRIOR
        if (slot := self.kb.slot_of.get(POPULATION)) is not None:
            prior[1 + slot] = SHARED_PRIOR
        return prior

    def _top_level(
        self,
        top: torch.Tensor,
        loss_top: torch.Tensor,
        in_top: torch.Tensor,
        rounds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top level's weights and the combined prediction; a sleeping KB level then "predicts" it."""
        w_top = self.top_mix.weights(loss_top, in_top, rounds)
        pred = mix(w_top, top)
        top[:, 1] = torch.where(in_top[:, 1:2], top[:, 1], pred)
        return w_top, pred

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
        self._admit(names, create=False)
        t = self.tasks.cols
        new = {
            name: self.n_tasks + k
            for k, name in enumerate(dict.fromkeys(n for n in names if n not in self.tasks.index))
        }
        index = np.array([self.tasks.index.get(name, new.get(name, -1)) for name in names], np.int64)
        known = index < self.n_tasks
        kt = torch.as_tensor(index[known], device=dev)
        peak = np.zeros((len(rows), self.cfg.dim))
        peak[known] = t["peak"][kt].cpu().numpy()
        x_np = features.peek(peak, np.stack([typing.cast(np.ndarray, events[j].x) for j in rows.tolist()]))
        x = torch.as_tensor(x_np, dtype=self.dtype, device=dev)
        x1 = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        z = x1 @ self.kb.B
        kn = torch.as_tensor(known, device=dev)
        raw_local = _by_rows(
            known, lambda: self.learners.forward(kt, x1[kn]), lambda: self.learners.forward_new(index[~known], x1[~kn])
        )
        codes = self.kb.carried(kt, t["code_at"][kt].cpu().numpy())  # as the tasks' next event would carry them
        raw_basis = _by_rows(
            known,
            lambda: self.kb.forward_basis(torch.arange(len(kt), device=dev), z[kn], codes=codes),
            lambda: self.kb.forward_basis_new(z[~kn]),
        )
        p_local = self.learners.safe(self.learners.finish(raw_local)).double()
        p_basis = self.learners.safe(self.kb.finish_basis(raw_basis))
        fresh = self.tasks.empty(int((~known).sum()))
        self.tasks.start(fresh, slice(None), self.kb.basis_at)
        tables = {k: torch.empty((len(rows), *v.shape[1:]), dtype=v.dtype, device=dev) for k, v in fresh.items()}
        for k, v in tables.items():
            v[kn], v[~kn] = t[k][kt], fresh[k]
        # with the KB experts they would meet at their next event (a task's own member left out), one row per task
        first: dict[str, int] = {}
        for j, name in enumerate(names):
            first.setdefault(name, j)
        self._sync_kb(np.array(sorted(first.values()), np.int64), tables, names=first)
        same = torch.as_tensor([first[name] for name in names], device=dev)
        tables = {k: v[same] for k, v in tables.items()}
        rounds = (
            torch.as_tensor([self.n_labelled[i] if i < self.n_tasks else 0 for i in index.tolist()], device=dev) + 1
        )
        kb_x = self._kb_experts(p_basis, x)
        w_kb, top = self._kb_level(kb_x, tables["L_kb"], tables["in_kb"], tables["in_top"], rounds, p_local)
        w_top, pred = self._top_level(top, tables["L_top"], tables["in_top"], rounds)
        result.outcome[rows] = PREDICTED
        result.task_index[rows] = index
        result.pred[rows] = pred.cpu().numpy()
        result.p_local[rows] = top[:, 0].cpu().numpy()
        result.p_kb[rows] = top[:, 1].cpu().numpy()
        result.w_local[rows] = w_top[:, 0].cpu().numpy()
        result.model_version[rows] = rounds.cpu().numpy() - 1
        top_k = min(KB_TOP, w_kb.shape[1])
        tw, ts = torch.topk(w_kb, top_k, dim=1)
        result.kb_slots[rows, :top_k] = ts.cpu().numpy()
        result.kb_weights[rows, :top_k] = tw.cpu().numpy()
        result.kb_names.append(["basis"] + [m or "" for m in self.kb.ids])
        return result

    def _errors(self, preds: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cfg.task == "regression":
            return (preds[..., 0].double() - y.double().unsqueeze(-1)) ** 2
        return (preds.argmax(-1) != y.unsqueeze(-1)).double()

    # --- knowledge base ---

    def _stage(self, task: int, learned: int, seq: int, store: Any) -> None:
        """Stage a snapshot (a one-slot member store) of ``task`` taken right after its trigger."""
        if learned == 0:
            return
        self.staged.append(Staged(task, self.tasks.names[task], learned, seq, store))
        self.counters["snapshots"] += 1

    def _publish(self) -> None:
        if self.population is not None and self.population_n:
            mu = self.population.params["mu"][0]
            self.learners.prior_mu = mu.to(self.device, copy=True)
            self.staged.append(
                Staged(
                    -1,
                    POPULATION,
                    self.population_n,
                    self.events_seen,
                    self.learners.members_from_ekf(mu.numpy().copy()[None])[0],
                )
            )
        if not self.staged:
            return
        # Each task's latest snapshot, in the order of the tasks' first triggers (arrival order, whatever the
        # batching): an earlier snapshot of the same task would be replaced in its slot anyway.
        latest: dict[str, Staged] = {}  # by name: a task's row may hold another task by now (``_evict``)
        for st in sorted(self.staged, key=lambda st: st.seq):
            first = latest.get(st.task_name)
            latest[st.task_name] = (
                st if first is None else Staged(st.task, st.task_name, st.learned, first.seq, st.store)
            )
        self.staged = []
        snaps = list(latest.values())
        vectors = self.learners.member_vectors([st.store for st in snaps])
        if vectors.shape[1]:  # a snapshot taken while its task was non-finite (reset since) never publishes
            finite = torch.isfinite(vectors).all(1).tolist()
            self.counters["snapshots_not_finite"] += finite.count(False)
            latest = {st.task_name: st for st, ok in zip(snaps, finite, strict=True) if ok}
        if self.share:  # the daemon sends them to the knowledge log; they join when read back from it
            self.outbox.extend(latest.values())
        else:
            self.apply(list(latest.values()))

    def apply(self, members: list[Staged]) -> None:
        """Members join the KB in this order (between batches); new experts join each task's mixture when
        the task next meets the KB (``_sync_kb``)."""
        if not members:
            return
        slots = self.kb.publish(members)
        if slots:  # pending predictions' experts in these slots slept (``_mix``); tasks meet them in ``_sync_kb``
            self.kb_version[torch.tensor(slots, dtype=torch.long, device=self.device) + 1] += 1
        self.learners.prior_S = self.kb.task_S

    def _rounds(self) -> torch.Tensor:
        return torch.as_tensor(self.n_labelled, device=self.device) + 1

    # --- reporting ---

    def regrets(self) -> dict[str, np.ndarray]:
        """Per resident task: regret of the combined predictor vs the better level, of the KB vs its best
        expert, and the bound of each."""
        self.settle()
        return self._regrets(self.tasks.view(), self.n_labelled)

    def _regrets(self, t: dict[str, torch.Tensor], counts: np.ndarray) -> dict[str, np.ndarray]:
        n = len(counts)
        st = t["stats"][:n]
        best_level = torch.where(t["in_top"][:n], t["L_top"][:n], math.inf).min(1).values
        top = (st[:, S["loss"]] - best_level).cpu().numpy()
        best_kb = torch.where(t["in_kb"][:n], t["L_kb"][:n], math.inf).min(1).values
        kb = torch.where(torch.isfinite(best_kb), st[:, S["loss_kb"]] - best_kb, 0.0).cpu().numpy()
        counts = np.array(counts, np.int64)
        top_bound = self.top_mix.bounds(counts, t["n_top"][:n].cpu().numpy())
        n_kb = t["n_kb"][:n].cpu().numpy()
        prior = self._kb_log_prior()
        mass = None
        if prior is not None:  # the shared experts that took part weigh e^SHARED_PRIOR instead of 1
            shared = (t["in_kb"][:n] & (prior > 0)).sum(1).cpu().numpy()
            mass = n_kb + shared * (math.exp(SHARED_PRIOR) - 1.0)
        kb_bound = self.kb_mix.bounds(counts, n_kb, mass)
        return {"top": top, "top_bound": top_bound, "kb": kb, "kb_bound": kb_bound}

    def _every_task(self) -> tuple[list[str], dict[str, torch.Tensor], np.ndarray]:
        """Every task's name, mixture tables (each task met the KB as it is now) and labelled count: the
        resident tasks, then the others from the store (for reports, not the event path)."""
        self.settle()
        names = list(self.tasks.names)
        tables, counts = self.tasks.view(), self.n_labelled
        store = self.store
        stored = [] if store is None else [(k, v) for k, v in store.items() if k not in self.tasks.index]
        if store is not None and stored:
            m, dev = len(stored), self.device
            cols = {f"t.{k}": v.new_zeros((m, *v.shape[1:])) for k, v in self.tasks.cols.items()}
            cols["n_labelled"] = torch.zeros(m, dtype=torch.long)
            unpack_rows(cols, torch.arange(m, device=dev), [v for _, v in stored], store.spec)
            tables_m = {k[2:]: v for k, v in cols.items() if k.startswith("t.")}
            self._sync_kb(np.arange(m), tables_m, names={k: j for j, (k, _) in enumerate(stored)})
            names += [k for k, _ in stored]
            tables = {k: torch.cat([v, cols[f"t.{k}"]]) for k, v in tables.items()}
            counts = np.concatenate([counts, cols["n_labelled"].numpy()])
        return names, tables, counts

    def report(self) -> dict[str, Any]:
        """Cumulative figures per method and per task, every task (the core of ``lifelong evaluate``'s report)."""
        names, t, counts = self._every_task()
        n = len(names)
        st = t["stats"].cpu().numpy()
        total = max(1, int(counts.sum()))
        reg = self._regrets(t, counts)

        def method(err: str, loss: str) -> dict[str, float]:
            return {
                "cumulative_error": float(st[:, S[err]].sum() / total),
                "cumulative_log_loss": float(st[:, S[loss]].sum() / total),
            }

        tasks = {}
        for i, name in enumerate(names):
            c = max(1, int(counts[i]))
            tasks[name] = {
                "events": int(counts[i]),
                "cumulative_error": float(st[i, S["errors"]] / c),
                "cumulative_error_local": float(st[i, S["errors_local"]] / c),
                "regret": float(reg["top"][i]),
                "regret_bound": float(reg["top_bound"][i]),
                "kb_regret": float(reg["kb"][i]),
                "kb_regret_bound": float(reg["kb_bound"][i]),
            }
        early_n = max(1.0, float(st[:, S["early_n"]].sum()))
        i_top = int(np.argmax(reg["top"] - reg["top_bound"])) if n else 0
        i_kb = int(np.argmax(reg["kb"] - reg["kb_bound"])) if n else 0
        return {
            "labelled": int(counts.sum()),
            "methods": {
                "lifelong": method("errors", "loss"),
                "local": method("errors_local", "loss_local"),
                "kb_only": method("errors_kb", "loss_kb"),
            },
            "regret": {
                "top_level_max": float(reg["top"][i_top]) if n else 0.0,
                "top_level_bound": float(reg["top_bound"][i_top]) if n else 0.0,
                "kb_max": float(reg["kb"][i_kb]) if n else 0.0,
                "kb_bound": float(reg["kb_bound"][i_kb]) if n else 0.0,
                "top_level_total": float(reg["top"].sum()),
                "kb_total": float(reg["kb"].sum()),
            },
            "early": {
                "first_n": EARLY_N,
                "lifelong": float(st[:, S["early_errors"]].sum() / early_n),
                "local": float(st[:, S["early_errors_local"]].sum() / early_n),
            },
            "kb": {"size": self.kb.size, "capacity": self.kb.capacity, **self.kb.counts},
            "counters": dict(self.counters),
            "tasks": tasks,
        }

    # --- state ---

    def state(self, tasks: bool = True, detach: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """All state as tensors plus JSON metadata; ``load_state`` of the pair restores it exactly. Every task
        is in it (stored tasks are read back into memory first); without ``tasks``, none: the global state
        that goes with a snapshot of the task store (``flush_tasks``, ``TaskStore.snapshot``). ``detach``: none
        of it is shared with the engine (tensors copied): the caller may go on processing while another thread
        writes the pair."""
        if tasks:
            self.recall()
        n = self.n_tasks if tasks else 0
        tensors: dict[str, Any] = {f"task.{k}": v[:n].cpu() for k, v in self.tasks.cols.items()}
        tensors["task.n_labelled"] = torch.from_numpy(self.n_labelled[:n].copy())
        tensors.update({f"learner.{k}": v if tasks else v[:0] for k, v in self.learners.state().items()})
        tensors.update(self.kb.state())
        tensors["kb.mu"], tensors["kb.S"] = tensors["kb.mu"][:n], tensors["kb.S"][:n]
        tensors["kb_version"] = self.kb_version.cpu()
        if self.population is not None:
            tensors.update({f"population.{k}": v for k, v in self.population.state().items()})
            if self.learners.prior_mu is not None:
                tensors["population.prior_mu"] = self.learners.prior_mu.cpu()
        pending, pending_keys = self.pending.state()
        tensors.update(pending)
        window, times = self.learned_keys.encoded()  # copies of what was encoded as it was learned
        tensors["window.times"] = torch.from_numpy(times)
        for i, st in enumerate(self.staged):
            for k, v in self.learners.store_state(st.store).items():
                tensors[f"staged.{i}.{k}"] = v
        meta = {
            "version": 1,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.cfg.__dict__.items()},
            "task_names": self.tasks.names[:n],
            "events_seen": self.events_seen,
            "now_ts": self.now_ts,
            "counters": dict(self.counters),
            "kb": copy.deepcopy(self.kb.meta()),
            # up to labels.pending_max entries each: one JSON string, not a list of lists (pickled object by object)
            "pending": pending_keys,
            "window": window,  # the duplicate window's keys (``_Window.encoded``)
            "staged": [[s.task, s.task_name, s.learned, s.seq] for s in self.staged],
            "population_n": self.population_n,
            # without tasks, every task is in the store when this state is loaded
            "stats_away": self.stats_total().tolist() if not tasks else [0.0] * len(STATS),
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
        self.kb_version = tensors["kb_version"].to(dev)
        if self.population is not None and "population.param.mu" in tensors:
            self.population.load_state(
                {
                    k.removeprefix("population."): v
                    for k, v in tensors.items()
                    if k.startswith("population.") and k != "population.prior_mu"
                }
            )
            self.population_n = int(meta.get("population_n", 0))
            if "population.prior_mu" in tensors:
                self.learners.prior_mu = tensors["population.prior_mu"].to(dev)
        self.pending.load_state(tensors, meta["pending"], dev)
        self.staged = []
        for i, (task, name, learned, seq) in enumerate(meta["staged"]):
            prefix = f"staged.{i}."
            store = self.learners.load_store({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            self.staged.append(Staged(int(task), name, int(learned), int(seq), store))
        self._away = np.array(meta.get("stats_away", [0.0] * len(STATS)), np.float64)
        self.events_seen = int(meta["events_seen"])
        self.now_ts = float(meta["now_ts"])
        self.counters = {**dict.fromkeys(COUNTERS, 0), **meta["counters"]}
        if "window" in meta:
            self.learned_keys = _Window.decoded(meta["window"], tensors["window.times"].numpy())
        else:  # an earlier version's checkpoint: rows [[task, id], time] or [task, id, time]
            self.learned_keys = _Window(
                ((r[0][0], r[0][1]), float(r[1])) if len(r) == 2 else ((r[0], r[1]), float(r[2]))
                for r in _listed(meta.get("learned_keys", []))
            )

    # --- moving tasks between replicas (the changelog) ---

    def export_task(self, name: str, extra: dict[str, Any]) -> bytes:
        """Task ``name``'s whole state (learner, basis code, mixture tables) as a changelog record."""
        return self.export_tasks([name], [extra])[0]

    def export_tasks(self, names: list[str], extras: list[dict[str, Any]]) -> list[bytes]:
        """``export_task`` of each of ``names``."""
        return [record for records in pack_tasks(self.take_tasks(names, extras)) for record in records]

    def take_tasks(self, names: list[str], extras: list[dict[str, Any]]) -> list[tuple[list[Any], dict[str, Any]]]:
        """What ``export_tasks`` packs, copied (``pack_tasks`` may pack it while the engine goes on): rows
        gathered a chunk at a time (one read per table). Stored tasks come back into memory for it, a chunk at a
        time."""
        out: list[tuple[list[Any], dict[str, Any]]] = []
        step = max(1, min(FLUSH_ROWS, self.cfg.max_resident_tasks // 2))
        updated = torch.tensor(self.kb.updated, dtype=torch.long)
        for a in range(0, len(names), step):
            chunk = names[a : a + step]
            self.tasks.batch += 1  # a tick of its own: only this chunk's tasks are kept from eviction
            self._admit(chunk, create=False)
            rows = self.tasks.rows(chunk)
            self._sync_kb(rows)
            self._carry_codes(rows)
            at = torch.as_tensor(rows, device=self.device)
            tables = {f"learner.{k}": v for k, v in self.learners.columns().items()}
            tables["code.mu"], tables["code.S"] = self.kb.mu, self.kb.S
            tables.update({f"t.{k}": v for k, v in self.tasks.cols.items() if k not in LOCAL})
            got: dict[str, torch.Tensor] = {k: v[at].cpu() for k, v in tables.items()}
            got["kb.updated"] = updated.expand(len(chunk), -1)
            basis_at = self.kb.basis_at
            metas = [
                {"task": name, "n_labelled": n, "basis_at": basis_at, **extra}
                for name, n, extra in zip(chunk, self.tasks.counts[rows].tolist(), extras[a : a + step], strict=True)
            ]
            out.append((metas, got))
        return out

    def decode_task(self, data: bytes | None, max_bytes: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A changelog record checked against this engine's shapes; ``wire.Refused`` says why it is unusable."""
        wire.check_shareable(self.learners)
        if self._task_spec is None:  # one row of every per-task table, as ``export_task`` writes them
            tables = {f"learner.{k}": v for k, v in self.learners.state().items()}
            tables.update({f"t.{k}": v for k, v in self.tasks.cols.items() if k not in LOCAL})
            tables.update({"code.mu": self.kb.mu, "code.S": self.kb.S})
            self._task_spec = wire.spec_of({k: v.new_empty(v.shape[1:]) for k, v in tables.items()})
            self._task_spec["kb.updated"] = ("int64", (self.kb.capacity,))
        meta, arrays = wire.unpack(data, "task", self._task_spec, max_bytes)
        name, n = meta.get("task"), meta.get("n_labelled")
        if (
            not isinstance(name, str)
            or not 0 < len(name) <= 256
            or type(n) is not int
            or n < 0
            or type(meta.get("basis_at")) is not int
        ):
            raise wire.Refused("malformed", f"bad task metadata {meta!r:.200}")
        return meta, arrays

    def load_tasks(self, records: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]] | None]) -> None:
        """Set tasks from decoded changelog records, or back to untrained (None); new names become tasks.

        A record was written against the writer's KB. A slot that holds another member here (or none) is
        another expert for that task: it enters now, as a late expert does. A code learned in another basis is
        carried into this one when kept, else restarts from the prior. The tasks' pending predictions (not in
        records) and their keys in the duplicate window are dropped.
        """
        self._admit(list(records))
        self.pending.drop_tasks(records)
        # the events after a record's state are replayed: learned again, not duplicates of the ones this engine
        # learned before (a partition back where it was, after a commit that failed)
        self.learned_keys.forget(records)
        ours = torch.tensor(self.kb.updated, device=self.device)
        for name, record in records.items():
            self._load_task(self.tasks.index[name], record, ours)
            self.tasks.dirty[self.tasks.index[name]] = True

    def _load_task(
        self, i: int, record: tuple[dict[str, Any], dict[str, torch.Tensor]] | None, ours: torch.Tensor
    ) -> None:
        dev, t = self.device, self.tasks.cols
        if record is None:
            self.learners.load_task(i, None)
            for table in t.values():
                table[i] = 0
            self.tasks.start(t, i, self.kb.basis_at)
            self.n_labelled[i] = 0
            self.kb.mu[i], self.kb.S[i] = self.kb.prior_mu, self.kb.prior_S
            return
        meta, arrays = record
        self.learners.load_task(i, {k[len("learner.") :]: v for k, v in arrays.items() if k.startswith("learner.")})
        for k, table in t.items():
            if k not in LOCAL:
                table[i] = arrays[f"t.{k}"].to(dev)
        self.n_labelled[i] = int(meta["n_labelled"])
        self.kb.mu[i], self.kb.S[i] = arrays["code.mu"].to(dev), arrays["code.S"].to(dev)
        t["code_at"][i] = meta["basis_at"]
        self._carry_codes(np.array([i]))
        # experts of slots that changed between the writer's KB and this one are other experts here: a slot
        # empty here leaves, the others enter as late experts do; so does the basis expert of another basis
        changed = torch.cat(
            [torch.tensor([meta["basis_at"] != self.kb.basis_at]), arrays["kb.updated"] != ours.cpu()]
        ).to(dev)
        present = torch.cat([torch.tensor([self.kb.basis_ready], device=dev), self.kb.valid])
        gone = changed & ~present
        t["in_kb"][i, gone], t["L_kb"][i, gone] = False, 0.0
        t["kb_seen"][i] = 0
        self._sync_kb(np.array([i]), since=(changed & present).long().cpu().numpy())
        t["kb_seen"][i] = self.kb.applied
        t["in_top"][i, 1] &= t["in_kb"][i].any()  # with no KB expert here, the KB level sleeps

    def digest(self, names: list[str]) -> str:
        """SHA-256 over tasks' names, labelled counts and learner parameters: shows which state was restored."""
        self._admit(names, create=False)
        h = hashlib.sha256()
        for name in sorted(names):
            i = self.tasks.index[name]
            h.update(f"{name}\0{self.n_labelled[i]}\0".encode())
            for _, v in sorted(self.learners.task_state(i).items()):
                h.update(v.numpy().astype("<f4").tobytes())
        return h.hexdigest()[:16]

    def kb_summary(self) -> list[dict[str, Any]]:
        """One row per KB member: slot, id, source task and its total weight over tasks."""
        self.settle()
        n, t = self.n_tasks, self.tasks.cols
        if n:
            weights = self.kb_mix.weights(t["L_kb"][:n], t["in_kb"][:n], self._rounds(), self._kb_log_prior())
            weights = torch.nan_to_num(weights).sum(0)
        else:
            weights = torch.zeros(self.n_experts)
        rows = (
            [{"slot": "basis", "id": "basis", "source": "-", "weight": float(weights[0])}]
            if self.kb.basis_ready
            else []
        )
        for s, mid in enumerate(self.kb.ids):
            if mid is not None and bool(self.kb.valid[s]):
                rows.append({"slot": s, "id": mid, "source": self.kb.source[s], "weight": float(weights[1 + s])})
        return rows


def _json(rows: list[tuple[Any, ...]]) -> str:
    """Rows as one JSON string (numpy numbers as numbers): a checkpoint's long lists, written fast."""
    return orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def _listed(value: str | list[Any]) -> list[Any]:
    """A list saved as one JSON string (or, in checkpoints from before, as a list)."""
    return orjson.loads(value) if isinstance(value, str) else value


def pack_tasks(taken: list[tuple[list[Any], dict[str, Any]]], chunk: int = FLUSH_ROWS) -> Iterator[list[bytes]]:
    """Changelog records of tasks taken by ``Engine.take_tasks``, in order, at most ``chunk`` at a time."""
    for metas, got in taken:
        for a in range(0, len(metas), chunk):
            yield wire.pack_many("task", metas[a : a + chunk], {k: v[a : a + chunk] for k, v in got.items()})


def use_threads(cfg: EngineConfig) -> None:
    """Set this process's torch CPU threads to ``engine.threads`` (0 leaves torch's default)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def warm_up(cfg: EngineConfig, labels: LabelsConfig | None = None) -> float:
    """Compile the engine's kernels for ``cfg`` (a throwaway engine learns a few made-up events through every
    path: plain and pending labels, a control, snapshots and a publication) so that the first real batch does
    not wait for them; the seconds it took. numba caches what it compiles on disk: a later start loads it."""
    t0 = time.perf_counter()
    scratch = Engine(dataclasses.replace(cfg, publish_every=8, snapshot_every=2, snapshot_at=()), labels)
    rng = np.random.default_rng(0)

    def label(i: int) -> int | float:
        if cfg.task == "regression":
            return float(cfg.target_range[0])
        return i % (cfg.n_classes if cfg.task == "multiclass" else 2)

    plain = [Event(f"t{i % 2}", f"e{i}", rng.normal(size=cfg.dim), label(i)) for i in range(6)]
    rest = [
        Event("t0", "p", rng.normal(size=cfg.dim), None),
        Event("t0", "p", None, label(1)),
        Event("t1", None, control="end"),
    ]
    scratch.process(plain)
    scratch.process(rest + plain[:2])
    return time.perf_counter() - t0


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


class _EarlierSum:
    """For rows in order, each tagged with a group: the sum of values over the earlier rows of its group."""

    def __init__(self, group: torch.Tensor):
        self.order = torch.argsort(group, stable=True)
        g = group[self.order]
        first = torch.ones_like(g, dtype=torch.bool)
        first[1:] = g[1:] != g[:-1]
        pos = torch.arange(len(g), device=g.device)
        self.start = torch.cummax(torch.where(first, pos, 0), 0).values

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
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
