"""Engine throughput of this tree against an earlier revision, measured so that this machine's drift cancels.

    python bench/ab.py [--against f0ad632] [--passes 3] [--streams related-300,personal]

Timings of whole runs here drift by 15-30% within minutes, more than a change worth measuring. So both engines
run in one process, taking turns: on each 1,024-event batch of a stream, one engine and then the other, the
order swapped every batch. The earlier revision's ``lifelong`` package is extracted by ``git archive`` into a
temporary folder under another name (``lifelong_then``, its imports rewritten), so that both import side by
side. Streams: ``bench/throughput.py``'s four (``--streams``: the start of each name), decoded once for each
engine; ``EngineConfig(dim=20)``, one torch thread (as ``lifelong run``). Each pass gives the ratio of the
earlier engine's summed batch times over this one's (above 1: this tree is faster); printed per stream: both
engines' events/s (best pass) and the median pass ratio (range). Issue 31's target: no slower than f0ad632.
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from throughput import STREAMS  # noqa: E402

THEN = "lifelong_then"


def extract(rev: str, into: Path) -> None:
    """Revision ``rev``'s ``lifelong`` package as ``into/lifelong_then``, importing itself under that name."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["git", "archive", rev, "lifelong"], cwd=root, capture_output=True)
    if done.returncode:
        raise SystemExit(f"git archive {rev} lifelong: {done.stderr.decode().strip()} (a shallow clone lacks it?)")
    tar = done.stdout
    with tarfile.open(fileobj=BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    (into / "lifelong").rename(into / THEN)
    for path in (into / THEN).rglob("*.py"):
        text = re.sub(r"\b(from|import) lifelong\b", rf"\1 {THEN}", path.read_text())
        path.write_text(text.replace('"lifelong.', f'"{THEN}.'))


def api(package: str) -> SimpleNamespace:
    """What a pass needs of one package: its engine, event decoding and warm-up (the layout before issue 30's
    ``core/`` as well)."""
    try:
        engine, events = (importlib.import_module(f"{package}.core.{m}") for m in ("engine", "events"))
        warm_up = importlib.import_module(f"{package}.core.warmup").warm_up
    except ModuleNotFoundError:
        engine, events = (importlib.import_module(f"{package}.{m}") for m in ("engine", "events"))
        warm_up = engine.warm_up
    cfg = importlib.import_module(f"{package}.config").EngineConfig(dim=20)
    warm_up(cfg)
    return SimpleNamespace(engine=engine.Engine, cfg=cfg, decode=lambda e: events.from_dict(e, events.Schema(dim=20)))


def passes(sides: list[SimpleNamespace], rows: list[dict[str, Any]], n: int, batch: int = 1024) -> list[list[float]]:
    """``n`` passes of both engines over ``rows``, batch by batch in turns: each pass's summed seconds per side."""
    events = [[side.decode(e) for e in rows] for side in sides]
    out = []
    for _ in range(n):
        engines, seconds = [side.engine(side.cfg) for side in sides], [0.0, 0.0]
        for j, start in enumerate(range(0, len(rows), batch)):
            for k in (0, 1) if j % 2 == 0 else (1, 0):
                t0 = time.perf_counter()
                engines[k].process(events[k][start : start + batch])
                seconds[k] += time.perf_counter() - t0
        out.append(seconds)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default="f0ad632", help="the earlier revision (default: before the shared level)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--streams", default="", help="comma-separated starts of stream names (default: all four)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    wanted = [s for s in args.streams.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        extract(args.against, Path(tmp))
        sys.path.insert(0, tmp)
        sides = [api(THEN), api("lifelong")]  # compiles the earlier revision's kernels on first use
        print(f"{'stream':36s} {args.against + ' ev/s':>14s} {'this ev/s':>11s}  ratio (range)")
        for name, make in STREAMS.items():
            if wanted and not any(name.startswith(w) for w in wanted):
                continue
            rows = list(make())
            runs = passes(sides, rows, args.passes)
            ratios = [then / now for then, now in runs]
            best = [min(r[k] for r in runs) for k in (0, 1)]
            print(
                f"{name:36s} {len(rows) / best[0]:14,.0f} {len(rows) / best[1]:11,.0f}  "
                f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})",
                flush=True,
            )
    print("ratio: the earlier engine's time over this tree's, per pass (median of passes; above 1: this one is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
