"""Moving tasks between replicas (the changelog): a task's whole state taken out as a record, checked when it
comes back, and loaded against this engine's KB; and a digest that shows which state a replica holds."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lifelong.core.arrivals import Arrivals
from lifelong.core.entry import KbEntry
from lifelong.core.knowledge import KnowledgeBase
from lifelong.core.learners.base import Learners
from lifelong.core.residency import FLUSH_ROWS, Residency
from lifelong.core.tasks import TaskTable
from lifelong.storage import wire

LOCAL = ("kb_seen", "code_at")  # task columns that refer to this replica's KB log: never in a changelog record


class Handover:
    """Task records out and in; every task meets the KB (``entry``) before its state leaves or after it
    arrives."""

    def __init__(
        self,
        tasks: TaskTable,
        learners: Learners,
        kb: KnowledgeBase,
        residency: Residency,
        arrivals: Arrivals,
        entry: KbEntry,
    ):
        self.tasks, self.learners, self.kb = tasks, learners, kb
        self.residency, self.arrivals, self.entry = residency, arrivals, entry
        self.device = kb.device
        self._task_spec: wire.Spec | None = None  # what a changelog record must hold (``decode_task``)

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
        step = max(1, min(FLUSH_ROWS, self.residency.cfg.max_resident_tasks // 2))
        updated = torch.tensor(self.kb.updated, dtype=torch.long)
        for a in range(0, len(names), step):
            chunk = names[a : a + step]
            self.tasks.batch += 1  # a tick of its own: only this chunk's tasks are kept from eviction
            self.residency.admit(chunk, create=False)
            rows = self.tasks.rows(chunk)
            self.entry.meet(rows)
            self.entry.carry_codes(rows)
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
        self.residency.admit(list(records))
        # the events after a record's state are replayed: learned again, not duplicates of the ones this engine
        # learned before (a partition back where it was, after a commit that failed)
        self.arrivals.forget_tasks(records)
        ours = torch.tensor(self.kb.updated, device=self.device)
        for name, record in records.items():
            self._load_task(self.tasks.index[name], record, ours)
            self.tasks.dirty[self.tasks.index[name]] = True

    def _load_task(
        self, i: int, record: tuple[dict[str, Any], dict[str, torch.Tensor]] | None, ours: torch.Tensor
    ) -> None:
        dev, tables = self.device, self.tasks.cols
        if record is None:
            self.learners.load_task(i, None)
            for table in tables.values():
                table[i] = 0
            self.tasks.start(tables, i, self.kb.basis_at)
            self.tasks.counts[i] = 0
            self.kb.mu[i], self.kb.S[i] = self.kb.prior_mu, self.kb.prior_S
            return
        meta, arrays = record
        self.learners.load_task(i, {k[len("learner.") :]: v for k, v in arrays.items() if k.startswith("learner.")})
        for k, table in tables.items():
            if k not in LOCAL:
                table[i] = arrays[f"t.{k}"].to(dev)
        self.tasks.counts[i] = int(meta["n_labelled"])
        self.kb.mu[i], self.kb.S[i] = arrays["code.mu"].to(dev), arrays["code.S"].to(dev)
        tables["code_at"][i] = meta["basis_at"]
        self.entry.carry_codes(np.array([i]))
        # experts of slots that changed between the writer's KB and this one are other experts here: a slot
        # empty here leaves, the others enter as late experts do; so does the basis expert of another basis
        changed = torch.cat(
            [torch.tensor([meta["basis_at"] != self.kb.basis_at]), arrays["kb.updated"] != ours.cpu()]
        ).to(dev)
        present = torch.cat([torch.tensor([self.kb.basis_ready], device=dev), self.kb.valid])
        gone = changed & ~present
        tables["in_kb"][i, gone], tables["L_kb"][i, gone] = False, 0.0
        tables["kb_seen"][i] = 0
        self.entry.meet(np.array([i]), since=(changed & present).long().cpu().numpy())
        tables["kb_seen"][i] = self.kb.applied
        tables["in_top"][i, 1] &= tables["in_kb"][i].any()  # with no KB expert here, the KB level sleeps

    def digest(self, names: list[str]) -> str:
        """SHA-256 over tasks' names, labelled counts and learner parameters: shows which state was restored."""
        self.residency.admit(names, create=False)
        h = hashlib.sha256()
        for name in sorted(names):
            i = self.tasks.index[name]
            h.update(f"{name}\0{self.tasks.counts[i]}\0".encode())
            for _, v in sorted(self.learners.task_state(i).items()):
                h.update(v.numpy().astype("<f4").tobytes())
        return h.hexdigest()[:16]


def pack_tasks(taken: list[tuple[list[Any], dict[str, Any]]], chunk: int = FLUSH_ROWS) -> Iterator[list[bytes]]:
    """Changelog records of tasks taken by ``Engine.take_tasks``, in order, at most ``chunk`` at a time."""
    for metas, got in taken:
        for a in range(0, len(metas), chunk):
            yield wire.pack_many("task", metas[a : a + chunk], {k: v[a : a + chunk] for k, v in got.items()})
