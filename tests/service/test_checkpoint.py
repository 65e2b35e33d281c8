import logging

import pytest

from lifelong.errors import StateError
from lifelong.service import checkpoint

from conftest import make_stream


def test_files_are_private_and_only_the_newest_are_kept(engine_factory, tmp_path):
    engine = engine_factory()
    for _ in range(4):
        engine.process(make_stream(n_tasks=2, per_task=5))
        path = checkpoint.save_engine(engine, tmp_path, keep=2)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["checkpoint-000000000003.ckpt", "checkpoint-000000000004.ckpt"]
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_a_corrupt_checkpoint_is_refused_and_the_previous_one_used(engine_factory, tmp_path, caplog, damage):
    engine = engine_factory()
    engine.process(make_stream(n_tasks=2, per_task=5))
    good = checkpoint.save_engine(engine, tmp_path, extra={"offsets": [["t", 0, 10]]})
    engine.process(make_stream(n_tasks=2, per_task=5, seed=1))
    bad = checkpoint.save_engine(engine, tmp_path, extra={"offsets": [["t", 0, 20]]})
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        bad.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        bad.write_bytes(b"garbage" + data)
    with caplog.at_level(logging.ERROR):
        path, _, meta = checkpoint.latest(tmp_path)
    assert path == good and meta["extra"]["offsets"] == [["t", 0, 10]]
    assert "refusing checkpoint" in caplog.text and bad.name in caplog.text
    with pytest.raises(StateError):
        checkpoint.read(bad)


def test_no_checkpoint_at_all(tmp_path):
    assert checkpoint.latest(tmp_path / "none") is None
