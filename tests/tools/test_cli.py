import dataclasses
import json

from lifelong.config import load_config
from lifelong.core.engine import Engine
from lifelong.service import checkpoint
from lifelong.tools.cli import main
from lifelong.tools.evaluate import read_events


def test_generate_then_evaluate_reports_every_field(tmp_path, capsys):
    stream = tmp_path / "related.jsonl"
    assert (
        main(
            [
                "generate",
                "--kind",
                "related",
                "--out",
                str(stream),
                "--tasks",
                "80",
                "--events",
                "60",
                "--dim",
                "10",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    report_path, plot = tmp_path / "report.json", tmp_path / "error.png"
    assert (
        main(["evaluate", "--input", str(stream), "--report-json", str(report_path), "--plot", str(plot), "--quiet"])
        == 0
    )
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


def run_cli(args, timeout=60):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lifelong", *args], capture_output=True, text=True, timeout=timeout)


def test_start_up_errors_are_one_clear_line_and_a_non_zero_exit(tmp_path):
    import socket

    import yaml

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    base = {
        "engine": {"dim": 3},
        "checkpoint": {"dir": str(tmp_path / "state")},
        "kafka": {"bootstrap_servers": "127.0.0.1:1"},
    }
    cases = {
        "port in use": ({"metrics": {"port": taken.getsockname()[1]}}, "metrics.host/metrics.port"),
        "unresolvable host": ({"metrics": {"host": "no-such-host.invalid"}}, "metrics.host/metrics.port"),
        "checkpoint dir not writable": ({"checkpoint": {"dir": str(blocker / "state")}}, "not writable"),
    }
    try:
        for name, (change, expected) in cases.items():
            path = tmp_path / "c.yaml"
            path.write_text(yaml.safe_dump({**base, **change}))
            done = run_cli(["run", "--config", str(path)])
            assert done.returncode != 0, name
            errors = [line for line in done.stderr.splitlines() if "INFO" not in line]
            assert len(errors) == 1 and expected in errors[0] and "Traceback" not in done.stderr, (name, done.stderr)
    finally:
        taken.close()


def test_evaluate_survives_huge_and_unscaled_values(tmp_path):
    """Values finite as float64 but not float32, and features in the millions, in some tasks: the report is
    strict JSON (no NaN) and the unscaled task is learned."""
    rng = __import__("numpy").random.default_rng(0)
    lines = []
    for i in range(600):
        task = f"t{i % 3}"
        x = rng.normal(size=3).tolist()
        if task == "t1":
            x[0] = float(rng.uniform(0, 3e6))
        if i == 302:  # in another task than the unscaled one
            x = [1e300, -1e300, 1.0]
        y = int(x[0] > 1.5e6) if task == "t1" else int(x[1] > 0)
        lines.append(json.dumps({"task": task, "id": f"e{i}", "x": x, "y": y}))
    (tmp_path / "s.jsonl").write_text("\n".join(lines))
    assert (
        main(["evaluate", "--input", str(tmp_path / "s.jsonl"), "--report-json", str(tmp_path / "r.json"), "--quiet"])
        == 0
    )

    def refuse(name):
        raise AssertionError(f"{name} in the report")

    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert report["tasks"]["t1"]["cumulative_error"] < 0.25


def test_features_of_an_extra_name_it_when_it_is_missing(tmp_path, capsys, monkeypatch):
    import sys

    stream = tmp_path / "s.jsonl"
    main(["generate", "--kind", "related", "--out", str(stream), "--tasks", "3", "--events", "10"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert (
        main(
            [
                "evaluate",
                "--input",
                str(stream),
                "--report-json",
                str(tmp_path / "r.json"),
                "--plot",
                str(tmp_path / "p.png"),
                "--quiet",
            ]
        )
        == 2
    )
    assert main(["generate", "--kind", "digits", "--out", str(tmp_path / "d.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'lifelong[plot]'" in err and "pip install 'lifelong[data]'" in err


def test_benign_client_messages_are_debug_real_problems_still_show(capsys):
    import logging

    from lifelong.tools.cli import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("kafka").level
    try:
        setup_logging(load_config(env={}))
        logging.getLogger("kafka.cluster").error("Metadata refresh: failed Cancelled")
        logging.getLogger("kafka.net.selector").warning("Task <poll> ran for 0.3s")
        logging.getLogger("kafka.net.manager").error("Connection failed: KafkaConnectionError: 111 ECONNREFUSED")
        failed = "<KafkaTCPTransport [none] (%s)>: Error receiving network data closing socket"
        for state in ("closed", "connected"):  # a read racing its own close at shutdown; a live connection's
            try:
                raise AttributeError("'NoneType' object has no attribute 'recv'")
            except AttributeError:
                logging.getLogger("kafka.net.transport").exception(failed, state)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("kafka").setLevel(saved[2])
    err = capsys.readouterr().err
    assert "Cancelled" not in err and "ran for" not in err and "ECONNREFUSED" in err
    assert "(closed)" not in err and err.count("Error receiving network data") == 1 and "(connected)" in err
