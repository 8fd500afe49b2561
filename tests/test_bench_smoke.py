"""Smoke tests of the benchmark suite (not of speed): --quick runs of the side-by-side comparison over every workload
(the GPU-only GPT-2-shaped one too, tiny, bf16 autocast on CPU), the K-candidate rows and the kernel benchmark write
valid CSV (the columns, a row per workload and contestant, numbers that parse) and the markdown and PNG made from
it, and leave nothing behind in the working directory (Lightning's .lr_find_*.ckpt included)."""

from __future__ import annotations

import csv
import math
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from _helpers import torch_threads

pytest.importorskip("sklearn", reason="the benchmark's digits workloads need scikit-learn")

try:
    from benchmarks import bench_kernels, compare, contestants
except ImportError:  # pytest run from elsewhere: the repo root holds benchmarks/
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from benchmarks import bench_kernels, compare, contestants

NUMBERS = ("wall_s_warm_best", "ms_per_step_warm", "ms_per_step_steady", "params")


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(autouse=True)
def one_thread():
    """The quick models are tiny: one intra-op thread is as fast alone, and when another job shares the 2 cores,
    2 OpenMP threads that spin-wait made these tests 20x slower here. Restored afterwards."""
    with torch_threads(1):
        yield


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Lightning's checkpoint scratch directory and matplotlib's config go under tmp_path; yields the scratch."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))  # torch-lr-finder imports pyplot
    before = set(os.listdir(os.getcwd()))
    yield scratch
    assert set(os.listdir(os.getcwd())) == before
    assert not list(Path.cwd().glob(".lr_find_*.ckpt"))
    assert not list(scratch.glob("lrfast-bench-*")) and not list(scratch.rglob("*.ckpt"))  # scratch dirs removed


def _check_rows(rows: list[dict], workloads: list[str], names: list[str], steps: int = 20) -> None:
    assert [(r["workload"], r["contestant"]) for r in rows] == [(w, c) for w in workloads for c in names]
    for r in rows:
        assert r["steps"] == str(steps) and r["torch"] and r["device"] and int(r["cores"]) >= 1
        if contestants.missing(r["contestant"]):  # an optional peer (or lrfast mid-edit) not importable here
            assert r["note"].startswith("not available"), r
            continue
        assert r["note"] == "", r
        assert int(r["steps_run"]) == steps and int(r["k"]) == (16 if r["contestant"] == "lrfast_k16" else 1)
        for col in NUMBERS + (("speedup_vs_bare",) if "bare" in names else ()):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (col, r)
        assert r["wall_s_first"] == "" and r["cuda_max_alloc_mb"] == ""  # --quick: no fresh process; CPU


def test_quick_run_writes_a_row_per_contestant_and_leaves_the_cwd_clean(tmp_path, scratch):
    out = tmp_path / "out"
    assert compare.main(["--quick", "--workloads", "mlp", "--out", out]) == 0

    columns, rows = _read(out / "compare.csv")
    assert columns == compare.COLUMNS
    _check_rows(rows, ["mlp"], list(compare.DEFAULT_CONTESTANTS["cpu"]))
    md = (out / "compare.md").read_text()
    assert "| mlp | bare |" in md and "Reproduce" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over CPU attention, K = 16
def test_quick_run_covers_the_new_workloads_with_bf16_and_k_candidate_rows(tmp_path, scratch):
    out = tmp_path / "out"
    names = ["lrfast", "torch_lr_finder", "lightning", "bare"]
    assert compare.main(["--quick", "--workloads", "resnet18,chargpt,gpt2", "--contestants", ",".join(names),
                         "--out", out]) == 0  # fmt: skip
    columns, rows = _read(out / "compare.csv")
    assert columns == compare.COLUMNS
    _check_rows(rows, ["resnet18", "chargpt", "gpt2"], names)
    assert {r["workload"]: r["precision"] for r in rows} == {"resnet18": "fp32", "chargpt": "fp32", "gpt2": "bf16"}
    bare_gpt2 = next(r for r in rows if r["workload"] == "gpt2" and r["contestant"] == "bare")
    assert bare_gpt2["optimizer"] == "adamw" and bare_gpt2["impl"] == "torch.optim.AdamW default"

    k_out = tmp_path / "k"
    assert compare.main(["--quick", "--workloads", "chargpt", "--contestants", "lrfast,lrfast_k16", "--out",
                         k_out]) == 0  # fmt: skip
    _, k_rows = _read(k_out / "compare.csv")
    _check_rows(k_rows, ["chargpt"], ["lrfast", "lrfast_k16"])
    assert float(k_rows[1]["wall_vs_lrfast_k1"]) > 0 and k_rows[0]["wall_vs_lrfast_k1"] == ""


def test_cuda_is_refused_cleanly_without_a_gpu(tmp_path):
    if compare.torch.cuda.is_available():
        pytest.skip("a GPU is here: --device cuda would run")
    assert compare.main(["--device", "cuda", "--quick", "--out", tmp_path]) == 2
    assert not list(tmp_path.iterdir())


