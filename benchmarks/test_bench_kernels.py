"""pytest-benchmark suite of the optimizer-step kernels (benchmarks/bench_kernels.py's cases and contestants):
`pytest benchmarks/ --benchmark-only` (the default `pytest` run collects tests/ only). On a CUDA machine the
steps run there and every timed call ends in torch.cuda.synchronize()."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_kernels as bk

pytest.importorskip("pytest_benchmark")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("params, k", bk.CASES, ids=[f"{p}x{k}" for p, k in bk.CASES])
@pytest.mark.parametrize("kernel", bk.KERNELS)
def test_adamw_step(benchmark, kernel, params, k):
    why = bk.why_not(kernel, params * k, DEVICE)
    if why:
        pytest.skip(why)
    fn = bk.make_step(kernel, params, k, DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def step():
        fn()
        sync()

    step()
    benchmark.extra_info.update(params=params, k=k)
    benchmark.pedantic(step, rounds=3 if params * k >= bk.BIG else 50, warmup_rounds=1)
    if benchmark.stats:  # None under --benchmark-disable
        best = benchmark.stats.stats.min
        benchmark.extra_info["gbps_at_28_bytes_per_param"] = bk.BYTES_PER_PARAM * params * k / best / 1e9
