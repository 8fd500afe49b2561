"""cache= (issue 20): the batches on the device up front ("device") or in host memory, each step's batch copied in
just before its step ("host": pinned on CUDA; the same plumbing runs on CPU). The curves are bitwise equal between
the modes, on the eager path and on the device-counter engine (compile=True), for shared and per-candidate batches;
result.info says where the batches were; the memory estimate counts the batches the device holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import make_batches, make_mlp

import lrfast
from lrfast.engine import memory

RUNS = {
    "sweep": dict(),
    "grid": dict(strategy="grid", lrs=[1e-3, 1e-2, 1e-1], forward="vmap"),
    "seeds": dict(strategy="seeds", candidates=3, forward="vmap"),  # a batch order per candidate: index [S, K]
    "seeds_loop": dict(strategy="seeds", candidates=3, forward="loop"),
    "accumulate": dict(accumulate=2),
}


def _find(cache, compile=False, **kw):
    return lrfast.find(make_mlp(batchnorm=True, dropout=0.1), make_batches(n=7, batch=16), steps=10, max_lr=1.0,
                       cache=cache, compile=compile, progress=False, **kw)  # fmt: skip


@pytest.mark.parametrize("run", list(RUNS))
def test_host_and_device_caches_give_bitwise_equal_curves(run):
    device, host = _find("device", **RUNS[run]), _find("host", **RUNS[run])
    np.testing.assert_array_equal(host.losses, device.losses)
    np.testing.assert_array_equal(host.smoothed, device.smoothed)
    assert host.info["cache"]["mode"] == "host" and device.info["cache"]["mode"] == "device"
    assert host.info["cache"]["bytes"] == device.info["cache"]["bytes"] > 0
    assert host.info["cache"]["on_device"] == 0 < device.info["cache"]["on_device"]


@pytest.mark.parametrize("run", ["sweep", "seeds"])
def test_host_cache_on_the_device_counter_engine_fills_the_static_buffers_step_by_step(run, monkeypatch):
    """compile=True on CPU runs loop.drive_graph (static inputs, warm-ups, reset, the device counter); with the
    compiler replaced by the identity the host inputs are copied in before every step, and the curves are those of
    the device cache, bitwise."""
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    device, host = _find("device", compile=True, **RUNS[run]), _find("host", compile=True, **RUNS[run])
    assert host.info["compile"] is True
    np.testing.assert_array_equal(host.losses, device.losses)
    # the graphed engine stacks the batches once more: the estimate counts them twice
    assert device.info["cache"]["on_device"] == 2 * device.info["cache"]["bytes"]


def test_auto_on_cpu_keeps_the_batches_where_they_are_and_says_so():
    res = _find("auto")
    batch = make_batches(n=1, batch=16)[0]
    assert res.info["cache"] == {"mode": "device", "bytes": 10 * sum(t.nbytes for t in batch),
                                 "on_device": 10 * sum(t.nbytes for t in batch)}  # fmt: skip


def test_the_memory_estimate_counts_the_cached_batches_and_the_oom_message_names_cache_host():
    res = _find("device", strategy="grid", lrs=[1e-3, 1e-2])
    assert res.info["memory"]["batches"] == res.info["cache"]["on_device"] > 0
    assert _find("host", strategy="grid", lrs=[1e-3, 1e-2]).info["memory"]["batches"] == 0
    message = memory.oom_message(RuntimeError("x"), "cuda:0", 100, 1, res.info["memory"])
    assert "cache='host'" in message
    with pytest.raises(ValueError, match="cache='host' keeps them"):
        _find("device", strategy="grid", lrs=[1e-3, 1e-2], max_memory=res.info["memory"]["per_candidate"])


def test_a_bad_cache_is_refused():
    with pytest.raises(ValueError, match="cache="):
        _find("gpu")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_host_cache_on_cuda_holds_a_few_batches_on_the_device(graphs):
    """200 steps of 1 MiB batches: with cache='host' the device holds the static buffers (graphed) or the step's
    and the next batch (eager), not the 200 MiB (400 with the stacked copy) cache='device' holds."""
    gpu = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4096, 10)).to(gpu)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 4096, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(200)]
    peaks = {}
    for cache in ("device", "host"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = lrfast.find(model, batches, steps=200, max_lr=1e-2, cache=cache, graphs=graphs, compile=False,
                          early_stop_threshold=None, progress=False)  # fmt: skip
        peaks[cache] = torch.cuda.max_memory_allocated() - base
        assert res.info["cache"]["mode"] == cache
    batch = 64 * 4096 * 4
    assert peaks["device"] > 150 * batch and peaks["host"] < 20 * batch, peaks