def test_kernels_quick_run_writes_gbps_and_fraction_of_copy(tmp_path):
    assert bench_kernels.main(["--quick", "--out", tmp_path]) == 0
    columns, rows = _read(tmp_path / "kernels.csv")
    assert columns == bench_kernels.COLUMNS
    assert [(int(r["params"]), int(r["k"])) for r in rows[:: len(bench_kernels.KERNELS)]] == bench_kernels.QUICK_CASES
    for r in rows:
        if r["note"]:  # the Triton kernel on CPU, the C++ one without lrfast._C
            assert r["us_best"] == "" and r["kernel"] in ("lrfast_triton", "lrfast_cpp"), r
            continue
        assert float(r["us_best"]) > 0 and float(r["gbps"]) > 0 and float(r["fraction_of_copy"]) > 0
    assert next(r for r in rows if r["kernel"] == "copy")["fraction_of_copy"] == "1"
    assert "| copy | 10,000 | 1 |" in (tmp_path / "kernels.md").read_text()
    assert (tmp_path / "kernels.png").stat().st_size > 0


def test_candidates_quick_run_writes_time_vs_k_with_equal_curves(tmp_path):
    from benchmarks import bench_candidates

    bench_candidates.main(["--quick", "--workloads", "mlp", "--out", str(tmp_path)])
    _, rows = _read(tmp_path / "candidates.csv")
    assert [r["k"] for r in rows] == ["1", "2"]
    for r in rows:
        for col in ("ms_per_step_one_pass", "ms_per_step_sequential", "speedup_vs_sequential", "floor_ms_per_step"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (col, r)
        # K candidates in one pass train what K separate runs train (lr <= 1e-2: rounding stays ~1e-6, PERF-NOTES)
        assert float(r["max_rel_diff_curves"]) < 1e-4, r
        assert float(r["max_rel_diff_curves_10_steps"]) <= float(r["max_rel_diff_curves"])
        # the MLP written out by hand trains the same candidates: other groupings of the same fp32 sums, a few ULPs
        # (1.2e-7 relative each) of the ~2.3 losses in 5 steps
        assert 0 < float(r["ms_per_step_handwritten"]) < math.inf
        assert float(r["max_rel_diff_handwritten_10_steps"]) < 2e-6, r
    assert (tmp_path / "candidates.md").exists() and (tmp_path / "candidates.png").stat().st_size > 0


def test_candidates_md_says_each_workloads_rounds_when_merged_runs_differ():
    from benchmarks.bench_candidates import _repeats

    rows = [{"workload": w, "repeats": n} for w, n in [("mlp", "5"), ("mlp", "5"), ("lenet", "2"), ("cnn", "4"),
                                                        ("gpt", "2"), ("lstm", "4")]]  # fmt: skip
    assert _repeats(rows) == "5 (mlp), 4 (cnn, lstm), 2 (the others)"
    assert _repeats([{"workload": "mlp", "repeats": "2"}, {"workload": "cnn", "repeats": "2"}]) == "2"


def test_rangetest_quick_run_writes_both_contestants_per_workload(tmp_path):
    from benchmarks import bench_rangetest

    assert bench_rangetest.main(["--quick", "--out", str(tmp_path)]) == 0
    columns, rows = _read(tmp_path / "rangetest.csv")
    assert columns == bench_rangetest.COLUMNS
    assert [(r["workload"], r["contestant"]) for r in rows] == [
        (w, c) for w in ("mlp", "lenet") for c in ("loop", "loop + RangeTest")]
    assert all(float(r["ms_per_step"]) > 0 and math.isfinite(float(r["overhead_pct"])) for r in rows)
    assert "| mlp | loop + RangeTest |" in (tmp_path / "rangetest.md").read_text()


def test_layers_forms_compute_the_same_grads_and_a_quick_run_writes_its_table(tmp_path):
    """bench_layers times three forms of each layer's K-candidate forward + backward: they must compute the same
    thing (the grads of every candidate's parameters and per-candidate input), or the timings compare different
    work. They sum in other orders: float32 sums of up to 6,400 terms (a conv weight's grad over 64 x 10 x 10
    positions) differ by ~sqrt(6400) x 2^-24 ~ 5e-6 of the largest term, so 5e-5 of the largest grad bounds it."""
    from benchmarks import bench_layers

    for case in bench_layers.cases(3):
        fns = bench_layers.forms(case, 3, "cpu")
        ref = fns["loop"]()
        assert len(ref) == len(case.shapes) + (0 if case.shared else 1)
        for name in ("vmap", "explicit"):
            for r, g in zip(ref, fns[name]()):
                torch.testing.assert_close(g, r, rtol=0, atol=5e-5 * float(r.abs().max()), msg=f"{case.name}: {name}")
    assert bench_layers.main(["--ks", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    _, rows = _read(tmp_path / "layers.csv")
    assert len(rows) == len(bench_layers.cases(2)) and all(float(r["ms_vmap"]) > 0 for r in rows)
    assert "Generated from layers.csv" in (tmp_path / "layers.md").read_text()
