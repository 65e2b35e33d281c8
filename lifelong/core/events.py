"""Schema v1 events: decoding and validation of raw payloads into ``Event`` objects."""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import msgspec
import numpy as np
import orjson

from lifelong.errors import InvalidEvent

MAX_TASK_LEN = 256
MAX_ID_LEN = 256
RESERVED_TASK = "_population"  # the source name of the KB's population member
CONTROLS = ("end",)
ABSENT = msgspec.UNSET  # a field the payload leaves out


@dataclass(slots=True)
class Event:
    """One decoded event. ``x`` is None for label-only and control events; ``y`` None means predict only."""

    task: str
    id: str | None = None
    x: np.ndarray | None = None  # float64 as sent: the engine scales it per task before a learner sees it
    y: int | float | None = None
    ts: float | None = None
    control: str | None = None
    partition: int = 0  # where it came from (the Kafka partition): each has its own event time (``clock.py``)


@dataclass(frozen=True)
class Schema:
    """What a valid event looks like for one engine.

    Sparse ``x`` maps names to values; each name lands in bucket ``crc32(name) % dim`` (values of
    colliding names add up), so any name works and no vocabulary has to be kept.
    """

    dim: int
    task: str = "binary"
    n_classes: int = 2
    target_range: tuple[float, float] = (0.0, 1.0)
    tasks: frozenset[str] = frozenset()
    max_bytes: int = 1_000_000


def hash_index(name: str, dim: int) -> int:
    """Stable bucket of a sparse feature name (the same in every process and Python version)."""
    return zlib.crc32(name.encode("utf-8")) % dim


