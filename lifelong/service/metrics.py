"""Prometheus metrics (prefix ``lifelong_``): what the daemon observes, and a collector of engine values.

Values derived from engine state (losses, regrets and their bounds, weights, KB size) come from a custom
collector whose families the processing loop refreshes about once a second, where the engine is consistent
(``EngineCollector.refresh``); a scrape reads that snapshot and a few lock-free daemon values (lag, checkpoint
age, readiness), so it never waits for a batch or a checkpoint, even during a broker outage. Per-task series exist
for at most ``metrics.max_task_labels`` tasks (the most active that are not archived); the rest are summed
under ``task="_other"``. A task that ended (``control: end``, archived into the KB) drops its series.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from lifelong.config import Config
from lifelong.core.engine import Engine
from lifelong.core.tasks import STAT, STATS
from lifelong.service.status import Status

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DELAY_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
PREDICTORS = (("combined", "loss", "errors"), ("local", "loss_local", "errors_local"), ("kb", "loss_kb", "errors_kb"))
OTHER = "_other"


class Metrics:
    """Metrics observed directly by the daemon, plus the collector of engine-derived values."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.batch_seconds = Histogram(
            "lifelong_batch_seconds",
            "Time to decode, predict, learn and send one micro-batch",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.end_to_end = BatchHistogram(
            "lifelong_end_to_end_seconds",
            "From an event's Kafka timestamp to its prediction being sent",
            LATENCY_BUCKETS,
            registry,
        )
        self.label_delay = BatchHistogram(
            "lifelong_label_delay_seconds",
            "From a prediction to its delayed label (event time)",
            DELAY_BUCKETS,
            registry,
        )
        self.poll_interval = Histogram(
            "lifelong_poll_interval_seconds", "Time between consumer polls", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.dead_letters = Counter(
            "lifelong_dead_letters",
            "Events sent to the dead-letter topic, by the field that was wrong",
            ["field"],
            registry=registry,
        )
        self.checkpoint_seconds = Histogram(
            "lifelong_checkpoint_seconds",
            "Time to write one checkpoint (changed tasks, store snapshot, global state; offsets committed after)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.checkpoint_bytes = Counter(
            "lifelong_checkpoint_bytes",
            "Bytes checkpoints wrote: their files plus the rows of the tasks changed since the one before",
            registry=registry,
        )
        self.checkpoint_tasks = Counter(
            "lifelong_checkpoint_tasks", "Task rows written to the task store by checkpoints", registry=registry
        )
        self.checkpoints = Counter(
            "lifelong_checkpoints", "Checkpoints written, by result", ["result"], registry=registry
        )
        for result in ("ok", "failed"):
            self.checkpoints.labels(result)
        # Scale-out (knowledge and changelog topics)
        self.knowledge_refused = Counter(
            "lifelong_knowledge_refused",
            "Knowledge-topic records refused (never loaded), by reason",
            ["reason"],
            registry=registry,
        )
        for reason in ("not_lifelong", "malformed", "shape", "not_finite", "too_large"):
            self.knowledge_refused.labels(reason)
        self.changelog_bytes = Counter(
            "lifelong_changelog_bytes", "Bytes of task state written to the changelog", registry=registry
        )
        self.tasks_restored = Counter(
            "lifelong_tasks_restored",
            "Tasks restored from the changelog after gaining their partition",
            registry=registry,
        )
        self.restore_seconds = Histogram(
            "lifelong_restore_seconds",
            "Time to take over one gained partition (changelog read and task restore)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class BatchHistogram:
    """A histogram observed a batch of values at a time (one array operation, not a call per event): the
    per-event ones. Exposed as Prometheus' own (``_bucket``, ``_count``, ``_sum``)."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name, self.doc = name, doc
        self.bounds = np.array(buckets, np.float64)
        self.counts = np.zeros(len(buckets) + 1, np.int64)  # per bucket, the last one +Inf
        self.sum = 0.0
        self.lock = threading.Lock()
        registry.register(self)

    def observe(self, values: np.ndarray) -> None:
        """Count ``values`` (seconds, none NaN)."""
        if not len(values):
            return
        hits = np.bincount(np.searchsorted(self.bounds, values), minlength=len(self.counts))
        with self.lock:
            self.counts += hits
            self.sum += float(values.sum())

    def collect(self) -> Iterable[Metric]:
        """The histogram's family (the registry's scrape)."""
        with self.lock:
            below, total = self.counts.cumsum().tolist(), self.sum
        edges = [repr(b) for b in self.bounds.tolist()] + ["+Inf"]
        yield HistogramMetricFamily(self.name, self.doc, buckets=list(zip(edges, below, strict=True)), sum_value=total)


class Observed(Protocol):
    """What the collector reads of the daemon it reports on."""

    cfg: Config
    engine: Engine
    dead_lettered: int

    def archived_tasks(self) -> set[int]:
        """Resident tasks (rows) that ended: no per-task series."""

    def foreign_tasks(self) -> set[int]:
        """Tasks of partitions another replica owns now."""

    def status(self) -> Status:
        """The health reading, taken without the processing lock."""


class EngineCollector:
    """Engine-derived families as of the last ``refresh``, plus lock-free daemon values (module docstring)."""

    def __init__(self, daemon: Observed):
        self.daemon = daemon
        self.families: list[Metric] = []

    def refresh(self) -> None:
        """Take the engine's values now: call where the engine is not changing (the processing loop)."""
        daemon = self.daemon
        self.families = list(
            _engine_families(
                daemon.engine,
                daemon.archived_tasks(),
                daemon.foreign_tasks(),
                daemon.cfg.metrics.max_task_labels,
                daemon.dead_lettered,
            )
        )

    def collect(self) -> Iterable[Metric]:
        """The engine families of the last refresh, then the daemon's values now."""
        yield from self.families
        yield from _daemon_families(self.daemon)


def _counter(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    """A counter family with one sample per value of ``label``."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in values.items():
        family.add_metric([value], count)
    return family


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _engine_families(
    engine: Engine, archived: set[int], foreign: set[int], cap: int, dead_lettered: int
) -> Iterable[Metric]:
    """``archived``: ended tasks (no per-task series); ``foreign``: tasks of partitions another replica owns
    now (scale-out): left out of the regret gauges and per-task series, which only a task's owner exports."""
    yield from _event_families(engine, dead_lettered)
    reg = _regrets(engine, foreign)
    yield from _regret_families(reg)
    yield from _task_families(engine, reg, archived, foreign, cap)
    yield from _kb_families(engine)


def _event_families(engine: Engine, dead_lettered: int) -> Iterable[Metric]:
    """Events by outcome, resets, and the cumulative loss and mistakes of each predictor."""
    c = engine.counters
    events = CounterMetricFamily("lifelong_events", "Events processed, by outcome", labels=["outcome"])
    for outcome, value in (
        ("predicted", c["predicted"]),
        ("learned", c["learned"]),
        ("dead_lettered", dead_lettered),
        ("label_expired", c["label_expired"]),
        ("label_unmatched", c["label_unmatched"]),
        ("control", c["controls"]),
        ("duplicate", c["duplicates"]),
    ):
        events.add_metric([outcome], value)
    yield events
    yield CounterMetricFamily(
        "lifelong_pending_replaced",
        "Predictions waiting for a label replaced by a later prediction-only event with the same task and id",
        value=c["pending_replaced"],
    )
    yield _counter(
        "lifelong_task_resets",
        "Task learners (or basis codes) that held a non-finite value and restarted untrained",
        "reason",
        {"learner_not_finite": c["reset_learner"], "code_not_finite": c["reset_code"]},
    )
    yield _counter(
        "lifelong_event_time_clamped",
        "Events whose time was not trusted (beyond this machine's clock, or too late) and was replaced",
        "reason",
        {"future": c["time_future"], "late": c["time_late"]},
    )
    loss = CounterMetricFamily(
        "lifelong_loss",
        "Cumulative loss (log loss, or squared loss for regression) of each predictor",
        labels=["predictor"],
    )
    mistakes = CounterMetricFamily(
        "lifelong_mistakes",
        "Cumulative mistakes (squared error for regression) of each predictor",
        labels=["predictor"],
    )
    total = engine.residency.stats_total()  # tasks in the task store included: the counters never go down
    for name, loss_col, err_col in PREDICTORS:
        loss.add_metric([name], float(total[STAT[loss_col]]))
        mistakes.add_metric([name], float(total[STAT[err_col]]))
    yield loss
    yield mistakes


def _regrets(engine: Engine, foreign: set[int]) -> dict[str, np.ndarray]:
    """Each resident task's regrets and bounds (zero for tasks another replica owns now)."""
    n = engine.n_tasks
    reg = engine.regrets() if n else {k: np.zeros(0) for k in ("top", "top_bound", "kb", "kb_bound")}
    if foreign:
        mine = np.ones(n, bool)
        mine[list(foreign)] = False
        reg = {k: np.where(mine, v, 0.0) for k, v in reg.items()}
    return reg


def _regret_families(reg: dict[str, np.ndarray]) -> Iterable[Metric]:
    """Regrets and their bounds summed over tasks, and the tasks over their bound."""
    regret = _gauge(
        "lifelong_regret",
        "Regret summed over resident tasks: combined vs better level (top), KB level vs its best expert (kb)",
        ["level"],
    )
    bound = _gauge("lifelong_regret_bound", "The theoretical bound of lifelong_regret (summed over tasks)", ["level"])
    over = _gauge("lifelong_regret_over_bound_tasks", "Tasks whose regret exceeds its bound (should be 0)", ["level"])
    for level in ("top", "kb"):
        regret.add_metric([level], float(reg[level].sum()))
        bound.add_metric([level], float(reg[f"{level}_bound"].sum()))
        over.add_metric([level], float((~(reg[level] <= reg[f"{level}_bound"] + 1e-6)).sum()))  # NaN counts
    yield from (regret, bound, over)


def _task_families(
    engine: Engine, reg: dict[str, np.ndarray], archived: set[int], foreign: set[int], cap: int
) -> Iterable[Metric]:
    """Per-task series for the ``cap`` most active live tasks, the rest summed under ``task="_other"``."""
    n = engine.n_tasks
    stats = engine.task_stats() if n else np.zeros((0, len(STATS)))
    counts = np.array(engine.n_labelled, np.int64)
    live = np.array([i for i in range(n) if i not in archived and i not in foreign], np.int64)
    top = live[np.argsort(-counts[live], kind="stable")[:cap]] if len(live) else live
    others = np.setdiff1d(np.array([i for i in range(n) if i not in foreign], np.int64), top)
    weights = engine.local_weights() if n else np.zeros(0)
    t_regret = _gauge("lifelong_task_regret", "Regret of one task (capped set of tasks)", ["task", "level"])
    t_bound = _gauge("lifelong_task_regret_bound", "Bound of lifelong_task_regret", ["task", "level"])
    t_error = _gauge("lifelong_task_error_ratio", "Cumulative error of one task per predictor", ["task", "predictor"])
    t_learned = CounterMetricFamily("lifelong_task_learned", "Labelled events learned by one task", labels=["task"])
    t_weight = _gauge(
        "lifelong_expert_weight", "Top-level mixture weight of each level for one task", ["task", "expert"]
    )
    groups = [(engine.tasks.names[i], np.array([i])) for i in top.tolist()]
    if len(others):
        groups.append((OTHER, others))
    for name, rows in groups:
        learned = int(counts[rows].sum())
        t_learned.add_metric([name], learned)
        for level in ("top", "kb"):
            t_regret.add_metric([name, level], float(reg[level][rows].sum()))
            t_bound.add_metric([name, level], float(reg[f"{level}_bound"][rows].sum()))
        for pred, _, err_col in PREDICTORS:
            t_error.add_metric([name, pred], float(stats[rows, STAT[err_col]].sum() / max(1, learned)))
        w = float(weights[rows].mean())
        t_weight.add_metric([name, "local"], w)
        t_weight.add_metric([name, "kb"], 1.0 - w)
    yield from (t_regret, t_bound, t_error, t_learned, t_weight)


def _kb_families(engine: Engine) -> Iterable[Metric]:
    """The KB's size and changes, the tasks known and resident, the task store, pending labels."""
    c, n = engine.counters, engine.n_tasks
    kb = engine.kb
    yield GaugeMetricFamily("lifelong_kb_members", "Members in the knowledge base", value=kb.size)
    yield GaugeMetricFamily("lifelong_kb_capacity", "Capacity of the knowledge base", value=kb.capacity)
    store_bytes = sum(v.numel() * v.element_size() for v in kb.store.values()) if isinstance(kb.store, dict) else 0
    yield GaugeMetricFamily("lifelong_kb_bytes", "Memory of the KB member parameters", value=store_bytes)
    changes = CounterMetricFamily("lifelong_kb_changes", "KB membership changes", labels=["change"])
    for change, key in (
        ("added", "added"),
        ("replaced", "replaced"),
        ("evicted", "evicted"),
        ("duplicate", "duplicates"),
    ):
        changes.add_metric([change], kb.counts[key])
    changes.add_metric(["not_finite"], c["snapshots_not_finite"])  # refused: the KB never holds such a member
    yield changes
    yield GaugeMetricFamily(
        "lifelong_tasks", "Tasks known to the engine (resident or in the task store)", value=engine.n_known
    )
    yield GaugeMetricFamily(
        "lifelong_tasks_resident", "Tasks in the engine's tensors (at most engine.max_resident_tasks)", value=n
    )
    store = engine.residency.store
    yield GaugeMetricFamily(
        "lifelong_tasks_stored", "Tasks with a row in the on-disk task store", value=store.count if store else 0
    )
    yield GaugeMetricFamily(
        "lifelong_task_store_bytes", "Bytes of the task store on disk", value=store.size_bytes() if store else 0
    )
    yield GaugeMetricFamily(
        "lifelong_task_row_bytes", "Bytes of one task's row in the task store", value=store.width if store else 0
    )
    yield _counter(
        "lifelong_task_moves",
        "Tasks moved between memory and the task store, by direction",
        "direction",
        {"evicted": c["tasks_evicted"], "loaded": c["tasks_loaded"]},
    )
    yield GaugeMetricFamily(
        "lifelong_pending_labels", "Predictions waiting for their label", value=len(engine.arrivals.pending)
    )


def _daemon_families(d: Observed) -> Iterable[Metric]:
    """The daemon's values, from one ``Daemon.status`` reading (taken without its lock)."""
    s = d.status()
    lag = _gauge("lifelong_consumer_lag", "High watermark minus the next offset to process", ["partition"])
    committed = _gauge("lifelong_committed_offset", "Last committed offset", ["partition"])
    for p, n in s.lag.items():
        lag.add_metric([str(p)], n)
    for p, off in s.committed.items():
        committed.add_metric([str(p)], off)
    yield lag
    yield committed
    yield GaugeMetricFamily(
        "lifelong_checkpoint_age_seconds", "Seconds since the last checkpoint", value=s.checkpoint_age_s
    )
    yield GaugeMetricFamily(
        "lifelong_checkpoint_interval_seconds", "Configured checkpoint.interval_s", value=d.cfg.checkpoint.interval_s
    )
    yield GaugeMetricFamily(
        "lifelong_ready",
        "1 when assigned, restored, checkpoints succeed and the broker is reachable",
        value=float(s.ready),
    )
    yield GaugeMetricFamily(
        "lifelong_checkpoint_failing",
        "1 while the last checkpoint failed (processing waits and retries)",
        value=float(s.checkpoint_error is not None),
    )
    yield CounterMetricFamily(
        "lifelong_dead_letter_failures",
        "Dead letters that could not be delivered (logged with their source offset; the event is skipped)",
        value=s.dead_letter_failures,
    )
