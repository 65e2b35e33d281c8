"""Command line: ``lifelong run | demo | evaluate | generate | kb``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from lifelong.config import Config, load_config
from lifelong.errors import LifelongError


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line."""
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class ClientNoise(logging.Filter):
    """kafka-python's messages that every healthy run produces (a metadata refresh cancelled while partitions
    are assigned at start; its IO thread noting a slow task under load; a read racing the close of its own
    connection at shutdown, which logs a traceback now and then) are what they are: DEBUG."""

    BENIGN = ("Metadata refresh: failed Cancelled", " ran for ", "(closed)>: Error receiving network data")

    def filter(self, record: logging.LogRecord) -> bool:
        """Demote the benign client messages to DEBUG (dropped unless the root logs DEBUG)."""
        if record.name.startswith("kafka.") and any(text in record.getMessage() for text in self.BENIGN):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(cfg: Config) -> None:
    """Log to stderr at ``logging.level``, as text or JSON lines; the Kafka client's noise above WARNING only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if cfg.logging.json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(ClientNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.logging.level)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))


def _run(args: argparse.Namespace) -> int:
    from lifelong.service.daemon import Daemon

    cfg = load_config(args.config)
    setup_logging(cfg)
    return Daemon(cfg, reset_state=args.reset_state).run()


def _demo(args: argparse.Namespace) -> int:
    from lifelong.tools.demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.addFilter(ClientNoise())
    return run_demo(
        tasks=args.tasks,
        events_per_task=args.events,
        rate=args.rate,
        keep_running=args.keep_running,
        metrics_port=args.metrics_port,
    )


def _generate(args: argparse.Namespace) -> int:
    from lifelong.tools.generate import stream, write_jsonl

    n = write_jsonl(
        stream(args.kind, n_tasks=args.tasks, events=args.events, dim=args.dim, block=args.block, seed=args.seed),
        args.out,
    )
    print(f"wrote {n} events to {args.out}", file=sys.stderr)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lifelong.tools.evaluate import evaluate

    cfg = load_config(args.config)
    passes = tuple(p.strip() for p in args.passes.split(",") if p.strip())
    report = evaluate(
        args.input,
        cfg,
        infer=args.config is None,
        plot=args.plot,
        progress=not args.quiet,
        passes=passes,
        report_json=args.report_json,
    )
    m = report["methods"]
    print(f"{'method':<10} {'error':>8} {'log loss':>9}")
    for name in ("lifelong", "local", "itl", "pooled", "kb_only"):
        if name in m:
            print(f"{name:<10} {m[name]['cumulative_error']:>8.4f} {m[name]['cumulative_log_loss']:>9.4f}")
    early = report["early"]
    firsts = " ".join(f"{name} {early[name]:.4f}" for name in ("lifelong", "itl", "pooled") if name in early)
    print(
        f"events {report['events']}  {report['events_per_s']:,.0f} ev/s ({report['passes'][0]}, after "
        f"{report['warmup_s']:.1f} s of warm-up)  early error (first {early['first_n']}) {firsts}"
    )
    if r := report.get("regret"):
        print(
            f"regret: top level max {r['top_level_max']:.4f} (bound {r['top_level_bound']:.4f}), "
            f"KB max {r['kb_max']:.4f} (bound {r['kb_bound']:.4f})"
        )
    print(f"report: {args.report_json}" + (f"  plot: {args.plot}" if args.plot else ""))
    return 0


def _kb(args: argparse.Namespace) -> int:
    from lifelong.service.checkpoint import load_engine

    engine = load_engine(args.checkpoint, load_config(args.config))
    rows = engine.kb_summary()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"KB: {engine.kb.size}/{engine.kb.capacity} members, {engine.n_tasks} tasks, basis "
        f"{'ready' if engine.kb.basis_ready else 'not ready'}; counts {engine.kb.counts}"
    )
    print(f"{'slot':>5}  {'member':<40} {'source task':<30} {'total weight':>12}")
    for r in sorted(rows, key=lambda r: -r["weight"]):
        print(f"{r['slot']!s:>5}  {r['id']:<40} {r['source']:<30} {r['weight']:>12.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``lifelong`` command line and its subcommands."""
    p = argparse.ArgumentParser(prog="lifelong", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="the daemon: learn from a Kafka topic, write predictions back")
    r.add_argument("--config", default=None, help="config.yaml (environment LIFELONG_SECTION__KEY overrides it)")
    r.add_argument(
        "--reset-state",
        action="store_true",
        help="with no usable checkpoint, start empty from the group's committed offsets (what was "
        "learned before them is lost); without it such a start is refused",
    )
    r.set_defaults(func=_run)

    d = sub.add_parser("demo", help="embedded broker + built-in stream + the daemon, with live progress")
    d.add_argument("--tasks", type=int, default=300)
    d.add_argument("--events", type=int, default=100, help="events per task")
    d.add_argument("--rate", type=float, default=2500.0, help="events per second fed to the broker")
    d.add_argument("--metrics-port", type=int, default=None, help="default: a free port (printed)")
    d.add_argument("--keep-running", action="store_true", help="leave broker and daemon up for Prometheus")
    d.set_defaults(func=_demo)

    g = sub.add_parser("generate", help="write a synthetic or dataset stream as JSONL")
    g.add_argument(
        "--kind",
        choices=("related", "unrelated", "digits", "short", "personal"),
        required=True,
        help="short: 3,000 related tasks of 5-40 events; personal: 20,000 users of 1-6 events (never ended)",
    )
    g.add_argument("--out", required=True, help="output JSONL file")
    g.add_argument(
        "--tasks",
        type=int,
        default=None,
        help="number of tasks (default 300; short 3,000; personal 20,000; digits: all 45 pairs)",
    )
    g.add_argument("--events", type=int, default=100, help="events per synthetic task")
    g.add_argument("--dim", type=int, default=20, help="features of synthetic tasks")
    g.add_argument("--block", type=int, default=20, help="consecutive events of one task")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_generate)

    e = sub.add_parser("evaluate", help="prequential evaluation of a JSONL stream with baselines")
    e.add_argument("--input", required=True)
    e.add_argument("--report-json", required=True)
    e.add_argument("--config", default=None, help="config.yaml (default: built-in defaults, task kind inferred)")
    e.add_argument(
        "--plot", default=None, help="PNG: cumulative error against events, and error at a task's k-th event"
    )
    e.add_argument("--passes", default="lifelong,itl,pooled", help="methods to run, side by side (default: all three)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_evaluate)

    k = sub.add_parser("kb", help="inspect the knowledge base of a checkpoint")
    k.add_argument("--checkpoint", required=True, help="checkpoint directory")
    k.add_argument("--config", default=None)
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=_kb)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a ``LifelongError`` is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LifelongError as exc:
        print(f"lifelong: error: {exc}", file=sys.stderr)
        return 2
