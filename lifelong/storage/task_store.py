"""Tasks that are not resident in the engine's tensors: an embedded key-value store on disk (RocksDB, through
``rocksdict``, the store Quix Streams keeps its state in).

Key: the task name (UTF-8); value: the task's row of every per-task column, raw little-endian bytes in the
order and shapes of the store's layout (``wire.Spec``), which is kept in the store itself under a reserved key
and checked when the store is opened: a store written by another shape of engine is refused, and nothing in
it is ever unpickled. Rows move in batches (``pack_rows`` / ``unpack_rows``: one array operation per column).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rocksdict import (
    AccessType,
    Checkpoint,
    DBCompressionType,
    Options,
    Rdict,
    WriteBatch,
    WriteOptions,
)

from lifelong.errors import StateError
from lifelong.storage import wire

LAYOUT = b"\x00layout"
COUNT = b"\x00count"
# Rows written by an earlier layout, as columns (name -> [rows, ...]), into the current layout's; None: unknown.
Migrate = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


def pack_rows(columns: dict[str, torch.Tensor], rows: torch.Tensor) -> list[bytes]:
    """Rows ``rows`` of every column, one ``bytes`` per row (the layout's order: ``columns``' order)."""
    idx = rows.cpu().numpy()
    flat = wire.row_bytes(
        [
            col.numpy()[idx] if col.device.type == "cpu" else col[rows.to(col.device)].cpu().numpy()
            for col in columns.values()
        ]
    )
    return [r.tobytes() for r in flat]


def unpack_rows(
    columns: dict[str, torch.Tensor], rows: torch.Tensor, values: list[bytes], layout: wire.Spec | None = None
) -> None:
    """Set rows ``rows`` of ``columns`` from ``pack_rows`` output; with ``layout`` (the rows' own), only the
    columns named in ``columns`` are read and the others skipped."""
    flat = np.frombuffer(b"".join(values), np.uint8).reshape(len(values), -1)
    spec = layout or wire.spec_of({k: v[:0] for k, v in columns.items()})
    idx = rows.cpu().numpy()
    at = 0
    for name, (dtype_name, shape) in spec.items():
        dtype = np.dtype(wire.DTYPES[dtype_name])
        width = dtype.itemsize * int(np.prod(shape[1:] if layout is None else shape, dtype=np.int64))
        col = columns.get(name)
        if col is not None:
            part = flat[:, at : at + width].copy().view(dtype).reshape(len(values), *col.shape[1:])
            if col.device.type == "cpu":
                col.numpy()[idx] = part
            else:
                col[rows.to(col.device)] = torch.from_numpy(part).to(col.device)
        at += width


class TaskStore:
    """Task rows on disk by name. ``put``/``delete`` go into one atomic write; ``snapshot`` makes a consistent
    copy (hard links, so its cost follows what changed since the last one) that ``open`` can start from."""

    def __init__(self, path: str | Path, layout: wire.Spec, migrate: Migrate | None = None):
        self.path = Path(path)
        self.closed = False
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        # no compression: rows are mostly floats, which lz4 leaves at about the same size on disk while its
        # flushes and compactions take CPU from the engine
        opts.set_compression_type(DBCompressionType.none())
        # Bloom filters in the tables and the memtable (most lookups are of new tasks: a miss reads nothing), a
        # hash index in each data block, an 8 MB block cache: cheaper reads than bloom filters alone
        opts.optimize_for_point_lookup(8)
        # 8 MB memtables (not 64): a checkpoint's snapshot flushes the memtable under the processing lock, and
        # write-behind fills it at tens of MB/s under load; fuller ones are flushed by RocksDB's own threads
        opts.set_write_buffer_size(8 << 20)
        self.db = Rdict(str(self.path), opts)
        self.spec = layout
        self.layout = {k: [dtype, list(shape)] for k, (dtype, shape) in layout.items()}
        self.width = sum(
            np.dtype(wire.DTYPES[t]).itemsize * int(np.prod(shape, dtype=np.int64)) for t, shape in layout.values()
        )
        self._wo = WriteOptions()
        self._wo.disable_wal = True  # type: ignore[method-assign,assignment]  # durability: ``snapshot`` flushes
        self.count = int(self.db.get(COUNT) or b"0")  # tasks stored (each name once)
        saved = self.db.get(LAYOUT)
        if saved is None:
            self.db[LAYOUT] = json.dumps(self.layout).encode()
        elif json.loads(saved) != self.layout:
            old = {k: (t, tuple(shape)) for k, (t, shape) in json.loads(saved).items()}
            if migrate is None or not self._migrate(old, migrate):
                self.db.close()
                raise StateError(
                    f"task store {self.path} was written by another shape of engine (per-task columns differ)"
                )

    def _migrate(self, old: wire.Spec, migrate: Migrate, chunk: int = 4096) -> bool:
        """Rewrite every row written in layout ``old`` into this store's layout (``migrate`` turns a chunk of
        rows, as columns, into the new columns; None: it cannot); False, and nothing changed, if it cannot."""
        rows = list(self.items())
        for start in range(0, max(len(rows), 1), chunk):
            part = rows[start : start + chunk]
            columns = {k: torch.zeros((len(part), *shape), dtype=getattr(torch, t)) for k, (t, shape) in old.items()}
            if part:
                unpack_rows(columns, torch.arange(len(part)), [v for _, v in part], old)
            new = migrate(columns)
            if new is None:
                return False
            if part:  # a crash half way leaves the old layout's key: the next start copies the snapshot again
                packed = pack_rows({k: new[k] for k in self.spec}, torch.arange(len(part)))
                self.write(dict(zip((n for n, _ in part), packed, strict=True)), 0)
        self.db[LAYOUT] = json.dumps(self.layout).encode()
        return True

    def get(self, names: list[str]) -> list[bytes | None]:
        """Each task's row, or None where the store does not hold it."""
        if not names:
            return []
        values: list[bytes | None] = self.db.get([n.encode() for n in names])  # type: ignore[assignment]
        for v in values:
            if v is not None and len(v) != self.width:
                raise StateError(f"task store {self.path}: a row of {len(v)} bytes, expected {self.width}")
        return list(values)

    def write(self, rows: dict[str, bytes], new: int, extra: dict[bytes, bytes] | None = None) -> None:
        """Put ``rows`` (``new`` of them not stored before) and ``extra`` reserved keys in one atomic write."""
        batch = WriteBatch(raw_mode=True)
        for name, value in rows.items():
            batch.put(name.encode(), value)
        self.count += new
        batch.put(COUNT, str(self.count).encode())
        for key, value in (extra or {}).items():
            batch.put(key, value)
        self.db.write(batch, self._wo)

    def delete(self, names: list[str]) -> None:
        """Remove stored tasks (all of them stored) in one atomic write."""
        if not names:
            return
        batch = WriteBatch(raw_mode=True)
        for name in names:
            batch.delete(name.encode())
        self.count -= len(names)
        batch.put(COUNT, str(self.count).encode())
        self.db.write(batch, self._wo)

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every stored task's name and row (reports: not the event path)."""
        for key, value in self.db.items():
            if isinstance(key, bytes) and isinstance(value, bytes) and not key.startswith(b"\x00"):
                yield key.decode(), value

    def read(self, key: bytes) -> bytes | None:
        """A reserved key's value (written by ``write``'s ``extra``)."""
        value = self.db.get(key)
        return None if value is None else bytes(value)

    def snapshot(self, path: str | Path) -> None:
        """A consistent copy of the store as of now in ``path`` (which must not exist)."""
        self.db.flush()
        Checkpoint(self.db).create_checkpoint(str(path))

    def size_bytes(self) -> int:
        """Bytes of the store's files on disk."""
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def close(self) -> None:
        """Close the database (its files stay); closing it again does nothing."""
        if not self.closed:
            self.closed = True
            self.db.close()

    def discard(self) -> None:
        """Close the database, then remove its files (a temporary store's end: RocksDB must not close, and
        flush, into a directory already removed, nor be left to close while the interpreter shuts down)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    @classmethod
    def restore(
        cls, snapshot: str | Path, path: str | Path, layout: wire.Spec, migrate: Migrate | None = None
    ) -> TaskStore:
        """A live store at ``path`` holding what ``snapshot`` holds (whatever ``path`` held before is gone)."""
        shutil.rmtree(path, ignore_errors=True)
        src = Rdict(str(snapshot), Options(raw_mode=True), access_type=AccessType.read_only())  # left as it is
        try:
            Checkpoint(src).create_checkpoint(str(path))
        finally:
            src.close()
        return cls(path, layout, migrate)


def describe(store: TaskStore | None) -> dict[str, Any]:
    """Figures for metrics and logs."""
    if store is None:
        return {"stored": 0, "bytes": 0}
    return {"stored": store.count, "bytes": store.size_bytes()}
