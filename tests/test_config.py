import pytest

from lifelong.config import load_config
from lifelong.errors import ConfigError


def test_defaults_and_repo_config_are_valid():
    assert load_config(env={}).engine.kb_capacity > 0
    cfg = load_config("config.yaml", env={})
    assert cfg.kafka.events_topic


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("engine:\n  kb_capacty: 3\n", "engine.kb_capacty: unknown key"),
        ("engine:\n  kb_capacity: -1\n", "engine.kb_capacity: expected a positive number"),
        ("engine:\n  task: ranking\n", "engine.task: expected one of"),
        ("metrics:\n  port: http\n", "metrics.port: expected an integer"),
        ("engine:\n  target_range: [2, 1]\n", "engine.target_range"),
        ("kafak:\n  group_id: x\n", "kafak: unknown key"),
        ("kafka:\n  changelog_topic: ''\n", "set both"),
        ("engine:\n  backend: river\n", "river state cannot be shared"),
    ],
)
def test_bad_config_names_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_environment_overrides_every_contract_key():
    env = {
        "LIFELONG_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:19092",
        "LIFELONG_KAFKA__EVENTS_TOPIC": "ev",
        "LIFELONG_KAFKA__PREDICTIONS_TOPIC": "pr",
        "LIFELONG_KAFKA__DEAD_LETTER_TOPIC": "dl",
        "LIFELONG_KAFKA__GROUP_ID": "123",
        "LIFELONG_CHECKPOINT__DIR": "/var/lib/lifelong",
        "LIFELONG_METRICS__HOST": "0.0.0.0",
        "LIFELONG_METRICS__PORT": "9200",
    }
    cfg = load_config(env=env)
    assert (cfg.kafka.bootstrap_servers, cfg.kafka.events_topic, cfg.kafka.predictions_topic) == (
        "127.0.0.1:19092",
        "ev",
        "pr",
    )
    assert (cfg.kafka.dead_letter_topic, cfg.kafka.group_id) == ("dl", "123")
    assert (cfg.checkpoint.dir, cfg.metrics.host, cfg.metrics.port) == ("/var/lib/lifelong", "0.0.0.0", 9200)
    with pytest.raises(ConfigError, match="LIFELONG_METRICS__PORT|metrics.port"):
        load_config(env={"LIFELONG_METRICS__PORT": "lots"})


def test_secrets_are_redacted():
    cfg = load_config(env={"LIFELONG_KAFKA__SASL_PLAIN_PASSWORD": "hunter2"})
    assert cfg.kafka.sasl_plain_password == "hunter2"
    assert "hunter2" not in str(cfg.redacted())
