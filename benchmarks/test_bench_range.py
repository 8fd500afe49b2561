"""pytest-benchmark suite of whole range tests on the light workloads (benchmarks/workloads.py, their --quick sizes
and 20 steps): lrfast K = 1 against the bare eager loop, the floor for eager code. `pytest benchmarks/
--benchmark-only`; the side-by-side table with every peer is `python -m benchmarks.compare`."""

from __future__ import annotations

import pytest
import torch

from benchmarks import contestants as C
from benchmarks import workloads as W

pytest.importorskip("pytest_benchmark")
pytest.importorskip("sklearn", reason="the digits workloads need scikit-learn")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("workload", ["mlp", "lenet", "resnet18", "chargpt"])
@pytest.mark.parametrize("contestant", ["lrfast", "bare"])
def test_range_test(benchmark, workload, contestant):
    wl = W.get(workload, DEVICE, quick=True)
    s = C.for_workload(wl, C.Settings(device=DEVICE, quick=True))
    dataset = wl.dataset()

    def once():
        model, loader = C.fresh(dataset, wl.model, s)
        out = C.RUNNERS[contestant](model, loader, s)
        C.sync(s)
        return out

    out = benchmark.pedantic(once, rounds=5, warmup_rounds=1)
    assert out["steps_run"] == s.steps
