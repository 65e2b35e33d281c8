"""Configuration: one frozen, validated object, loaded from YAML and overridden by environment."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lifelong.errors import ConfigError

ENV_PREFIX = "LIFELONG_"
SECRET_KEYS = {"sasl_plain_password", "ssl_password"}


@dataclass(frozen=True)
class KafkaConfig:
    """``kafka``: brokers, topics, the consumer group, security and client limits."""

    bootstrap_servers: str = "127.0.0.1:9092"
    # kafka-python | confluent (librdkafka, the optional extra lifelong[confluent]: several times the events/s of
    # one replica; README "Choosing a Kafka client")
    client: str = "kafka-python"
    events_topic: str = "lifelong-events"
    predictions_topic: str = "lifelong-predictions"
    dead_letter_topic: str = "lifelong-dlq"
    group_id: str = "lifelong"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    session_timeout_ms: int = 10000
    max_poll_interval_ms: int = 300000
    max_message_bytes: int = 1_000_000
    create_topics: bool = True
    partitions: int = 1
    # Scale-out (README "Scaling out"): KB members and task state shared through these topics; both "" =
    # one standalone replica.
    knowledge_topic: str = "lifelong-knowledge"
    changelog_topic: str = "lifelong-changelog"


@dataclass(frozen=True)
class EngineConfig:
    """``engine``: the task kind, learners, knowledge base and mixing (see the comments per key)."""

    task: str = "binary"  # binary | multiclass | regression
    n_classes: int = 2
    target_range: tuple[float, float] = (0.0, 1.0)  # regression only
    dim: int = 0  # feature dimension; 0 = taken from the first dense event
    backend: str = "torch"  # torch | river
    model: str = "logistic"  # torch: logistic | mlp
    hidden: int = 32  # mlp hidden units
    optimizer: str = "auto"  # torch: ekf | adagrad | auto (ekf for linear models up to 256 features)
    lr: float = 0.5  # AdaGrad step size
    prior_var: float = 1.0  # EKF prior variance of each weight
    river_model: str = "river.linear_model.LogisticRegression"
    river_params: dict[str, Any] = field(default_factory=dict)
    mixing: str = "auto"  # auto (log loss eta=1 / squared: aggregating algorithm) | hedge (anytime Hedge, abs. loss)
    kb_capacity: int = 64
    snapshot_every: int = 50  # learned events of a task between KB snapshots; 0 = only on control end
    # also snapshot a task at these labelled counts: tasks of a few dozen events feed the KB too ([]: only
    # snapshot_every)
    snapshot_at: tuple[int, ...] = (20, 40)
    publish_every: int = 1024  # staged snapshots join the KB every this many engine events
    duplicate_cosine: float = 0.999  # a snapshot this close to a member of another task is dropped
    basis: bool = True  # ELLA-style basis expert over linear members
    # the live shared level (EKF learners only): a pooled learner fed by every labelled event of every task and a
    # mixed-effects learner per task, both in every task's top mixture; the pooled mean is also a KB member
    # refreshed at each publication and the prior mean new tasks' learners start from
    population: bool = True
    # new tasks' EKF learners start from the KB members' weight covariance (empirical Bayes), not prior_var x I
    task_prior: bool = True
    basis_rank: int = 8
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"
    seed: int = 0
    tasks: tuple[str, ...] = ()  # when set, events of other tasks are refused
    # a guard against runaway task names (e.g. a timestamp keyed as a task): events of further new tasks are
    # dead-lettered. Tasks beyond max_resident_tasks live in the on-disk task store, not in memory.
    max_tasks: int = 100_000_000
    # tasks held in the engine's tensors (about 3 KB each at dim 20); the least recently used others live in the
    # task store (RocksDB) on disk and are read back when their next event comes
    max_resident_tasks: int = 100_000
    # torch CPU threads of a `lifelong run` or `lifelong evaluate` process, and of the River estimators' engine
    # calls (the caller's setting restored after) (0: as they are; torch's default is one per core). The engine's
    # batched operations are small: more threads mostly spin (and wait on the task store's background threads),
    # and replicas sharing a machine oversubscribe it.
    threads: int = 1


@dataclass(frozen=True)
class BatchingConfig:
    """``batching``: the largest micro-batch (a batch takes what has arrived, up to ``max_events``: large under
    load, small when the stream is slow), the longest the broker holds a fetch, and the poll loop's queue."""

    max_events: int = 1024
    max_ms: int = 10
    queue_batches: int = 4


