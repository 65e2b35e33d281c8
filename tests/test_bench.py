"""The benchmark scripts run (small, on the CPU) and print their tables; figures are not asserted (only how
they are combined)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_gpu_bench_runs_small_on_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tasks", "50", "--events", "3000", "--batch", "512", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "cpu" in out.stdout and "events/s" in out.stdout
    rows = json.loads((tmp_path / "gpu.json").read_text())["results"]["rows"]
    assert rows[0]["device"] == "cpu" and rows[0]["events_per_s"] > 0


def test_the_report_renders_what_a_benchmark_wrote(tmp_path):
    """``bench/report.py`` turns a script's JSON into a page with the run's commit and command and its figures;
    a section whose script has no JSON here stays as the page had it."""
    subprocess.run(
        [sys.executable, "bench/gpu.py", "--tasks", "20", "--events", "1000", "--batch", "256", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
        check=True,
    )
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\n## accuracy\n\nan earlier run's table\n\n## gpu\n\na stale gpu table\n")
    subprocess.run(
        [sys.executable, "bench/report.py", "--results", str(tmp_path), "--out", str(page)],
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    data = json.loads((tmp_path / "gpu.json").read_text())
    text = page.read_text()
    assert "## gpu" in text and data["meta"]["commit"] in text and "bench/gpu.py --tasks 20" in text
    row = next(line for line in text.splitlines() if line.startswith("| cpu"))
    assert f"{data['results']['rows'][0]['events_per_s']:,.0f}" in row
    assert "an earlier run's table" in text and "stale" not in text  # accuracy kept, gpu rendered afresh
    assert text.index("## accuracy") < text.index("## gpu")  # in the page's order
    assert "Not run for this page: `bench/real.py`" in text


def test_real_data_over_shuffles_judges_the_means(tmp_path):
    """``bench/real.py --shuffles 2``: each seed's figures as it runs, then one row per data set holding their means,
    judged on the means, with lifelong's paired gap to its own pooled pass."""
    out = subprocess.run(
        [sys.executable, "bench/real.py", "--only", "Gcsemv", "--shuffles", "2", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seeds = [line.split() for line in out.stderr.splitlines() if line.startswith("Gcsemv ") and " seed " in line]
    assert [s[2] for s in seeds] == ["0", "1"]
    lifelong = [float(s[s.index("lifelong") + 1]) for s in seeds]
    pooled = [float(s[s.index("pooled") + 1]) for s in seeds]
    (row,) = json.loads((tmp_path / "real.json").read_text())["results"]["rows"]
    assert row["shuffles"] == 2 and abs(row["lifelong"] - sum(lifelong) / 2) < 1e-4
    assert row["pass"] == (row["lifelong"] <= row["pooled"] and row["lifelong"] <= row[row["best_peer"]])
    assert float(row["vs_pooled"].split()[0]) == pytest.approx((sum(lifelong) - sum(pooled)) / 2, abs=1e-3)
    assert out.returncode == (0 if row["pass"] and row["ratio"] <= 0.95 else 1)


def test_river_speed_runs_both_streams_and_agrees_with_evaluate(tmp_path):
    """``bench/river_speed.py`` on a few hundred events of each stream: both methods timed, taking turns by chunks,
    and the estimator's progressive error over the chunks is what ``lifelong evaluate`` gives on the same events."""
    subprocess.run(
        [sys.executable, "bench/river_speed.py", "--events", "400", "--repeat", "1", "--chunk", "150"]
        + ["--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
        check=True,
    )
    streams = json.loads((tmp_path / "river_speed.json").read_text())["results"]["streams"]
    assert [s["stream"] for s in streams] == ["random blocks", "many short tasks"]
    for s in streams:
        assert s["events"] == 400 and s["river_events_per_s"] > 0 and s["lifelong_events_per_s"] > 0
        assert s["evaluate_error"] == pytest.approx(s["lifelong_error"], abs=1e-9)
    assert streams[1]["tasks"] > 100  # many short tasks: most events start a task