def _number(field: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidEvent(field, f"expected a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:  # an integer beyond float64
        raise InvalidEvent(field, "too large for a 64-bit float") from None
    if not math.isfinite(f):
        raise InvalidEvent(field, "not finite (NaN or infinity)")
    return f


def _features(x: Any, dim: int) -> np.ndarray:
    if isinstance(x, list):
        if len(x) != dim:
            raise InvalidEvent("x", f"expected {dim} values, got {len(x)}")
        if not all(type(v) is float or type(v) is int for v in x):  # bools and strings are not features
            raise InvalidEvent("x", "expected a list of numbers")
        try:
            arr = np.asarray(x, dtype=np.float64)
        except OverflowError:
            raise InvalidEvent("x", "a value is too large for a 64-bit float") from None
        if not np.isfinite(arr).all():
            raise InvalidEvent("x", "contains NaN or infinity")
        return arr
    if isinstance(x, dict):
        arr = np.zeros(dim, dtype=np.float64)
        with np.errstate(over="ignore"):
            for name, v in x.items():
                arr[hash_index(name, dim)] += _number(f"x.{name}", v)
        if not np.isfinite(arr).all():
            raise InvalidEvent("x", "values hashed into one bucket add up to infinity")
        return arr
    raise InvalidEvent("x", f"expected a list or a name->number map, got {type(x).__name__}")


def _label(y: Any, schema: Schema) -> int | float:
    if schema.task == "regression":
        f = _number("y", y)
        lo, hi = schema.target_range
        if not lo <= f <= hi:
            raise InvalidEvent("y", f"{f} is outside engine.target_range [{lo}, {hi}]")
        return f
    if isinstance(y, bool):  # as for x: true/false are not numbers
        raise InvalidEvent("y", f"expected a class label (integer), got {y!r}")
    if isinstance(y, float) and y.is_integer():
        y = int(y)
    if not isinstance(y, int):
        raise InvalidEvent("y", f"expected a class label (integer), got {y!r}")
    if not 0 <= y < schema.n_classes:
        raise InvalidEvent("y", f"class {y} is outside 0..{schema.n_classes - 1}")
    return y


def _names(task: Any, eid: Any, schema: Schema) -> None:
    """The checks of an event's task name and id (``from_dict`` and ``_common``)."""
    if not isinstance(task, str) or not task:
        raise InvalidEvent("task", "required non-empty string")
    if len(task) > MAX_TASK_LEN:
        raise InvalidEvent("task", f"longer than {MAX_TASK_LEN} characters")
    if task == RESERVED_TASK:
        raise InvalidEvent("task", f"{task!r} is reserved (the KB's population member)")
    if schema.tasks and task not in schema.tasks:
        raise InvalidEvent("task", f"unknown task {task!r} (engine.tasks refuses unknown tasks)")
    if eid is not None and (not isinstance(eid, str) or len(eid) > MAX_ID_LEN):
        raise InvalidEvent("id", f"expected a string of at most {MAX_ID_LEN} characters")


def _learnable(
    task: str,
    eid: str | None,
    ts: float | None,
    y: Any,
    x: Any,
    schema: Schema,
    dense: list[tuple[Event, list[Any]]] | None,
) -> Event:
    """The event of checked names and time with label ``y`` and features ``x`` (``ABSENT``: a label only), both
    checked here; with ``dense``, a dense x of ``dim`` values is left to the batch, which checks and converts
    them together (``decode_many``)."""
    if y is not None and not (type(y) is int and schema.task != "regression" and 0 <= y < schema.n_classes):
        y = _label(y, schema)  # (a class label in range, the common case, needs no more checks)
    if x is ABSENT:
        if y is None:
            raise InvalidEvent("y", "a label-only event (no x) needs y")
        if eid is None:
            raise InvalidEvent("id", "a label-only event needs the id of the prediction it labels")
        return Event(task=task, id=eid, y=y, ts=ts)
    if y is None and eid is None:
        raise InvalidEvent("id", "required when y is missing, so that the label can come later")
    if dense is not None and isinstance(x, list) and len(x) == schema.dim:
        e = Event(task, eid, None, y, ts)
        dense.append((e, x))
        return e
    return Event(task=task, id=eid, x=_features(x, schema.dim), y=y, ts=ts)


def from_dict(d: Any, schema: Schema, dense: list[tuple[Event, list[Any]]] | None = None) -> Event:
    """Validate a parsed JSON object.

    >>> s = Schema(dim=2)
    >>> from_dict({"task": "a", "x": [1, 2], "y": 1}, s).y
    1
    >>> from_dict({"task": "a", "x": [1], "y": 1}, s)
    Traceback (most recent call last):
    ...
    lifelong.errors.InvalidEvent: x: expected 2 values, got 1
    """
    if not isinstance(d, dict):
        raise InvalidEvent("event", f"expected a JSON object, got {type(d).__name__}")
    task: Any = d.get("task")
    eid = d.get("id")
    _names(task, eid, schema)
    ts = d.get("ts")
    if ts is not None:
        ts = _number("ts", ts)
    if "control" in d:
        if d["control"] not in CONTROLS:
            raise InvalidEvent("control", f"unknown control {d['control']!r} (known: {', '.join(CONTROLS)})")
        return Event(task=task, id=eid, ts=ts, control=d["control"])
    return _learnable(task, eid, ts, d.get("y"), d.get("x", ABSENT), schema, dense)


def decode(raw: bytes | str, schema: Schema) -> Event:
    """Decode one payload (UTF-8 JSON) into an ``Event`` or raise ``InvalidEvent``.

    >>> decode(b'{"task": "t", "id": "e1", "x": {"amount": 2.5}}', Schema(dim=4)).x.sum()
    np.float64(2.5)
    >>> decode(b'\\xff', Schema(dim=4))
    Traceback (most recent call last):
    ...
    lifelong.errors.InvalidEvent: payload: not UTF-8
    """
    if len(raw) > schema.max_bytes:
        raise InvalidEvent("payload", f"{len(raw)} bytes is more than the limit of {schema.max_bytes}")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEvent("payload", "not UTF-8") from None
    try:
        d = json.loads(raw, parse_constant=_reject_constant)
    except InvalidEvent:
        raise
    except (ValueError, RecursionError):
        raise InvalidEvent("payload", "not JSON") from None
    return from_dict(d, schema)


class _Common(msgspec.Struct):
    """The shape of nearly every event, type-checked by msgspec as it parses (``_common``). A field of another
    type (a bool among numbers, x as a string, a number beyond float64...) fails the parse: the general path
    (``from_dict``) then decodes that payload and names the reason. Unknown fields are ignored, as there."""

    task: str
    x: list[float] | dict[str, float] | msgspec.UnsetType = ABSENT
    y: int | float | None = None
    id: str | None = None
    ts: float | None = None
    control: Any = ABSENT


_parse_common = msgspec.json.Decoder(_Common).decode


def _common(raw: bytes | str, schema: Schema, dense: list[tuple[Event, list[Any]]]) -> Event | None:
    """The event of a payload of the common shape (no control; a dense x is left to the batch: ``dense``); None
    for any other payload, or an invalid one (``from_dict`` then names the reason)."""
    try:
        w = _parse_common(raw)
    except msgspec.MsgspecError:
        return None
    if w.control is not ABSENT:
        return None
    try:
        _names(w.task, w.id, schema)
        return _learnable(w.task, w.id, w.ts, w.y, w.x, schema, dense)
    except InvalidEvent:
        return None


def decode_many(raws: Sequence[bytes | None], schema: Schema) -> list[Event | InvalidEvent]:
    """Decode a batch of payloads: each an ``Event``, or the ``InvalidEvent`` saying why it is not one (what
    ``decode`` would raise for it). A payload of the common shape is parsed and type-checked by msgspec
    (``_common``), any other by orjson and ``from_dict``; the dense ``x`` lists of the whole batch are checked
    and converted as one array.

    >>> [type(r).__name__ for r in decode_many([b'{"task": "t", "x": [1, 2], "y": 0}', b'{"x": 1}', None],
    ...                                         Schema(dim=2))]
    ['Event', 'InvalidEvent', 'InvalidEvent']
    """
    out: list[Event | InvalidEvent] = []
    dense: list[tuple[Event, list[Any]]] = []  # each dense x with its event: converted together below
    places: list[int] = []  # where in ``out`` each of ``dense`` is
    unchecked: list[int] = []  # which of ``dense`` came from orjson: their types are checked below
    for raw in raws:
        try:
            if raw is None:
                raise InvalidEvent("payload", "empty (null) record")
            if len(raw) > schema.max_bytes:
                raise InvalidEvent("payload", f"{len(raw)} bytes is more than the limit of {schema.max_bytes}")
            n = len(dense)
            e = _common(raw, schema, dense)
            if e is None:
                try:
                    d = orjson.loads(raw)
                except orjson.JSONDecodeError:  # the exact reason (not UTF-8, NaN, a number beyond 64 bits...)
                    out.append(decode(raw, schema))
                    continue
                e = from_dict(d, schema, dense)
                if len(dense) > n:
                    unchecked.append(n)
            out.append(e)
            if len(dense) > n:  # its x is checked below, with the others
                places.append(len(out) - 1)
        except InvalidEvent as exc:
            out.append(exc)
    arr = None
    # bools and strings are not features; numpy would take them as numbers
    if set(map(type, chain.from_iterable(dense[k][1] for k in unchecked))) <= _NUMBERS:
        with contextlib.suppress(OverflowError):
            arr = np.array([x for _, x in dense], dtype=np.float64).reshape(len(dense), schema.dim)
    finite = np.zeros(len(dense), bool)
    if arr is not None:
        finite[:] = np.isfinite(arr).all(axis=1)
    for k, (e, x) in enumerate(dense):
        try:
            e.x = arr[k] if arr is not None and finite[k] else _features(x, schema.dim)
        except InvalidEvent as exc:
            out[places[k]] = exc
    return out


_NUMBERS = {float, int}


def _reject_constant(name: str) -> float:
    raise InvalidEvent("payload", f"{name} is not a valid JSON number")


def to_dict(e: Event) -> dict[str, Any]:
    """The JSON form of an event (dense ``x``)."""
    d: dict[str, Any] = {"task": e.task}
    if e.id is not None:
        d["id"] = e.id
    if e.control is not None:
        d["control"] = e.control
    if e.x is not None:
        d["x"] = [round(float(v), 6) for v in e.x]
    if e.y is not None:
        d["y"] = e.y
    if e.ts is not None:
        d["ts"] = e.ts
    return d
