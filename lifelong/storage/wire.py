"""The wire format of records other replicas read (knowledge members, task changelog): arrays plus JSON.

``LLW1`` | header length (4 bytes, big-endian) | header JSON | raw arrays. The header names the record
kind, carries JSON metadata and lists each array's name, dtype and shape; the arrays follow in that order,
little-endian, C order. Nothing is ever unpickled or evaluated: a reader states the exact arrays it expects
(names, dtypes, shapes) and anything else is refused with a reason, before any array is built.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import orjson
import torch

from lifelong.errors import LifelongError

MAGIC = b"LLW1"
MAX_HEADER = 64 * 1024
DTYPES = {"float32": "<f4", "float64": "<f8", "int64": "<i8", "bool": "|b1"}

Spec = dict[str, tuple[str, tuple[int, ...]]]  # array name -> (dtype name, shape)


class Refused(LifelongError):
    """A record that is not exactly what this replica expects; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def check_shareable(learners: Any) -> None:
    """Only backends whose state is plain arrays read records from other replicas (River's is pickle)."""
    if not learners.shareable:
        raise Refused("backend", f"the {learners.cfg.backend} backend does not read records from other replicas")


def spec_of(arrays: dict[str, torch.Tensor]) -> Spec:
    """The spec a reader expects for arrays shaped like these."""
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in arrays.items()}


def pack(kind: str, meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> bytes:
    """A record of ``kind`` holding ``meta`` (JSON) and ``arrays`` (raw little-endian)."""
    return pack_many(kind, [meta], {name: v.unsqueeze(0) for name, v in arrays.items()})[0]


def pack_many(kind: str, metas: list[dict[str, Any]], arrays: dict[str, torch.Tensor]) -> list[bytes]:
    """One record per entry of ``metas``: record j holds ``metas[j]`` and row j of each of ``arrays``. The
    array list of the header and the arrays' bytes are made once for all records."""
    names = [[name, str(v.dtype).removeprefix("torch."), list(v.shape[1:])] for name, v in arrays.items()]
    start, end = b'{"kind":' + orjson.dumps(kind) + b',"meta":', b',"arrays":' + orjson.dumps(names) + b"}"
    rows = row_bytes([v.detach().cpu().numpy() for v in arrays.values()])
    out = []
    for meta, row in zip(metas, rows, strict=True):
        head = b"".join((start, orjson.dumps(meta), end))
        out.append(b"".join((MAGIC, struct.pack(">I", len(head)), head, row.tobytes())))
    return out


def row_bytes(tables: list[np.ndarray]) -> np.ndarray:
    """Row j of every table (same first dimension), little-endian and C order, side by side: one row of bytes
    per j (``[rows, bytes]``, uint8)."""
    parts = [
        np.ascontiguousarray(a, dtype=np.dtype(DTYPES[str(a.dtype)])).reshape(len(a), -1).view(np.uint8) for a in tables
    ]
    flat = np.empty((len(parts[0]) if parts else 0, sum(p.shape[1] for p in parts)), np.uint8)
    at = 0
    for p in parts:
        flat[:, at : at + p.shape[1]] = p
        at += p.shape[1]
    return flat


def unpack(data: bytes | None, kind: str, spec: Spec, max_bytes: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Check ``data`` against ``spec`` and return (meta, arrays); ``Refused`` says why it cannot be used."""
    if data is None or len(data) < 8:
        raise Refused("malformed", "empty or truncated record")
    if len(data) > max_bytes:
        raise Refused("too_large", f"{len(data)} bytes > {max_bytes}")
    if data[:4] != MAGIC:
        raise Refused("not_lifelong", f"unknown format (starts with {data[:4]!r})")
    (hlen,) = struct.unpack(">I", data[4:8])
    if hlen > MAX_HEADER or 8 + hlen > len(data):
        raise Refused("malformed", f"header of {hlen} bytes does not fit")
    try:
        header = json.loads(data[8 : 8 + hlen])
        if not isinstance(header, dict) or header.get("kind") != kind or not isinstance(header.get("meta"), dict):
            raise ValueError(f"expected a {kind!r} record")
        listed = {str(n): (str(d), tuple(int(x) for x in s)) for n, d, s in header["arrays"]}
    except (ValueError, TypeError, KeyError) as exc:
        raise Refused("malformed", f"bad header ({exc})") from None
    if listed != spec:
        wrong = sorted(set(listed.items()) ^ set(spec.items()))[:3]
        raise Refused("shape", f"arrays differ from what this replica holds: {wrong}")
    out: dict[str, torch.Tensor] = {}
    pos = 8 + hlen
    sizes = {name: int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize for name, (dtype, shape) in spec.items()}
    if pos + sum(sizes.values()) != len(data):
        raise Refused("shape", f"{len(data) - pos} bytes of arrays, expected {sum(sizes.values())}")
    for name, _, _ in header["arrays"]:
        dtype, shape = spec[name]
        a = np.frombuffer(data, DTYPES[dtype], int(np.prod(shape)), pos).reshape(shape)
        pos += sizes[name]
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise Refused("not_finite", f"array {name} holds NaN or infinity")
        out[name] = torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=True))
    return header["meta"], out
