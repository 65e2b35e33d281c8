"""The benchmark scripts run (small, on the CPU) and print their tables; figures are not asserted."""

import json
import subprocess
import sys
from pathlib import Path

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
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert rows[0]["device"] == "cpu" and rows[0]["events_per_s"] > 0
