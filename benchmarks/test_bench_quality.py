"""Smoke test of benchmarks/quality.py (not a measurement): one --quick run writes quality.csv (a row per workload x
contestant x method, the columns of quality.COLUMNS), quality_truth.csv (every seed x LR of the quick grid), the
markdown and the PNG; lrfast's default suggestion has a finite regret >= 0, spreads are >= 0, peers or like= modes
that are not here get a row saying so, and README's section renders the table. `pytest benchmarks/test_bench_quality.py`
(the default `pytest` run collects tests/ only)."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits workloads need scikit-learn")

from benchmarks import contestants, quality, readme, report  # noqa: E402 - after the skip

QUICK = quality.tasks(quick=True)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One --quick run for every test here, on one intra-op thread (the quick models are tiny; 2 spin-waiting OpenMP
    threads beside another job on the 2 cores made such runs 20x slower here), from a clean working directory."""
    out, threads, cwd = tmp_path_factory.mktemp("quality"), torch.get_num_threads(), os.getcwd()
    before = set(os.listdir(cwd))
    torch.set_num_threads(1)
    try:
        assert quality.main(["--quick", "--out", out]) == 0
    finally:
        torch.set_num_threads(threads)
    assert set(os.listdir(cwd)) == before  # Lightning's checkpoint went with its scratch directory
    return out


def _numbers(rows, col):
    return [float(r[col]) for r in rows if r[col] != ""]


def test_quick_run_writes_a_row_per_workload_contestant_and_method(out):
    rows = report.read_csv(out / "quality.csv")
    with open(out / "quality.csv") as f:
        assert f.readline().strip().split(",") == quality.COLUMNS
    expected = [(w, c, m) for w in quality.WORKLOADS for c in quality.CONTESTANTS for m in quality.METHODS[c]]
    assert [(r["workload"], r["contestant"], r["method"]) for r in rows] == expected
    for r in rows:
        assert r["quick"] == "1" and r["torch"] and r["device"] and int(r["truth_seeds"]) == 2
        if r["seeds"] == "0":  # not run here: the row says why
            assert r["note"].startswith("not available"), r
            continue
        assert r["seeds"] == "2" and len(r["suggestions"].split(";")) == 2, r
        assert float(r["wall_s_per_call"]) > 0 and 0 <= int(r["failures"]) <= 2 and int(r["clamped"]) <= 2


def test_regrets_are_finite_and_non_negative_and_spreads_non_negative(out):
    rows = report.read_csv(out / "quality.csv")
    default = [r for r in rows if r["contestant"] == "lrfast_sweep" and r["method"] == "valley"]
    assert len(default) == len(quality.WORKLOADS)
    for r in default:
        assert int(r["failures"]) < 2 and math.isfinite(float(r["mean_regret"])), r
        assert 0 <= float(r["mean_regret"]) <= float(r["max_regret"]), r
    assert all(v >= 0 for col in ("mean_regret", "max_regret", "spread_decades") for v in _numbers(rows, col))
    for r in rows:
        lo, best, hi = (float(r[c]) for c in ("grid_min_lr", "best_lr", "grid_max_lr"))
        assert float(r["best_outcome"]) > 0 and lo <= best <= hi, r


def test_missing_peers_and_like_modes_say_so(out):
    rows = {(r["workload"], r["contestant"]): r for r in report.read_csv(out / "quality.csv")}
    for w in quality.WORKLOADS:
        for peer in ("lightning", "torch_lr_finder"):
            why = contestants.missing(peer)
            assert (rows[(w, peer)]["note"] == why) if why else rows[(w, peer)]["seeds"] == "2"
        for c in (c for c in quality.CONTESTANTS if c.startswith("lrfast_like_")):
            r = rows[(w, c)]
            assert r["seeds"] == "2" or r["note"] == "not available: like= missing", r


def test_truth_has_every_seed_and_lr_of_the_quick_grid(out):
    truth = report.read_csv(out / "quality_truth.csv")
    with open(out / "quality_truth.csv") as f:
        assert f.readline().strip().split(",") == quality.TRUTH_COLUMNS
    for w, task in QUICK.items():
        sub = [t for t in truth if t["workload"] == w]
        assert sorted({t["seed"] for t in sub}) == ["0", "1"] and len(sub) == 2 * task.grid[2]
        lrs, curve = quality.mean_curve(sub)
        assert len(lrs) == task.grid[2] and math.isclose(lrs[0], task.grid[0]) and math.isclose(lrs[-1], task.grid[1])
        for t in sub:  # the cap: no outcome above the untrained model's
            assert math.isfinite(float(t["outcome"])) and float(t["outcome"]) <= float(t["init_loss"]), t
            assert t["capped"] == "1" or float(t["outcome"]) == float(t["val_loss"]), t


def test_markdown_png_render_and_readme_section(out):
    md = (out / "quality.md").read_text()
    assert "Regret = " in md and all(f"## {w}:" in md for w in quality.WORKLOADS) and "--quick" in md
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert quality.main(["--render", out / "quality.csv"]) == 0
    assert (out / "quality.md").read_text() == md  # the same file from the CSVs alone
    section = "\n".join(readme.device_section(out))
    assert "Suggestion quality" in section and "| lrfast_sweep valley (default) |" in section


def test_scoring_clamps_to_the_grid_and_counts_failures():
    lrs, curve = quality.np.array([1e-4, 1e-3, 1e-2]), quality.np.array([2.0, 1.0, 3.0])
    s = quality.score([1e-3, 1e-6, None, 10 ** -2.5], lrs, curve)
    assert s["failures"] == 1 and s["clamped"] == 1 and s["best_lr"] == 1e-3 and s["best_outcome"] == 1.0
    assert math.isclose(s["max_regret"], 1.0) and math.isclose(s["mean_regret"], (0 + 1 + 1) / 3)
    assert math.isclose(s["spread_decades"], 3.5)


def test_a_find_without_like_gives_a_not_available_row_and_is_not_tried_again(monkeypatch):
    calls = []

    def no_like(model, loader, task, seed, o):
        calls.append(seed)
        raise TypeError("find() got an unexpected keyword argument 'like'")

    monkeypatch.setitem(quality.RUNNERS, "lrfast_like_fastai", no_like)
    task, skipped = QUICK["mlp"], {}
    train, _ = quality.split(task.dataset())
    for _ in range(2):  # two workloads: the second one does not call it
        results, walls, note = quality.run_contestant("lrfast_like_fastai", task, train, range(2), quality.Options(),
                                                      skipped)  # fmt: skip
        assert results == [] and walls == [] and note == "not available: like= missing"
    assert calls == [0]
