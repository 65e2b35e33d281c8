"""Helpers for the broker tests: a real tansu broker, producers and readers of whole topics, daemons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from lifelong.config import Config, load_config
from lifelong.service.daemon import Daemon
from lifelong.tools.broker import free_port

ROOT = Path(__file__).parent.parent


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def settings(bootstrap: str, tmp_path: Path, shared: bool = False, **overrides: Any) -> dict[str, Any]:
    """Config overrides for one test: unique topics and group, its own state dir and metrics port; one
    standalone replica unless ``shared`` (knowledge and changelog topics)."""
    tag = uuid.uuid4().hex[:8]
    base = {
        "kafka.bootstrap_servers": bootstrap,
        "kafka.events_topic": f"ev-{tag}",
        "kafka.predictions_topic": f"pred-{tag}",
        "kafka.dead_letter_topic": f"dlq-{tag}",
        "kafka.group_id": f"g-{tag}",
        "kafka.session_timeout_ms": 6000,
        "engine.dim": 3,
        "engine.kb_capacity": 8,
        "engine.snapshot_every": 10,
        "engine.publish_every": 64,
        "checkpoint.dir": str(tmp_path / "state"),
        "checkpoint.interval_s": 0.5,
        "metrics.port": free_port(),
        "shutdown_grace_s": 10.0,
        "kafka.knowledge_topic": f"kb-{tag}" if shared else "",
        "kafka.changelog_topic": f"cl-{tag}" if shared else "",
    }
    base.update(overrides)
    return base


def config(values: dict[str, Any]) -> Config:
    return load_config(env={}, overrides=values)


def write_config(values: dict[str, Any], path: Path) -> Path:
    nested: dict[str, Any] = {}
    for dotted, value in values.items():
        target = nested
        *sections, key = dotted.split(".")
        for s in sections:
            target = target.setdefault(s, {})
        target[key] = value
    path.write_text(yaml.safe_dump(nested))
    return path


def produce(
    bootstrap: str,
    topic: str,
    payloads: list[bytes],
    keys: list[bytes] | None = None,
    timestamps_ms: list[int] | None = None,
) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    for i, p in enumerate(payloads):
        stamp = timestamps_ms[i] if timestamps_ms else None
        producer.send(topic, key=keys[i] if keys else b"k", value=p, timestamp_ms=stamp)
    producer.flush()
    producer.close()


def events_json(events: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(e).encode() for e in events]


def read_topic(
    bootstrap: str, topic: str, at_least: int, timeout: float = 60.0, ids: set[str] | None = None
) -> list[Any]:
    """Every record of ``topic`` (partition 0) once at least ``at_least`` are there and, with ``ids``, once
    records with every one of these ids are (replays add duplicates: a count alone can be reached early)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=500)
    tp = TopicPartition(topic, 0)
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        wait_until(lambda: topic in consumer.topics(), timeout, what=f"topic {topic}")
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)

        def missing() -> bool:
            return ids is not None and not ids <= {json.loads(r.value).get("id") for r in records}

        while (len(records) < at_least or missing()) and time.monotonic() < deadline:
            for rs in consumer.poll(timeout_ms=300).values():
                records.extend(rs)
    finally:
        consumer.close()
    lost = sorted(ids - {json.loads(r.value).get("id") for r in records}) if ids is not None else []
    assert len(records) >= at_least and not lost, (
        f"{topic}: {len(records)} records, expected at least {at_least}; {len(lost)} ids missing: {lost[:20]}"
    )
    return records


class ThreadDaemon:
    """A Daemon running in a thread of the test process."""

    def __init__(self, cfg: Config, **kwargs: Any):
        self.daemon = Daemon(cfg, **kwargs)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.daemon.run()

    def __enter__(self) -> Daemon:
        self.thread.start()
        return self.daemon

    def __exit__(self, *exc: object) -> None:
        self.daemon.stop()
        self.thread.join(30)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""  # not listening (yet)


def metric(port: int, name: str, labels: str = "") -> float | None:
    _, body = http_get(port, "/metrics")
    for line in body.splitlines():
        if line.startswith(name + ("{" + labels + "}" if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    return None


def start_process(config_path: Path, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "lifelong", "run", "--config", str(config_path)],
        cwd=ROOT,
        env=env,
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
    )
