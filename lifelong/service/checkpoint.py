"""Checkpoints: the engine state (plus the daemon's offsets) written atomically with a checksum.

A checkpoint is one file ``checkpoint-<seq>.ckpt`` in the checkpoint directory: a magic line, the SHA-256 of
the payload, then the payload, a ``torch.save`` of tensors and JSON-like metadata that is read back with
``weights_only=True`` (no arbitrary unpickling). It is written to a temporary file, fsynced, renamed, and
the directory fsynced; files are mode 0600. Loading takes the newest checkpoint that verifies and says
which ones it refused and why.

An engine with a task store kept in the checkpoint directory (the daemon's: ``tasks/``) checkpoints
incrementally: the tasks changed since the last checkpoint are written to the store, the store is snapshotted
(``store-<seq>/``: hard links, so its cost follows what changed), and the checkpoint file holds the global state
(KB, basis, counters, pending labels, offsets) and names that snapshot. Restoring starts the live store from the
snapshot and reads no task until its next event.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lifelong.config import Config, EngineConfig, LabelsConfig
from lifelong.core.engine import Engine
from lifelong.errors import StateError

MAGIC = b"LIFELONG-CHECKPOINT-1\n"
NAME = re.compile(r"^checkpoint-(\d{12})\.ckpt$")
log = logging.getLogger(__name__)


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if NAME.match(p.name)), reverse=True)


def write(
    directory: str | Path, tensors: dict[str, Any], meta: dict[str, Any], keep: int = 2, seq: int | None = None
) -> Path:
    """Write one checkpoint atomically (number ``seq``, by default the next); keep the newest ``keep`` files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    seq = seq or _next_seq(directory)
    buf = io.BytesIO()
    torch.save({"tensors": tensors, "meta": meta}, buf)
    payload = buf.getvalue()
    path = directory / file_name(seq)
    tmp = directory / f".{path.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for old in _files(directory)[keep:]:
        old.unlink(missing_ok=True)
    return path


def file_name(seq: int) -> str:
    """The name of checkpoint number ``seq``."""
    return f"checkpoint-{seq:012d}.ckpt"


def _next_seq(directory: Path) -> int:
    existing = _files(directory)
    return int(NAME.match(existing[0].name).group(1)) + 1 if existing else 1  # type: ignore[union-attr]


def _prune_snapshots(directory: Path) -> None:
    """Remove task-store snapshots that no kept checkpoint names."""
    named = set()
    for path in _files(directory):
        match = NAME.match(path.name)
        named.add(f"store-{match.group(1)}" if match else "")
    for snap in directory.glob("store-*"):
        if snap.name not in named:
            shutil.rmtree(snap, ignore_errors=True)


def check_writable(directory: str | Path) -> None:
    """Fail at start, not at the first checkpoint: the directory exists (or is made) and takes a synced file."""
    directory = Path(directory)
    probe = directory / ".write-test"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise StateError(f"checkpoint.dir {directory}: not writable ({exc.strerror or exc})") from None


def read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify and load one checkpoint file; ``StateError`` says what is wrong with it."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise StateError(f"{path}: not a lifelong checkpoint (bad header)")
    digest, sep, payload = data[len(MAGIC) :].partition(b"\n")
    if not sep or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise StateError(f"{path}: checksum mismatch (truncated or corrupt)")
    try:
        obj = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to parse means the file is unusable
        raise StateError(f"{path}: unreadable payload ({exc})") from None
    if any(k.endswith("pickle") for k in obj["tensors"]):  # River models: unpickled by ``Engine.load_state``
        st = path.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise StateError(
                f"{path}: holds pickled River models but is not this user's own file (owner uid {st.st_uid}, "
                f"mode {st.st_mode & 0o777:o}): refusing to unpickle it"
            )
    return obj["tensors"], obj["meta"]


def latest(directory: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint that verifies, or None when there is none; bad ones are logged and skipped."""
    for path in _files(Path(directory)):
        try:
            tensors, meta = read(path)
        except StateError as exc:
            log.error("refusing checkpoint: %s; trying the previous one", exc)
            continue
        if meta.get("store") and not (path.parent / meta["store"]).is_dir():
            log.error(
                "refusing checkpoint %s: its task store %s is missing; trying the previous one", path, meta["store"]
            )
            continue
        return path, tensors, meta
    return None


@dataclass
class Taken:
    """A checkpoint's state, taken (``take``) and not yet written (``Taken.write``)."""

    directory: Path
    seq: int
    tensors: dict[str, Any]
    meta: dict[str, Any]

    @property
    def path(self) -> Path:
        """The file it is written to."""
        return self.directory / file_name(self.seq)

    def write(self, keep: int = 2) -> Path:
        """The checkpoint file (then snapshots no kept checkpoint names are removed)."""
        path = write(self.directory, self.tensors, self.meta, keep, self.seq)
        _prune_snapshots(self.directory)
        return path


def take(engine: Engine, directory: str | Path, extra: dict[str, Any] | None = None, detach: bool = False) -> Taken:
    """The state a checkpoint of ``engine`` (and the daemon's ``extra`` metadata, e.g. offsets) holds:
    incremental when its task store lives in ``directory`` (module docstring: the changed tasks go to the store
    and it is snapshotted now), else every task. ``detach``: nothing in it is shared with the engine, so that it
    can be written while the engine goes on (the daemon writes it off its processing thread)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    seq = _next_seq(directory)
    store = engine.residency.store
    if store is not None and store.path.parent == directory:
        engine.residency.flush()
        snapshot = directory / f"store-{seq:012d}"
        shutil.rmtree(snapshot, ignore_errors=True)  # left by a checkpoint that failed after its snapshot
        store.snapshot(snapshot)
        tensors, meta = engine.state(tasks=False, detach=detach)
        meta["store"] = snapshot.name
    else:
        tensors, meta = engine.state(detach=detach)
    meta["extra"] = extra or {}
    return Taken(directory, seq, tensors, meta)


def save_engine(engine: Engine, directory: str | Path, extra: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Checkpoint ``engine`` (``take``, then write it)."""
    return take(engine, directory, extra).write(keep)


def restore_engine(engine: Engine, directory: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Load a checkpoint into a new ``engine``; one that names a task-store snapshot first makes the engine's
    live store a copy of it (``Residency.restore_store``), so that tasks come back from it at their next event."""
    if meta.get("store"):
        snapshot = directory / meta["store"]
        if not snapshot.is_dir():
            raise StateError(f"checkpoint names task store {snapshot}, which is missing")
        engine.residency.restore_store(snapshot)
    elif engine.residency.store_dir is not None:  # every task is in the file: a live store left from before is stale
        shutil.rmtree(engine.residency.store_dir, ignore_errors=True)
    engine.load_state(tensors, meta)


def load_engine(directory: str | Path, cfg: Config | EngineConfig, labels: LabelsConfig | None = None) -> Engine:
    """An engine restored from the newest good checkpoint in ``directory``.

    The saved ``engine.dim`` is used when the configuration leaves it at 0.
    """
    found = latest(directory)
    if found is None:
        raise StateError(f"no usable checkpoint in {directory}")
    _, tensors, meta = found
    engine_cfg = cfg.engine if isinstance(cfg, Config) else cfg
    if isinstance(cfg, Config):
        labels = cfg.labels
    if engine_cfg.dim == 0:
        import dataclasses

        engine_cfg = dataclasses.replace(engine_cfg, dim=int(meta["config"]["dim"]))
    engine = Engine(engine_cfg, labels)  # tasks in a copy of the snapshot: never a running daemon's live store
    restore_engine(engine, Path(directory), tensors, meta)
    return engine
