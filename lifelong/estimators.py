"""River estimators: the lifelong engine inside River's evaluation, pipelines and checks.

``LifelongClassifier`` and ``LifelongRegressor`` are River estimators whose task is read from one feature
(``by``, as in ``river.compose.Grouper``) and removed from the features; an ``x`` without it belongs to one
default task. Other features are hashed into ``dim`` buckets as sparse events are (``crc32(name) % dim``,
colliding values add up): numbers as they are (NaN skipped as missing), strings as the indicator feature
``name=value``. ``learn_one`` learns one labelled event and ``predict_*_one`` predicts one without learning,
each in one compiled call (``core/single.py``, equal to ``Engine.process`` / ``Engine.predict``); the
``_many`` methods put a whole DataFrame through the engine's batching, which gives the same results as one
event at a time. The engine computes in float64 here (``engine={"dtype": "float32"}`` takes the batch path).

>>> from river import compose, evaluate, metrics, preprocessing
>>> from lifelong.estimators import LifelongClassifier
>>> stream = [({"task": f"user{i % 3}", "amount": 120.0 * (i % 7), "hour": i % 24}, (i % 7) > 3)
...           for i in range(300)]
>>> model = compose.Select("task") + (compose.Discard("task") | preprocessing.StandardScaler())
>>> model |= LifelongClassifier(by="task", dim=16)
>>> evaluate.progressive_val_score(stream, model, metrics.Accuracy())
Accuracy: 9...%
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from river import base

from lifelong.config import EngineConfig
from lifelong.core.engine import Engine
from lifelong.core.events import Event, hash_index
from lifelong.core.single import OneEvent
from lifelong.core.warmup import use_threads

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_TASK = "default"
MAX_BUCKETS_KEPT = 1_000_000  # feature names whose hash bucket is remembered (forgotten all at once beyond)
MAX_LAYOUTS_KEPT = 10_000  # sets of feature names whose buckets are remembered together (likewise)
Method = TypeVar("Method", bound=Callable[..., Any])


def _engine_threads(method: Method) -> Method:
    """``method`` with torch's CPU threads set to ``engine.threads`` (1 by default; 0: as they are) and the caller's
    setting restored after. The engine's torch operations are small: waking more threads for them costs more than
    the work (a publication at dim 64 took 5.2 ms on two threads, 1.3 on one)."""

    @functools.wraps(method)
    def on_engine_threads(self: _Lifelong, *args: Any) -> Any:
        before = use_threads(self._engine.cfg)
        try:
            return method(self, *args)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    return on_engine_threads  # type: ignore[return-value]


class _Lifelong:
    """What both estimators share: the task feature, hashed features, one engine (``_engine``)."""

    by: str
    dim: int
    engine: dict[str, Any] | None
    _engine: Engine

    def _build(self, **settings: Any) -> None:
        options = {"device": "cpu", "dtype": "float64", **settings, **(self.engine or {})}
        self._engine = Engine(EngineConfig(dim=self.dim, **options))
        self._one = OneEvent(self._engine)
        self._buckets: dict[str, int] = {}  # feature name (or "name=value" of a string) -> its hash bucket
        # the names of an x -> (the task's place among them, the others' buckets, whether no two share one)
        self._layouts: dict[tuple[Any, ...], tuple[int, np.ndarray, bool]] = {}
        self._last: tuple[dict[Any, Any] | None, np.ndarray] = (None, np.zeros(0))  # the last x and its features

    def _bucket(self, text: str) -> int:
        at = self._buckets.get(text)
        if at is None:
            if len(self._buckets) >= MAX_BUCKETS_KEPT:
                self._buckets.clear()
            at = self._buckets[text] = hash_index(text, self.dim)
        return at

    def _features(self, x: dict[Any, Any]) -> np.ndarray:
        try:
            if x == self._last[0]:  # predict_one then learn_one of the same x: hashed once
                return self._last[1]
        except (TypeError, ValueError):  # values that do not compare (arrays): hashed again
            pass
        out = self._numbers(x)
        if out is None:
            out = self._hashed(x)
        self._last = (dict(x), out)
        return out

    def _numbers(self, x: dict[Any, Any]) -> np.ndarray | None:
        """The features of an ``x`` whose values (the task's aside) are all finite numbers, in a few array
        operations (the buckets of a set of names are remembered); else None."""
        names = tuple(x)
        layout = self._layouts.get(names)
        if layout is None:
            if len(self._layouts) >= MAX_LAYOUTS_KEPT:
                self._layouts.clear()
            task = names.index(self.by) if self.by in x else -1
            at = np.array([self._bucket(n if type(n) is str else str(n)) for n in names if n != self.by], np.int64)
            layout = self._layouts[names] = (task, at, len(set(at.tolist())) == len(at))
        task, at, apart = layout
        values = list(x.values())
        if task >= 0:
            del values[task]
        try:
            v = np.array(values)
        except ValueError:  # arrays of different shapes
            return None
        if v.dtype.kind not in "fiub" or v.ndim != 1 or not math.isfinite(sum(values)):  # strings, None, NaN
            return None
        if apart:  # no two names share a bucket
            out = np.zeros(self.dim)
            out[at] = v
            return out
        return np.bincount(at, v, self.dim)  # colliding values add up, in the order of ``x`` (as ``_hashed``)

    def _hashed(self, x: dict[Any, Any]) -> np.ndarray:
        """The features of any ``x``: each value as its type says (missing, number, string), one at a time."""
        features, buckets = [0.0] * self.dim, self._buckets
        for name, value in x.items():
            if name == self.by or value is None:
                continue
            kind = type(value)
            if kind is float or kind is int:  # the common case first: no abstract base class check
                if (v := float(value)) - v == 0.0:  # finite
                    text = name if type(name) is str else str(name)
                    at = buckets.get(text)
                    features[self._bucket(text) if at is None else at] += v
            elif isinstance(value, str):
                features[self._bucket(f"{name}={value}")] += 1.0
            elif isinstance(value, numbers.Real) and math.isfinite(v := float(value)):
                features[self._bucket(str(name))] += v
        return np.array(features)

    def _event(self, x: dict[Any, Any], y: int | float | None = None) -> Event:
        return Event(str(x.get(self.by, DEFAULT_TASK)), None, self._features(x), y)

    @_engine_threads
    def _learn(self, x: dict[Any, Any], y: float) -> None:
        """``Engine.process`` of one event: by the single-event path (``core/single.py``) where it can."""
        task = str(x.get(self.by, DEFAULT_TASK))
        features = self._features(x)
        if self._one.learn(task, features, y) is None:
            self._one.stale()
            self._engine.process([Event(task, None, features, y)])

    @_engine_threads
    def _predict(self, x: dict[Any, Any]) -> np.ndarray:
        """``Engine.predict`` of one event ``[1, P]``, by the single-event path where it can."""
        task = str(x.get(self.by, DEFAULT_TASK))
        features = self._features(x)
        pred = self._one.predict(task, features)
        if pred is None:
            self._one.stale()
            return self._engine.predict([Event(task, None, features)]).pred
        return pred[None]

    def _rows(self, X: pd.DataFrame) -> list[dict[Any, Any]]:
        return [
            {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            for row in X.to_dict("records")
        ]


class LifelongClassifier(_Lifelong, base.MiniBatchClassifier):
    """Lifelong online classifier: a learner per task plus the knowledge base of the others, mixed per task.

    Parameters
    ----------
    by
        The feature that names an event's task (removed from the features).
    dim
        Buckets the other features are hashed into.
    n_classes
        2: a binary classifier over ``False``/``True`` labels. More: a multiclass classifier whose labels
        (any hashable values) take classes in order of first appearance, at most ``n_classes`` of them.
    engine
        Other ``engine`` settings of ``lifelong`` (``EngineConfig`` names), e.g. ``{"kb_capacity": 16}``.

    Examples
    --------
    >>> model = LifelongClassifier(dim=4)
    >>> model.predict_proba_one({"task": "a", "f": 1.0})
    {False: 0.5, True: 0.5}
    >>> for _ in range(20):
    ...     model.learn_one({"task": "a", "f": 1.0}, True)
    >>> model.predict_one({"task": "a", "f": 1.0})
    True
    """

    def __init__(self, by: str = "task", dim: int = 64, n_classes: int = 2, engine: dict[str, Any] | None = None):
        if n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes}")
        self.by = by
        self.dim = dim
        self.n_classes = n_classes
        self.engine = engine
        self._labels: list[Any] = [False, True] if n_classes == 2 else []
        self._build(task="binary" if n_classes == 2 else "multiclass", n_classes=n_classes)

    @property
    def _multiclass(self) -> bool:
        return self.n_classes > 2

    def _class(self, y: Any) -> int:
        if self.n_classes == 2:
            if isinstance(y, bool | np.bool_) or y in (0, 1):
                return int(bool(y))
            raise ValueError(
                f"a binary LifelongClassifier takes True/False labels, got {y!r} (set n_classes for other labels)"
            )
        if y not in self._labels:
            if len(self._labels) == self.n_classes:
                raise ValueError(f"label {y!r} would be class {self.n_classes + 1} of n_classes={self.n_classes}")
            self._labels.append(y)
        return self._labels.index(y)

    def _probas(self, pred: np.ndarray) -> list[dict[Any, float]]:
        seen = len(self._labels)
        if not seen:
            return [{} for _ in pred]
        kept = pred[:, :seen] / pred[:, :seen].sum(1, keepdims=True)
        return [dict(zip(self._labels, row, strict=True)) for row in kept.tolist()]

    def learn_one(self, x: dict[Any, Any], y: Any) -> None:
        """Learn one labelled event (its prediction is made and accounted first, as in ``lifelong``)."""
        self._learn(x, self._class(y))

    def predict_proba_one(self, x: dict[Any, Any], **kwargs: Any) -> dict[Any, float]:
        """Class probabilities of the labels seen so far (both ``False`` and ``True`` when binary)."""
        pred = self._predict(x)
        if self.n_classes == 2:  # ``_probas`` of one row, in plain floats
            p0, p1 = pred[0].tolist()
            return {False: p0 / (p0 + p1), True: p1 / (p0 + p1)}
        return self._probas(pred)[0]

    @_engine_threads
    def learn_many(self, X: pd.DataFrame, y: pd.Series) -> None:
        """Learn the rows in order, through the engine's batching (equal to ``learn_one`` row by row)."""
        self._one.stale()
        self._engine.process([self._event(x, self._class(label)) for x, label in zip(self._rows(X), y, strict=True)])

    @_engine_threads
    def predict_proba_many(self, X: pd.DataFrame) -> pd.DataFrame:
        """``predict_proba_one`` for every row, in one engine call."""
        import pandas as pd

        self._one.stale()
        rows = self._probas(self._engine.predict([self._event(x) for x in self._rows(X)]).pred)
        return pd.DataFrame(rows, index=X.index, columns=list(self._labels), dtype=float)


class LifelongRegressor(_Lifelong, base.MiniBatchRegressor):
    """Lifelong online regressor: a learner per task plus the knowledge base of the others, mixed per task.

    Parameters
    ----------
    by
        The feature that names an event's task (removed from the features).
    dim
        Buckets the other features are hashed into.
    target_range
        The range of the targets: the mixture's bound needs it (squared loss is mixable on a known
        range). Targets outside it are clipped into it.
    engine
        Other ``engine`` settings of ``lifelong`` (``EngineConfig`` names).

    Examples
    --------
    >>> model = LifelongRegressor(dim=4, target_range=(0.0, 10.0))
    >>> for i in range(50):
    ...     model.learn_one({"task": "a", "f": float(i % 5)}, 2.0 * (i % 5))
    >>> round(model.predict_one({"task": "a", "f": 3.0}))
    6
    """

    def __init__(
        self,
        by: str = "task",
        dim: int = 64,
        target_range: tuple[float, float] = (0.0, 1.0),
        engine: dict[str, Any] | None = None,
    ):
        if not target_range[0] < target_range[1]:
            raise ValueError(f"target_range must be (low, high) with low < high, got {target_range}")
        self.by = by
        self.dim = dim
        self.target_range = target_range
        self.engine = engine
        self._build(task="regression", target_range=tuple(map(float, target_range)))

    @classmethod
    def _unit_test_params(cls) -> Any:
        yield {"target_range": (0.0, 100.0)}  # River's regression checks use approval ratings in percent

    def _target(self, y: float) -> float:
        lo, hi = self.target_range
        return min(max(float(y), lo), hi)

    def learn_one(self, x: dict[Any, Any], y: float) -> None:
        """Learn one labelled event (its prediction is made and accounted first, as in ``lifelong``)."""
        self._learn(x, self._target(y))

    def predict_one(self, x: dict[Any, Any]) -> float:
        """The prediction for ``x``, without learning."""
        return float(self._predict(x)[0, 0])

    @_engine_threads
    def learn_many(self, X: pd.DataFrame, y: pd.Series) -> None:
        """Learn the rows in order, through the engine's batching (equal to ``learn_one`` row by row)."""
        self._one.stale()
        self._engine.process([self._event(x, self._target(t)) for x, t in zip(self._rows(X), y, strict=True)])

    @_engine_threads
    def predict_many(self, X: pd.DataFrame) -> pd.Series:
        """``predict_one`` for every row, in one engine call."""
        import pandas as pd

        self._one.stale()
        pred = self._engine.predict([self._event(x) for x in self._rows(X)]).pred[:, 0]
        return pd.Series(pred, index=X.index, dtype=float)
