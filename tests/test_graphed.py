"""The device-counter driver (lrfast/engine/loop.py drive_graph) without capture, on CPU tensors: the device-side
step counter, the static inputs read at it, the in-place tracker, warm-up + reset and the compile fallback give the
same curves as the eager driver (drive_eager), through the one step body (loop.Step). Capture itself runs on CUDA
(the tests marked cuda below)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _helpers import make_batches, make_mlp, triton_kernels

from lrfast import batches, optimizers, schedule, strategies
from lrfast.engine import loop, update
from lrfast.engine.arena import Arena
from lrfast.engine.forward import BatchedStep, ModuleStep
from lrfast.engine.tracker import Tracker
from lrfast.state import Snapshot

CPU = torch.device("cpu")


def _run(engine: str, k: int, strategy: str, *, optimizer="adamw", steps=12, threshold=None, dropout=0.0,
         wrap=None, compile=False, max_lr=1.0, device=CPU, graphs=False, strict=False, backend=None):  # fmt: skip
    """One run of the candidates of `strategy` on the MLP with BatchNorm; returns (losses, smoothed, steps, out).
    `wrap(build)`: a step builder made from the run's own (graphed engine)."""
    model = make_mlp(batchnorm=True, dropout=dropout).to(device)
    if optimizer == "adamw_groups":  # two param groups: LR ratio 10 (lr_scale 0.1 on the first), own weight decay
        first = list(model[0].parameters())
        rest = [p for p in model.parameters() if all(p is not q for q in first)]
        optimizer = torch.optim.AdamW([{"params": first, "lr": 1e-3}, {"params": rest, "lr": 1e-2, "weight_decay": 0}])
    plan = optimizers.resolve(optimizer, model)
    if strategy == "grid":
        table = schedule.grid(1e-4, max_lr, k, steps)
    else:
        table = schedule.table(1e-4, max_lr, steps, "exp", k=k)
    orders = strategies.orders(strategy, k, steps, seed=0)
    snap = Snapshot(model)
    try:
        torch.manual_seed(0)
        splits = batches.cache(make_batches(n=5), steps, device)
        arena = Arena(plan, k, device, backend)
        snap.lend(arena.segments, device)
        model.train()
        tracker = Tracker(k, steps, 0.98, threshold, device)
        lr_table = torch.tensor(table.T, dtype=torch.float64, device=device).contiguous()

        def build(compiled: bool):
            if k == 1:
                return ModuleStep(model, arena, None, compile=compiled)
            return BatchedStep(model, arena, None, randomness="different" if strategy == "seeds" else "same",
                               compile=compiled)  # fmt: skip

        step = loop.Step(None, arena, update.make(plan, arena), tracker, lr_table)
        if engine == "runner":
            step.forward = build(False)
            if k == 1:
                inputs = [splits[i] for i in orders[0]]
            elif strategy == "seeds":
                inputs = [[splits[i] for i in orders[:, t]] for t in range(steps)]
            else:
                inputs = splits
            out = loop.drive_eager(step, inputs)
            steps_run = out.steps_run
        else:
            index = torch.tensor(orders.T if strategy == "seeds" and k > 1 else orders[0], device=device)
            static = loop.StaticInputs(splits, index.contiguous())
            make_step = build if wrap is None else wrap(build)
            out = loop.drive_graph(step, static, make_step, compile=compile, graphs=graphs,
                                   buffers=lambda: _buffers(model, step.forward), strict=strict)  # fmt: skip
            steps_run = out.steps_run
        return tracker.losses.cpu().numpy(), tracker.smoothed.cpu().numpy(), steps_run, out
    finally:
        snap.restore()


def _buffers(model, forward) -> list:
    return list(model.buffers()) if isinstance(forward, ModuleStep) else list(forward.buffers.values())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("k, strategy", [(1, "sweep"), (3, "grid"), (3, "seeds")])
def test_device_counter_run_equals_the_eager_runner(k, strategy, optimizer):
    want = _run("runner", k, strategy, optimizer=optimizer)
    got = _run("graphed", k, strategy, optimizer=optimizer)
    np.testing.assert_array_equal(got[0], want[0])  # raw losses: the same operations, bitwise
    np.testing.assert_allclose(got[1], want[1], rtol=1e-14)  # smoothed: b**n by torch.pow vs Python's **
    assert got[2] == want[2] == 12


