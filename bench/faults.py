"""Faults a production daemon meets, measured end to end through the embedded broker (issue: robustness).

    python bench/faults.py [--events 40000] [--scrapers 20] [--full-s 30]

1. Scrape load: the same backlog read by ``lifelong run`` alone and with ``--scrapers`` clients fetching
   /metrics back to back (threads of this process) the whole time; events/s from the prediction records'
   timestamps, the ratio, and the scrapes' latency. Runs alternate (alone, loaded, alone, loaded).
2. Disk full (needs root to mount a small tmpfs for the checkpoint directory): the volume is filled while
   events flow, stays full for ``--full-s`` seconds, then is freed. Reports the exit code, /readyz while
   full, prediction records against events (duplicates) and learned labels against labelled events.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from lifelong.service import checkpoint  # noqa: E402
from lifelong.tools.broker import EmbeddedBroker, free_port  # noqa: E402
from lifelong.tools.generate import stream  # noqa: E402

from daemon import produce, rate_of, read_all, start_daemon  # noqa: E402
from record import save  # noqa: E402


def get(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def scrape_run(bootstrap: str, payloads: list[bytes], tag: str, scrapers: int, work: Path) -> tuple[float, list]:
    port = free_port()
    produce(bootstrap, f"ev-{tag}", payloads)
    proc = start_daemon(bootstrap, tag, work, shared=False, port=port, interval_s=2.0)
    done = threading.Event()
    latencies: list[float] = []

    def scrape() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            status, _ = get(port, "/metrics")
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                time.sleep(0.05)

    threads = [threading.Thread(target=scrape, daemon=True) for _ in range(scrapers)]
    for t in threads:
        t.start()
    try:
        rate = rate_of(read_all(bootstrap, f"pred-{tag}", len(payloads)))
    finally:
        done.set()
        for t in threads:
            t.join(35)
        proc.terminate()
        proc.wait(60)
    return rate, latencies


def disk_full(bootstrap: str, payloads: list[bytes], full_s: float, work: Path) -> dict:
    mount = work / "small-volume"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    port = free_port()
    try:
        proc = start_daemon(bootstrap, "full", work, shared=False, state=mount / "state", port=port, interval_s=2.0)
        half = len(payloads) // 2
        produce(bootstrap, "ev-full", payloads[:half])
        read_all(bootstrap, "pred-full", half)
        time.sleep(3)  # a checkpoint after the first half
        filler = mount / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], stderr=subprocess.DEVNULL)
        produce(bootstrap, "ev-full", payloads[half:])
        t_full = time.monotonic()
        ready = []
        while time.monotonic() - t_full < full_s:
            ready.append(get(port, "/readyz", timeout=5)[0])
            time.sleep(1.0)
        during = len(read_all(bootstrap, "pred-full", half, timeout=10))
        alive = proc.poll() is None
        filler.unlink()
        t_free = time.monotonic()
        read_all(bootstrap, "pred-full", len(payloads), timeout=120)
        resumed_s = time.monotonic() - t_free
        time.sleep(3)
        proc.terminate()
        code = proc.wait(60)
        preds = read_all(bootstrap, "pred-full", len(payloads), timeout=10)
        engine = checkpoint.load_engine(mount / "state", _config())
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    labelled = sum(1 for p in payloads if b'"y"' in p)
    return {
        "full_s": full_s,
        "alive_while_full": alive,
        "readyz_while_full": sorted(set(ready)),
        "predictions_while_full": during - half,
        "resumed_after_s": resumed_s,
        "exit_code": code,
        "prediction_records": len(preds),
        "events": len(payloads),
        "learned": engine.counters["learned"],
        "labelled": labelled,
    }


def _config():
    from lifelong.config import load_config

    return load_config(env={}, overrides={"engine.dim": 20})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=40000)
    ap.add_argument("--scrapers", type=int, default=20)
    ap.add_argument("--full-s", type=float, default=30.0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    payloads = [
        json.dumps(e).encode() for e in stream("related", n_tasks=max(1, args.events // 100), events=100) if "x" in e
    ]
    work = Path(tempfile.mkdtemp(prefix="lifelong-faults-"))
    result: dict = {"events": len(payloads), "scrapers": args.scrapers}
    with EmbeddedBroker(log=work / "tansu.log") as broker:
        rates: dict[str, list[float]] = {"alone": [], "scraped": []}
        lat: list[float] = []
        for i in range(2):
            rates["alone"].append(scrape_run(broker.bootstrap, payloads, f"alone{i}", 0, work)[0])
            rate, latencies = scrape_run(broker.bootstrap, payloads, f"scraped{i}", args.scrapers, work)
            rates["scraped"].append(rate)
            lat += latencies
        result.update(
            {
                "alone_events_per_s": rates["alone"],
                "scraped_events_per_s": rates["scraped"],
                "ratio": float(np.mean(rates["scraped"]) / np.mean(rates["alone"])),
                "scrapes": len(lat),
                "scrape_p50_ms": float(np.percentile(lat, 50) * 1000),
                "scrape_p99_ms": float(np.percentile(lat, 99) * 1000),
            }
        )
        print(f"scrape load: {args.scrapers} scrapers back to back, {len(payloads):,} events, runs alternating")
        print(f"  alone    events/s: {', '.join(f'{r:,.0f}' for r in rates['alone'])}")
        print(f"  scraped  events/s: {', '.join(f'{r:,.0f}' for r in rates['scraped'])}")
        print(
            f"  ratio (target >= 0.9): {result['ratio']:.2f}; {len(lat)} scrapes, p50 "
            f"{result['scrape_p50_ms']:.0f} ms, p99 {result['scrape_p99_ms']:.0f} ms"
        )
        if os.geteuid() == 0:
            full = disk_full(broker.bootstrap, payloads[:8000], args.full_s, work)
            result["disk_full"] = full
            print(
                f"disk full for {full['full_s']:.0f} s: alive {full['alive_while_full']}, /readyz "
                f"{full['readyz_while_full']}, {full['predictions_while_full']} predictions while full, resumed "
                f"{full['resumed_after_s']:.1f} s after space came back, exit {full['exit_code']}; "
                f"{full['prediction_records']} prediction records for {full['events']} events; learned "
                f"{full['learned']} of {full['labelled']} labelled"
            )
        else:
            print("disk full: skipped (mounting a small volume needs root)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save(out, "faults", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
