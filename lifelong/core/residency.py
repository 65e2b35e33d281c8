"""Which tasks are resident: tasks in use live in the engine's tensors (at most ``engine.max_resident_tasks``),
the rest in an on-disk store (``storage/task_store.py``, RocksDB), loaded a batch at a time before its events.

Admitting a batch's tasks reads back those in the store and registers new ones; when that would pass the
limit, the least recently used tasks (none of the batch's) are written to the store first and their rows take
the tasks coming in. Work per event and memory never grow with the number of tasks ever seen.
"""

from __future__ import annotations

import itertools
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from lifelong.config import EngineConfig
from lifelong.core.knowledge import KnowledgeBase
from lifelong.core.learners.base import Learners
from lifelong.core.tasks import STATS, TaskTable, assign
from lifelong.errors import StateError
from lifelong.storage import wire
from lifelong.storage.task_store import TaskStore, pack_rows, unpack_rows

FLUSH_ROWS = 8192  # task rows written to the store at a time by ``flush``
IDLE_BATCHES = 2  # a changed task unused for this many batches may be written to the store (``write_behind``)


class Residency:
    """Resident and stored tasks: the task table's rows, the learners' and basis codes' per-task columns, and
    the store. Counts moves in ``counters`` (the engine's)."""

    def __init__(
        self,
        cfg: EngineConfig,
        tasks: TaskTable,
        learners: Learners,
        kb: KnowledgeBase,
        counters: dict[str, int],
        store_dir: str | Path | None,
    ):
        self.cfg, self.tasks, self.learners, self.kb, self.counters = cfg, tasks, learners, kb, counters
        self.device = kb.device
        # tasks beyond ``max_resident_tasks`` live in an on-disk store: in ``store_dir`` (the daemon's, kept
        # across restarts) or, when first needed, in a temporary directory removed with the engine
        self.store_dir = store_dir
        self.store: TaskStore | None = None
        self.spills = isinstance(getattr(learners, "params", None), dict)  # River's models are not arrays
        self.away = np.zeros(len(STATS))  # the statistics of tasks in the store, summed (``stats_total``)
        self.flushed = 0  # tasks the last ``flush`` wrote, with those ``write_behind`` wrote before it
        self._behind = 0  # tasks ``write_behind`` wrote since the last ``flush``

    @property
    def known(self) -> int:
        """Tasks known: resident or in the store."""
        return self.counters["tasks_created"] - self.counters["tasks_dropped"]

    def _full(self, coming: int) -> bool:
        """Whether ``coming`` more tasks would pass ``max_resident_tasks`` (``admit`` evicts first)."""
        return self.spills and coming > self.cfg.max_resident_tasks - len(self.tasks)

    def hands_over(self, coming: int) -> bool:
        """Whether admitting ``coming`` new tasks may give them rows other tasks held (``admit`` evicts, or rows of
        dropped tasks are set up again)."""
        return self._full(coming) or len(self.tasks) < self.tasks.high

    def init_rows(self, first: int) -> None:
        """Learners, codes and mixture tables for tasks ``first ..`` (they meet the KB in ``KbEntry.meet``)."""
        n = len(self.tasks)
        self.learners.ensure(n)
        self.kb.ensure(n)
        self.tasks.start(self.tasks.cols, slice(first, n), self.kb.basis_at)
        if first < min(n, self.tasks.high):  # rows that held dropped tasks (``drop_tasks``)
            self.reset(np.arange(first, min(n, self.tasks.high)))
        self.tasks.high = max(self.tasks.high, n)

    def columns(self) -> dict[str, torch.Tensor]:
        """Every per-task column (row i: task i's values), in the order of a store's rows."""
        cols = {f"t.{k}": v for k, v in self.tasks.cols.items()}
        cols.update({f"learner.{k}": v for k, v in self.learners.columns().items()})
        cols["code.mu"], cols["code.S"] = self.kb.mu, self.kb.S
        cols["n_labelled"] = torch.from_numpy(self.tasks.counts)
        return cols

    def open_store(self) -> TaskStore:
        """The task store, opened (or made) on first use."""
        if self.store is None:
            path = self.store_dir or tempfile.mkdtemp(prefix="lifelong-tasks-")
            self.store = TaskStore(path, self.layout(), self.migrate)
            if self.store_dir is None:  # removed with this object (at the latest when the interpreter exits)
                weakref.finalize(self, self.store.discard)
        return self.store

    def migrate(self, old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Stored rows of an earlier layout (as columns) in this one, or None if it is not a known earlier one.
        Known: the layout before the shared level (issue 31): a per-task ``t.peak`` column (dropped), two top
        columns (the shared learners join, ``TaskTable.join_shared``), no deviation or drift columns (zeros)."""
        n = len(next(iter(old.values()))) if old else 0
        new = {k: v.new_zeros((n, *v.shape[1:])) for k, v in self.columns().items()}
        if set(old) - set(new) != {"t.peak"} or old["t.L_top"].shape[1:] != (2,):
            return None
        for key, value in old.items():
            if key in ("t.L_top", "t.in_top"):
                new[key][:, :2] = value.to(new[key].dtype)
            elif key != "t.peak":
                if value.shape[1:] != new[key].shape[1:]:
                    return None
                new[key] = value.to(new[key].dtype)
        self.tasks.join_shared({k.removeprefix("t."): v for k, v in new.items() if k.startswith("t.")}, slice(None))
        return new

    def layout(self) -> wire.Spec:
        """The shape of one task's row in the store."""
        spec = wire.spec_of({k: v[:0] for k, v in self.columns().items()})
        return {k: (dtype, shape[1:]) for k, (dtype, shape) in spec.items()}

    def admit(self, names: list[str], create: bool = True, evict: bool = True) -> None:
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
        room = self.cfg.max_tasks - self.known
        if len(new) > room:
            raise StateError(f"engine.max_tasks ({self.cfg.max_tasks}) reached; task {new[max(0, room)]!r} refused")
        coming = len(back) + len(new)
        free: list[int] = []
        if evict and self._full(coming):
            self.tasks.used[self.tasks.rows([n for n in wanted if n in index])] = self.tasks.batch
            free = self._evict(min(coming, coming - (self.cfg.max_resident_tasks - len(self.tasks))))
        first = len(self.tasks)
        rows = self.tasks.add([name for name, _ in back] + new, free)
        self.counters["tasks_created"] += len(new)
        rows_back, rows_new = rows[: len(back)], rows[len(back) :]
        self.init_rows(first)
        reused = [r for r in rows_new if r < first]
        if reused:
            self.reset(np.array(reused, np.int64))
        if back:
            at = torch.as_tensor(rows_back, device=self.device)
            unpack_rows(self.columns(), at, [v for _, v in back])
            self.away -= self.tasks.cols["stats"][at].sum(0).cpu().numpy()
            self.tasks.in_store[rows_back], self.tasks.dirty[rows_back] = True, False
            self.counters["tasks_loaded"] += len(back)

    def _evict(self, k: int) -> list[int]:
        """Write the ``k`` least recently used tasks not used in this batch to the store (those changed since
        they were last written: the others are there as they are); their rows, freed."""
        rows = self.tasks.least_used(k)
        if not len(rows):
            return []
        changed = rows[self.tasks.dirty[rows]]
        if len(changed):
            self.write_rows(changed)
        self.away += self.tasks.cols["stats"][torch.as_tensor(rows, device=self.device)].sum(0).cpu().numpy()
        self.tasks.release(rows)
        self.counters["tasks_evicted"] += len(rows)
        return [int(r) for r in rows]

    def reset(self, rows: np.ndarray) -> None:
        """Rows freed by ``_evict`` that take new tasks: as ``init_rows`` sets up new rows."""
        at = torch.as_tensor(rows, device=self.device)
        for table in self.tasks.cols.values():
            assign(table, at, 0)
        self.tasks.start(self.tasks.cols, at, self.kb.basis_at)
        self.learners.reset(at)
        self.kb.mu[at], self.kb.S[at] = self.kb.prior_mu, self.kb.prior_S

    def drop(self, names: set[str]) -> None:
        """Forget tasks, resident or stored (another replica owns them now).
        The last resident rows move into the rows they leave, so resident rows stay ``0 .. n_tasks - 1``."""
        store = self.store
        if store is not None:
            stored = [(k, v) for k, v in zip(sorted(names), store.get(sorted(names)), strict=True) if v is not None]
            gone = [k for k, _ in stored if k not in self.tasks.index]
            if gone:  # their statistics leave the stored sum
                stats = {"t.stats": torch.zeros(len(gone), len(STATS), dtype=torch.float64)}
                values = dict(stored)
                unpack_rows(stats, torch.arange(len(gone)), [values[k] for k in gone], store.spec)
                self.away -= stats["t.stats"].sum(0).numpy()
            store.delete([k for k, _ in stored])
            self.counters["tasks_dropped"] += len(gone)
        holes = sorted(self.tasks.index[k] for k in names if k in self.tasks.index)
        self.counters["tasks_dropped"] += len(holes)
        if not holes:
            return
        src, dst = self.tasks.remove(holes)
        if src:
            src_t, dst_t = (torch.as_tensor(r, device=self.device) for r in (src, dst))
            for key, col in self.columns().items():
                if key != "n_labelled":  # moved with the table's host values
                    col[dst_t.to(col.device)] = col[src_t.to(col.device)]

    def in_store(self, names: list[str]) -> set[str]:
        """Which of ``names`` the task store holds: every known task not resident (and resident ones written
        to it before)."""
        if self.store is None:
            return set()
        return {n for n, v in zip(names, self.store.get(names), strict=True) if v is not None}

    def recall(self) -> None:
        """Every stored task back in memory, whatever ``max_resident_tasks`` (a whole state in one object)."""
        if self.store is not None:
            self.admit([k for k, _ in self.store.items()], create=False, evict=False)

    def stats_total(self) -> np.ndarray:
        """Every task's statistics (``STATS``), summed: resident and stored tasks."""
        return self.tasks.cols["stats"][: len(self.tasks)].sum(0).cpu().numpy() + self.away

    def flush(self) -> int:
        """Write every resident task changed since it was last written to the store; returns how many."""
        dirty = np.flatnonzero(self.tasks.dirty[: len(self.tasks)])
        self.flushed, self._behind = len(dirty) + self._behind, 0
        for rows in np.array_split(dirty, -(-len(dirty) // FLUSH_ROWS)) if len(dirty) else []:  # bounded memory
            self.write_rows(rows)
        return len(dirty)

    def write_behind(self, limit: int) -> int:
        """Write to the store up to ``limit`` changed tasks that no event of the last ``IDLE_BATCHES`` batches
        used, least recently used first (the daemon calls it after each batch): the next ``flush`` (a
        checkpoint) then finds few to write, and evicting them writes nothing. Returns how many."""
        if self.store is None or limit <= 0:
            return 0
        n = len(self.tasks)
        rows = np.flatnonzero(self.tasks.dirty[:n] & (self.tasks.used[:n] <= self.tasks.batch - IDLE_BATCHES))
        if len(rows) > limit:
            rows = rows[np.argpartition(self.tasks.used[rows], limit - 1)[:limit]]
        if len(rows):
            self.write_rows(rows)
            self._behind += len(rows)
        return len(rows)

    def write_rows(self, rows: np.ndarray) -> None:
        """Write resident tasks ``rows`` to the store, in one write."""
        values = pack_rows(self.columns(), torch.as_tensor(rows, device=self.device))
        names = [self.tasks.names[r] for r in rows.tolist()]
        self.open_store().write(dict(zip(names, values, strict=True)), int((~self.tasks.in_store[rows]).sum()))
        self.tasks.in_store[rows], self.tasks.dirty[rows] = True, False

    def task_blocks(
        self, meet_kb: Callable[..., None], size: int = 4096
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor], np.ndarray]]:
        """Every task's name, mixture tables and labelled count, a block at a time: the resident tasks, then the
        others read from the store ``size`` at a time, which meet the KB as it is now (``meet_kb``:
        ``KbEntry.meet``). For reports, not the event path: memory stays within a block however many tasks the
        store holds."""
        yield list(self.tasks.names), self.tasks.view(), self.tasks.counts[: len(self.tasks)]
        if self.store is None:
            return
        rows = ((k, v) for k, v in self.store.items() if k not in self.tasks.index)
        while stored := list(itertools.islice(rows, size)):
            m = len(stored)
            cols = {f"t.{k}": v.new_zeros((m, *v.shape[1:])) for k, v in self.tasks.cols.items()}
            cols["n_labelled"] = torch.zeros(m, dtype=torch.long)
            unpack_rows(cols, torch.arange(m, device=self.device), [v for _, v in stored], self.store.spec)
            tables = {k[2:]: v for k, v in cols.items() if k.startswith("t.")}
            meet_kb(np.arange(m), tables, names={k: j for j, (k, _) in enumerate(stored)})
            yield [k for k, _ in stored], tables, cols["n_labelled"].numpy()

    def restore_store(self, snapshot: Path) -> None:
        """Make the live store (``store_dir``, or without one a temporary directory removed with this object) a
        copy of a checkpoint's store snapshot: tasks come back from it at their next event."""
        target = self.store_dir or tempfile.mkdtemp(prefix="lifelong-tasks-")
        self.store = TaskStore.restore(snapshot, target, self.layout(), self.migrate)
        if self.store_dir is None:
            weakref.finalize(self, self.store.discard)
