import dataclasses
import json

from lifelong import checkpoint
from lifelong.cli import main
from lifelong.config import load_config
from lifelong.engine import Engine
from lifelong.evaluate import read_events


def test_generate_then_evaluate_reports_every_field(tmp_path, capsys):
    stream = tmp_path / "related.jsonl"
    assert main(["generate", "--kind", "related", "--out", str(stream), "--tasks", "80", "--events", "60",
                 "--dim", "10", "--seed", "1"]) == 0
    report_path, plot = tmp_path / "report.json", tmp_path / "error.png"
    assert main(["evaluate", "--input", str(stream), "--report-json", str(report_path), "--plot", str(plot),
                 "--quiet"]) == 0
    report = json.loads(report_path.read_text())
    assert report["events"] == 80 * 60 + 80  # labelled events plus one end control per task
    assert report["seconds"] > 0 and report["events_per_s"] > 0
    for method in ("lifelong", "itl", "pooled", "kb_only"):
        assert 0 <= report["methods"][method]["cumulative_error"] <= 1
        assert report["methods"][method]["cumulative_log_loss"] > 0
    for key in ("top_level_max", "top_level_bound", "kb_max", "kb_bound"):
        assert key in report["regret"]
    assert report["regret"]["top_level_max"] <= report["regret"]["top_level_bound"] + 1e-6
    assert report["early"]["first_n"] == 20
    assert len(report["tasks"]) == 80
    one = next(iter(report["tasks"].values()))
    assert one["events"] == 60 and "regret" in one and "cumulative_error" in one
    # the paper's claim on related tasks: accumulated knowledge helps, most of all early in a task
    assert report["methods"]["lifelong"]["cumulative_error"] < report["methods"]["itl"]["cumulative_error"]
    assert report["early"]["lifelong"] < report["early"]["itl"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "lifelong" in out and "pooled" in out


def test_digits_stream_has_one_task_per_pair(tmp_path):
    stream = tmp_path / "digits.jsonl"
    assert main(["generate", "--kind", "digits", "--out", str(stream)]) == 0
    cfg, events, bad = read_events(stream, load_config(env={}), infer=True)
    assert bad == 0 and cfg.engine.dim == 64 and cfg.engine.task == "binary"
    assert len({e.task for e in events}) == 45


def test_kb_command_lists_members(tmp_path, capsys):
    stream = tmp_path / "s.jsonl"
    main(["generate", "--kind", "related", "--out", str(stream), "--tasks", "12", "--events", "40", "--dim", "20"])
    cfg, events, _ = read_events(stream, load_config(env={}), infer=False)
    engine = Engine(dataclasses.replace(cfg.engine, publish_every=64))
    engine.process(events)
    checkpoint.save_engine(engine, tmp_path / "ckpt")
    assert main(["kb", "--checkpoint", str(tmp_path / "ckpt"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["id"] for r in rows)


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["kb", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err