@pytest.mark.parametrize("optimizer", ["adamw_groups", "sgd"])
def test_the_triton_kernels_in_the_engine_equal_the_cpu_kernels(optimizer):
    """The GPU engine's optimizer path (Arena.update -> Triton: LR table at the device counter, alive mask, per-group
    LR scale), interpreted on CPU, gives the C++ kernels' curves within fp32 rounding; one candidate diverges and
    is frozen by the mask."""
    pytest.importorskip("triton")
    triton_kernels()  # compiled with CUDA (then the run is on the GPU: compiled kernels take CUDA tensors only)
    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    kwargs = dict(optimizer=optimizer, threshold=1.5, steps=10, max_lr=3.0 if optimizer == "sgd" else 1.0,
                  device=device)
    want = _run("graphed", 3, "grid", **kwargs)
    got = _run("graphed", 3, "grid", backend="triton", **kwargs)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5, equal_nan=True)
    assert got[2] == want[2]


def test_early_stop_on_the_device_equals_the_eager_runner():
    want = _run("runner", 3, "sweep", optimizer="sgd", threshold=2.0, steps=30, max_lr=1e3)
    got = _run("graphed", 3, "sweep", optimizer="sgd", threshold=2.0, steps=30, max_lr=1e3)
    assert got[2] == want[2] < 30  # every candidate diverged: the run stopped early
    np.testing.assert_array_equal(np.isnan(got[0]), np.isnan(want[0]))
    np.testing.assert_array_equal(got[0], want[0])


def test_warm_up_steps_do_not_change_the_result():
    """compile=True warms up first (one step, then the arena, BatchNorm stats, tracker, counter and RNG are reset);
    with a step builder that ignores the flag, the curves must equal a run without warm-up bitwise (dropout on)."""
    plain = _run("graphed", 1, "sweep", dropout=0.2)
    warmed = _run("graphed", 1, "sweep", dropout=0.2, compile=True, wrap=lambda build: lambda compiled: build(False))
    np.testing.assert_array_equal(warmed[0], plain[0])
    assert warmed[3].timings["compile"] > 0 and "compile" not in plain[3].timings


def test_compile_failure_falls_back_to_the_eager_step_with_the_reason():
    """A compiled step whose first call raises: the run resets and goes on eagerly, same curve, reason noted."""

    class Broken:
        def __init__(self, inner):
            self.buffers = inner.buffers

        def __call__(self, item):
            raise RuntimeError("inductor said no")

    calls = []

    def wrap(build):
        def make_step(compiled):
            calls.append(compiled)
            return Broken(build(False)) if compiled else build(False)

        return make_step

    plain = _run("graphed", 3, "grid")
    got = _run("graphed", 3, "grid", compile=True, wrap=wrap)
    assert calls == [True, False]
    np.testing.assert_array_equal(got[0], plain[0])
    assert got[3].compiled is False
    assert any("torch.compile failed" in n and "inductor said no" in n for n in got[3].notes)


def test_a_real_torch_compile_gives_the_eager_curve():
    """torch.compile (inductor, CPU) of the K = 1 forward: the curve equals the eager one within fp32 rounding."""
    plain = _run("graphed", 1, "sweep", steps=6)
    got = _run("graphed", 1, "sweep", steps=6, compile=True)
    assert got[3].compiled is True, got[3].notes
    np.testing.assert_allclose(got[0], plain[0], rtol=1e-5)


@pytest.mark.parametrize(
    "items, match",
    [
        ([batches.Split((torch.zeros(2, 3),), {}, None), batches.Split((torch.zeros(1, 3),), {}, None)],
         "differs in shape or dtype"),
        ([batches.Split((torch.zeros(2),), {}, None), batches.Split((torch.zeros(2), torch.zeros(2)), {}, None)],
         "differs in structure"),
        ([batches.Split((torch.zeros(2),), {"flag": True}, None), batches.Split((torch.zeros(2),), {"flag": False},
                                                                               None)],
         "non-tensor value"),
    ],
)  # fmt: skip
def test_inputs_that_cannot_be_replayed_say_why(items, match):
    with pytest.raises(loop.NotStatic, match=match):
        loop.StaticInputs(items, torch.arange(2))


