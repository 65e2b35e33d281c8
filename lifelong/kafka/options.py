"""Connection and security settings, in one place for every Kafka client the project opens."""

from __future__ import annotations

import logging
from typing import Any

from lifelong.config import Config


def client_options(cfg: Config) -> dict[str, Any]:
    """Connection and security settings shared by every client (SASL/SSL pass through)."""
    kafka_cfg = cfg.kafka
    opts: dict[str, Any] = {
        "bootstrap_servers": kafka_cfg.bootstrap_servers.split(","),
        "security_protocol": kafka_cfg.security_protocol,
    }
    for key in (
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
        "ssl_cafile",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
    ):
        value = getattr(kafka_cfg, key)
        if value is not None:
            opts[key] = value
    return opts


def confluent_options(cfg: Config) -> dict[str, Any]:
    """Connection and security settings in librdkafka's names (SASL/SSL pass through)."""
    kafka_cfg = cfg.kafka
    names = {
        "sasl_mechanism": "sasl.mechanism",
        "sasl_plain_username": "sasl.username",
        "sasl_plain_password": "sasl.password",
        "ssl_cafile": "ssl.ca.location",
        "ssl_certfile": "ssl.certificate.location",
        "ssl_keyfile": "ssl.key.location",
        "ssl_password": "ssl.key.password",
    }
    opts: dict[str, Any] = {
        "bootstrap.servers": kafka_cfg.bootstrap_servers,
        "security.protocol": kafka_cfg.security_protocol,
        "client.id": "lifelong",
        "log_level": 3,  # librdkafka's own errors only: its notices of closed connections are not ours to show
        "logger": logging.getLogger("confluent_kafka"),
    }
    opts.update({name: getattr(kafka_cfg, key) for key, name in names.items() if getattr(kafka_cfg, key) is not None})
    return opts
