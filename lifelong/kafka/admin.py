"""Topic administration at start-up: the topics the daemon needs, and the group's committed offsets."""

from __future__ import annotations

import logging
import time

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from lifelong.config import Config
from lifelong.errors import LifelongError
from lifelong.kafka.options import client_options


def _admin(cfg: Config) -> KafkaAdminClient:
    """An admin client for the start-up checks. While it connects the client would log every refused attempt:
    an unreachable broker is one line, ours."""
    client_log = logging.getLogger("kafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        return KafkaAdminClient(client_id="lifelong-admin", request_timeout_ms=15000, **client_options(cfg))
    except KafkaError as exc:
        raise LifelongError(f"cannot reach Kafka at {cfg.kafka.bootstrap_servers}: {exc!r}") from None
    finally:
        client_log.setLevel(level)


def committed_offsets(cfg: Config) -> dict[int, int]:
    """The group's committed offsets on the events topic, by partition (empty for a new group)."""
    admin = _admin(cfg)
    try:
        got = admin.list_group_offsets(cfg.kafka.group_id).get(cfg.kafka.group_id, {})
    except KafkaError as exc:
        raise LifelongError(f"cannot read the committed offsets of group {cfg.kafka.group_id!r}: {exc!r}") from None
    finally:
        admin.close()
    return {tp.partition: o.offset for tp, o in got.items() if tp.topic == cfg.kafka.events_topic and o.offset >= 0}


def ensure_topics(cfg: Config) -> None:
    """Create the events, predictions and dead-letter topics (and the knowledge and changelog topics for
    scale-out) when missing (``kafka.create_topics``); check that the changelog has a partition for each
    events partition."""
    kafka_cfg = cfg.kafka
    admin = _admin(cfg)
    try:
        existing = set(admin.list_topics())
        compact = {"cleanup.policy": "compact", "min.compaction.lag.ms": str(24 * 3600 * 1000)}
        wanted: dict[str, tuple[int, dict[str, str]]] = {
            kafka_cfg.events_topic: (kafka_cfg.partitions, {}),
            kafka_cfg.predictions_topic: (1, {}),
            kafka_cfg.dead_letter_topic: (1, {}),
        }
        if kafka_cfg.knowledge_topic:
            wanted[kafka_cfg.knowledge_topic] = (1, compact)  # one partition: one order of members for every replica
            # partition p holds the tasks of events partition p; only each task's newest record is needed
            wanted[kafka_cfg.changelog_topic] = (kafka_cfg.partitions, {"cleanup.policy": "compact"})
        missing = [t for t in wanted if t not in existing]
        if missing and not kafka_cfg.create_topics:
            raise LifelongError(f"topics {missing} do not exist and kafka.create_topics is false")
        for topic in missing:
            n, configs = wanted[topic]
            if topic == kafka_cfg.changelog_topic:  # as many partitions as the events topic really has
                n = _partitions(admin, kafka_cfg.events_topic)
            try:
                admin.create_topics([NewTopic(topic, n, 1, topic_configs=configs)])
            except TopicAlreadyExistsError:
                pass
            except KafkaError as exc:
                raise LifelongError(f"the broker refused to create topic {topic!r}: {exc!r}") from None
        if kafka_cfg.changelog_topic and (n_cl := _partitions(admin, kafka_cfg.changelog_topic)) < (
            n_ev := _partitions(admin, kafka_cfg.events_topic)
        ):
            raise LifelongError(
                f"topic {kafka_cfg.changelog_topic!r} has {n_cl} partitions, fewer than the {n_ev} of "
                f"{kafka_cfg.events_topic!r}: give it {n_ev} (its partition p holds the tasks of events "
                f"partition p)"
            )
    finally:
        admin.close()


def _partitions(admin: KafkaAdminClient, topic: str, wait_s: float = 15.0) -> int:
    """Partitions of ``topic`` (a topic just created may take a moment to be described)."""
    deadline = time.monotonic() + wait_s
    while True:
        n = max((len(d.get("partitions") or []) for d in admin.describe_topics([topic])), default=0)
        if n or time.monotonic() > deadline:
            return n
        time.sleep(0.2)