@dataclass(frozen=True)
class CheckpointConfig:
    """``checkpoint``: where and how often state is saved, and how many files are kept."""

    dir: str = "./state"
    interval_s: float = 10.0
    keep: int = 2


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics``: the HTTP address of /metrics, /healthz, /readyz, and the per-task label cap."""

    host: str = "127.0.0.1"
    port: int = 9108
    max_task_labels: int = 50


@dataclass(frozen=True)
class LabelsConfig:
    """``labels``: how long and how many predictions wait for their delayed label, and which event times are
    trusted (README "Delayed labels and event time")."""

    pending_ttl_s: float = 3600.0
    pending_max: int = 100_000
    max_future_s: float = 300.0  # an event time beyond this machine's clock plus this is not trusted
    max_lateness_s: float = 600.0  # nor one older than its partition's event time by more than this
    idle_partition_s: float = 60.0  # a partition without events this long stops holding expiry back


@dataclass(frozen=True)
class LoggingConfig:
    """``logging``: level and format (JSON lines for log shippers)."""

    level: str = "INFO"
    json: bool = False


@dataclass(frozen=True)
class Config:
    """The whole configuration, validated, frozen; every key overridable by ``LIFELONG_SECTION__KEY``."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    shutdown_grace_s: float = 30.0

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as a dict, secrets replaced by ``***``."""
        out = dataclasses.asdict(self)
        for key in SECRET_KEYS:
            if out["kafka"].get(key):
                out["kafka"][key] = "***"
        return out


CHOICES = {
    "engine.task": {"binary", "multiclass", "regression"},
    "engine.backend": {"torch", "river"},
    "engine.model": {"logistic", "mlp"},
    "engine.optimizer": {"auto", "ekf", "adagrad"},
    "engine.mixing": {"auto", "hedge"},
    "engine.device": {"auto", "cpu", "cuda"},
    "engine.dtype": {"float32", "float64"},
    "logging.level": {"DEBUG", "INFO", "WARNING", "ERROR"},
    "kafka.client": {"kafka-python", "confluent"},
    "kafka.security_protocol": {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"},
}
POSITIVE = {
    "engine.n_classes",
    "engine.lr",
    "engine.kb_capacity",
    "engine.publish_every",
    "engine.basis_rank",
    "engine.prior_var",
    "engine.hidden",
    "engine.max_tasks",
    "engine.max_resident_tasks",
    "batching.max_events",
    "batching.max_ms",
    "batching.queue_batches",
    "checkpoint.interval_s",
    "checkpoint.keep",
    "metrics.max_task_labels",
    "labels.pending_ttl_s",
    "labels.pending_max",
    "labels.max_future_s",
    "labels.max_lateness_s",
    "labels.idle_partition_s",
    "kafka.session_timeout_ms",
    "kafka.max_poll_interval_ms",
    "kafka.max_message_bytes",
    "kafka.partitions",
    "shutdown_grace_s",
}


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; strings from the environment are parsed as YAML."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, value, args[0])
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if items and items[-1] is Ellipsis:
            return tuple(_coerce(f"{path}[{i}]", v, items[0]) for i, v in enumerate(value))
        if len(value) != len(items):
            raise ConfigError(f"{path}: expected a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, items, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        path = f"{prefix}{name}"
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, path + ".")
        else:
            kwargs[name] = _coerce(path, value, tp)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    for path, allowed in CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{path}: expected one of {sorted(allowed)}, got {value!r}")
    for path in POSITIVE:
        parts = path.split(".")
        value = getattr(getattr(cfg, parts[0]), parts[1]) if len(parts) == 2 else getattr(cfg, parts[0])
        if value <= 0:
            raise ConfigError(f"{path}: expected a positive number, got {value!r}")
    e = cfg.engine
    if e.dim < 0:
        raise ConfigError(f"engine.dim: expected 0 (infer) or a positive integer, got {e.dim}")
    if e.threads < 0:
        raise ConfigError(f"engine.threads: expected 0 (one per core) or a positive integer, got {e.threads}")
    if any(n <= 0 for n in e.snapshot_at):
        raise ConfigError(f"engine.snapshot_at: expected positive labelled counts, got {list(e.snapshot_at)}")
    if e.snapshot_every < 0:
        raise ConfigError(f"engine.snapshot_every: expected 0 or a positive integer, got {e.snapshot_every}")
    if e.task == "multiclass" and e.n_classes < 2:
        raise ConfigError(f"engine.n_classes: expected at least 2 for multiclass, got {e.n_classes}")
    if e.target_range[0] >= e.target_range[1]:
        raise ConfigError(f"engine.target_range: expected [low, high] with low < high, got {e.target_range}")
    if not 0 < e.duplicate_cosine <= 1:
        raise ConfigError(f"engine.duplicate_cosine: expected a number in (0, 1], got {e.duplicate_cosine}")
    kafka_cfg = cfg.kafka
    if bool(kafka_cfg.knowledge_topic) != bool(kafka_cfg.changelog_topic):
        raise ConfigError("kafka.knowledge_topic and kafka.changelog_topic: set both (scale-out) or neither")
    if kafka_cfg.knowledge_topic and e.backend == "river":
        raise ConfigError(
            "engine.backend: river state cannot be shared between replicas safely; set "
            'kafka.knowledge_topic and kafka.changelog_topic to "" (one standalone replica)'
        )
    if not 0 < cfg.metrics.port < 65536:
        raise ConfigError(f"metrics.port: expected a port number 1-65535, got {cfg.metrics.port}")


def _apply_env(data: dict[str, Any], env: typing.Mapping[str, str]) -> None:
    """``LIFELONG_SECTION__KEY=value`` overrides ``section.key``; the value is parsed as YAML."""
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"{name}: expected LIFELONG_SECTION__KEY or LIFELONG_KEY")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: not a valid value ({exc})") from None
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and parts[-1]
            in {
                "bootstrap_servers",
                "group_id",
                "sasl_plain_password",
                "sasl_plain_username",
                "ssl_password",
            }
        ):
            value = raw  # these are strings even when they look like numbers
        target = data
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{name}: {part} is not a section")
        target[parts[-1]] = value


def load_config(
    path: str | Path | None = None, env: typing.Mapping[str, str] | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Load ``path`` (or the defaults), apply environment overrides, then ``overrides``, and validate.

    >>> load_config(env={"LIFELONG_ENGINE__KB_CAPACITY": "8"}).engine.kb_capacity
    8
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        data = loaded or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
    _apply_env(data, os.environ if env is None else env)
    for dotted, value in (overrides or {}).items():
        target = data
        *sections, key = dotted.split(".")
        for s in sections:
            target = target.setdefault(s, {})
        target[key] = value
    cfg: Config = _build(Config, data, "")
    _validate(cfg)
    return cfg


def replace(cfg: Config, **changes: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with some section keys changed, e.g. ``replace(cfg, engine={"dim": 8})``."""
    sections = {name: dataclasses.replace(getattr(cfg, name), **values) for name, values in changes.items()}
    new = dataclasses.replace(cfg, **sections)
    _validate(new)
    return new
