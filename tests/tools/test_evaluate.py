"""``lifelong evaluate``: the passes side by side over a file read in chunks, and the two-panel plot."""

import json

import numpy as np
import pytest

from lifelong.config import load_config
from lifelong.tools import evaluate as ev
from lifelong.tools.cli import main
from lifelong.tools.generate import stream


@pytest.fixture(scope="module")
def related(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "related.jsonl"
    rows = stream("related", n_tasks=80, events=30, block=10, dim=6, seed=3)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def methods(report):
    return {k: v["cumulative_error"] for k, v in report["methods"].items()}


def test_reading_in_chunks_and_running_passes_alone_change_no_figure(related, monkeypatch):
    """The file read 7 lines at a time gives the report of the file read at once; a pass run alone gives what
    it gives beside the others."""
    cfg = load_config(env={})
    whole = ev.evaluate(related, cfg, progress=False)
    monkeypatch.setattr(ev, "READ_CHUNK", 7)
    chunked = ev.evaluate(related, cfg, progress=False)
    assert methods(chunked) == methods(whole)
    assert chunked["by_event"] == whole["by_event"]
    assert chunked["events"] == whole["events"] == 80 * 30 + 80
    itl = ev.evaluate(related, cfg, progress=False, passes=("itl",))
    assert methods(itl) == {"itl": methods(whole)["itl"]}
    assert itl["by_event"]["itl"] == whole["by_event"]["itl"]


def test_error_at_a_tasks_kth_event(related):
    """Every task reaches its 30th labelled event and none a 31st; on related tasks what earlier tasks taught
    shows at a task's first events: lifelong errs less than per-task learning there."""
    report = ev.evaluate(related, load_config(env={}), progress=False)
    k = report["by_event"]
    assert k["itl"]["tasks"] == [80] * 30 and len(k["pooled"]["mean"]) == 30
    first5 = {name: np.mean(k[name]["mean"][:5]) for name in ("lifelong", "itl")}
    assert first5["lifelong"] < first5["itl"] - 0.05  # measured: .32 against .41
    assert all(b >= 0 for b in k["lifelong"]["band"])
    assert report["warmup_s"] > 0 and report["events_per_s"] > 0


def test_the_curve_stays_small_and_exact_where_it_is_kept():
    curve = ev.Curve()
    curve.POINTS = 64
    rng = np.random.default_rng(0)
    errors = rng.integers(0, 2, 10_000).astype(float)
    for part in np.array_split(errors, 37):
        curve.add(part)
    assert len(curve.at) <= 64 and curve.n == 10_000
    cum = np.cumsum(errors)
    assert np.allclose(curve.sums, cum[np.asarray(curve.at) - 1])


def test_passes_flag_and_the_two_panel_plot(related, tmp_path, capsys):
    """``--passes lifelong`` runs the engine alone; an unknown pass is refused; ``--plot`` draws each method's
    line in both panels (read back from the PNG: the method's colour in the left and the right half)."""
    report = tmp_path / "r.json"
    args = ["evaluate", "--input", str(related), "--report-json", str(report), "--quiet"]
    assert main([*args, "--passes", "lifelong"]) == 0
    assert set(json.loads(report.read_text())["methods"]) == {"lifelong", "local", "kb_only"}
    assert main([*args, "--passes", "lifelong,cold"]) == 2
    assert "passes: choose from lifelong, itl, pooled" in capsys.readouterr().err

    plot = tmp_path / "p.png"
    assert main([*args, "--plot", str(plot)]) == 0
    matplotlib = pytest.importorskip("matplotlib")
    image = matplotlib.image.imread(plot)[..., :3]
    half = image.shape[1] // 2
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c"):  # lifelong, itl, pooled: the first three of the cycle
        rgb = np.array(matplotlib.colors.to_rgb(colour))
        near = np.abs(image - rgb).max(-1) < 0.08
        assert near[:, :half].sum() > 200 and near[:, half:].sum() > 200, colour


def test_the_passes_leave_what_start_up_loaded_out_of_collections_and_the_collector_as_it_was(related, monkeypatch):
    """While the passes run, the objects loaded before (torch, numba: a full collection over them takes ~100 ms)
    are frozen and young collections are rarer; afterwards the caller's thresholds are back."""
    import gc

    from lifelong.core.warmup import GC_THRESHOLDS

    before = gc.get_threshold()
    seen: list[tuple[tuple[int, int, int], int]] = []
    feed = ev.Pass.feed

    def watched(self: ev.Pass, chunk: list) -> None:
        seen.append((gc.get_threshold(), gc.get_freeze_count()))
        feed(self, chunk)

    monkeypatch.setattr(ev.Pass, "feed", watched)
    ev.evaluate(related, load_config(env={}), progress=False)
    assert gc.get_threshold() == before
    assert len(seen) == 3 and all(t == GC_THRESHOLDS and frozen > 10_000 for t, frozen in seen)