def test_static_inputs_load_the_batch_of_the_device_step():
    items = [batches.Split((torch.full((2,), float(u)),), {"n": 3}, torch.tensor(u)) for u in range(4)]
    static = loop.StaticInputs(items, torch.tensor([2, 0, 3]))
    t = torch.tensor([2])
    split = static.load(t)
    assert split.args[0].tolist() == [3.0, 3.0] and int(split.target) == 3 and split.kwargs == {"n": 3}
    per = loop.StaticInputs(items, torch.tensor([[1, 2], [3, 0]]))
    k0, k1 = per.load(torch.tensor([1]))
    assert k0.args[0].tolist() == [3.0, 3.0] and k1.args[0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("like", [None, "lightning", "torch_lr_finder"])
def test_the_tracker_records_with_an_int_or_a_device_step_alike(like):
    """An int step on CPU records on the host (Python floats row by row up to SCALAR_ROWS candidates, numpy above),
    a device step with torch ops: the values are bitwise the same (NaN, divergence by threshold, a peer's
    smoothing)."""
    from lrfast.engine.tracker import SCALAR_ROWS

    two = [[1.0, 2.0], [0.9, 5.0], [0.8, 90.0], [0.7, 1.0], [0.6, math.nan]]
    wide = SCALAR_ROWS + 1
    seq = [[x * (1 + j / 7) for j in range(wide // 2 + 1) for x in row][:wide] for row in two]
    for k in (wide, SCALAR_ROWS, 2, 1):
        a, b = (Tracker(k, 5, 0.9, 3.0, CPU, like=like) for _ in range(2))
        for t, loss in enumerate(seq):
            a.record(t, torch.tensor(loss[:k], dtype=torch.float32))
            b.record(torch.tensor([t]), torch.tensor(loss[:k], dtype=torch.float32))
        for x, y in zip(a.tensors, b.tensors):
            assert torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0)), (k, x, y)
        assert a.steps_run.tolist() == ([5, 3] * wide)[:k] and a.alive.tolist() == ([True, False] * wide)[:k]
    one = Tracker(1, 5, 0.9, None, CPU)
    for t, loss in enumerate(two):
        one.record(t, torch.tensor(loss[1:]))
    assert one.steps_run.tolist() == [5] and one.alive.tolist() == [False]  # the NaN at the last step stops it


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("k, strategy", [(1, "sweep"), (4, "grid"), (4, "seeds")])
def test_cuda_graph_replay_equals_eager_steps_on_the_gpu_without_a_host_sync(k, strategy):
    """The captured step replayed S times (under set_sync_debug_mode("error"): any host sync in the loop raises)
    gives the eager GPU runner's curve."""
    gpu = torch.device("cuda")
    want = _run("runner", k, strategy, device=gpu)
    got = _run("graphed", k, strategy, device=gpu, graphs=True, strict=True)
    assert got[3].graphs is True, got[3].notes
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert set(got[3].timings) >= {"capture", "steps"}


@cuda
def test_cuda_graph_stops_when_every_candidate_diverged():
    gpu = torch.device("cuda")
    got = _run("graphed", 3, "sweep", optimizer="sgd", threshold=2.0, steps=60, max_lr=1e3, device=gpu, graphs=True)
    assert got[3].graphs is True and got[2] < 60 and got[3].steps_replayed < 60


# ---- through lrfast.find ----


def test_find_with_compile_on_cpu_runs_the_device_counter_engine_and_equals_eager(monkeypatch):
    """compile=True on CPU goes through loop.drive_graph (warm-up, reset, device counter); with torch.compile replaced
    by the identity the curves equal the default eager path bitwise, and the timings split compile from steps."""
    import lrfast

    model, data = make_mlp(batchnorm=True, dropout=0.1), make_batches(n=5)
    want = lrfast.find(model, data, steps=15, progress=False, candidates=3, strategy="seeds",
                       forward="vmap")  # compiled, the batched call runs
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    got = lrfast.find(model, data, steps=15, progress=False, candidates=3, strategy="seeds", compile=True)
    np.testing.assert_array_equal(got.losses, want.losses)
    assert got.info["compile"] is True and got.info["graphs"] is False
    assert {"compile", "steps", "setup", "total"} <= set(got.timings) and "compile" not in want.timings


def test_find_says_why_compile_is_off_for_a_generic_optimizer(monkeypatch):
    import lrfast

    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    res = lrfast.find(make_mlp(), make_batches(), optimizer=lambda p: torch.optim.RMSprop(p, lr=1.0), steps=5,
                      progress=False, compile=True)  # fmt: skip
    assert res.info["compile"] is False
    assert any("torch.optim" in n for n in res.info["notes"])


@cuda
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_find_k1_curve_equals_a_plain_eager_gpu_loop(compile):
    import lrfast

    gpu = torch.device("cuda")
    model, data = make_mlp().to(gpu), [(x.to(gpu), y.to(gpu)) for x, y in make_batches(n=5)]
    reference = [p.detach().clone() for p in model.parameters()]
    res = lrfast.find(model, data, optimizer="adamw", min_lr=1e-4, max_lr=3e-2, steps=30, early_stop_threshold=None,
                      progress=False, compile=compile)  # fmt: skip
    assert res.info["graphs"] is True and res.info["compile"] is compile, res.info["notes"]
    assert res.info["optimizer_path"] == "fused triton"
    plain = make_mlp().to(gpu)
    with torch.no_grad():
        for p, r in zip(plain.parameters(), reference):
            p.copy_(r)
    opt = torch.optim.AdamW(plain.parameters(), lr=1.0, foreach=False)
    expected = []
    for t, lr in enumerate(res.lrs[0]):
        x, y = data[t % len(data)]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(plain(x), y)
        loss.backward()
        opt.param_groups[0]["lr"] = float(lr)
        opt.step()
        expected.append(loss.item())
    np.testing.assert_allclose(res.losses[0], expected, rtol=1e-4, atol=1e-5)
    assert {"capture", "steps"} <= set(res.timings)


@cuda
def test_cuda_find_bf16_and_k16_grid_run_captured():
    import lrfast

    gpu = torch.device("cuda")
    model, data = make_mlp().to(gpu), [(x.to(gpu), y.to(gpu)) for x, y in make_batches(n=5)]
    res = lrfast.find(model, data, strategy="grid", candidates=16, min_lr=1e-4, max_lr=1e-1, steps=20,
                      precision="bf16", progress=False)  # fmt: skip
    assert res.info["graphs"] is True, res.info["notes"]
    assert np.isfinite(res.losses[:, 0]).all() and res.suggestion is not None


@cuda
def test_cuda_find_falls_back_to_eager_when_the_model_syncs_with_the_host():
    import lrfast

    class Syncing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_mlp()

        def forward(self, x):
            if float(x.abs().sum()) < 0:  # a host read: cannot be captured
                x = -x
            return self.net(x)

    gpu = torch.device("cuda")
    model, data = Syncing().to(gpu), [(x.to(gpu), y.to(gpu)) for x, y in make_batches(n=5)]
    res = lrfast.find(model, data, steps=10, progress=False, compile=False)
    assert res.info["graphs"] is False
    assert any("capture failed" in n for n in res.info["notes"])
    assert np.isfinite(res.losses[0]).all()


@pytest.mark.parametrize("strategy", ["grid", "seeds"])
def test_compiled_k_candidates_trace_one_graph(strategy, monkeypatch):
    """The loss is resolved by one uncompiled forward before the first compiled call: resolved inside the trace,
    Dynamo guarded on it and compiled the step twice (issue 16). Dynamo's eager backend: tracing without Inductor."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import lrfast

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: real(f, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    res = lrfast.find(make_mlp(), make_batches(), strategy=strategy, candidates=3, steps=4, progress=False,
                      compile=True)  # fmt: skip
    assert res.info["forward"] == "vmap (K=3), torch.compile" and res.info["compile"] is True
    assert counters["stats"]["unique_graphs"] == 1


@cuda
def test_a_capture_that_fails_leaves_the_callers_stream_current(monkeypatch):
    """torch's CUDAGraph.__exit__ calls capture_end before it leaves the capture stream: when capture_end raises,
    the eager fallback and the user's code must not run on the capture stream."""
    before = torch.cuda.current_stream()

    def fail(self):
        raise RuntimeError("injected: capture_end failed")

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_end", fail)
    gpu = torch.device("cuda")
    got = _run("graphed", 3, "grid", device=gpu, graphs=True)
    assert got[3].graphs is False and any("capture failed" in n for n in got[3].notes)
    assert torch.cuda.current_stream() == before
