"""Distributed range tests (lrfast.find(..., distributed=...)) on 2 CPU processes with gloo on 127.0.0.1: a DDP
sweep over 2 ranks of batch b equals one process with batch 2b; candidates mode equals the one-process K-candidate
result; a rank that raises or stalls makes every rank raise within the timeout; every rank's model is untouched;
bad input is refused before any step; a DDP-wrapped model; the CLI under torchrun.

The two ranks are started once for the module (spawning costs ~1.5 s per process: importing torch) and run one
scenario per test: `_ranks.run("_scenario_name", **kwargs)` calls _scenario_name(rank, **kwargs) on both."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _helpers import assert_same_rng, assert_same_state, make_batches, make_mlp, rng_states, state_of

import lrfast

WORLD = 2
QUIET = dict(progress=False)
WAIT = 60  # seconds the test waits for a scenario: a hang fails the test instead of CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, port: int, conn) -> None:
    torch.set_num_threads(1)  # two ranks on CI's 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        while (job := conn.recv()) is not None:
            name, kwargs = job
            try:
                conn.send(("ok", globals()[name](rank, **kwargs)))
            except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
                conn.send(("error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class _Ranks:
    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        port = _free_port()
        self.conns, self.procs = [], []
        for rank in range(WORLD):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, port, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, name: str, **kwargs) -> list:
        for conn in self.conns:
            conn.send((name, kwargs))
        out = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(WAIT):
                raise AssertionError(f"rank {rank} did not answer {name} within {WAIT} s (a hang)")
            status, value = conn.recv()
            if status != "ok":
                raise AssertionError(f"rank {rank} failed in {name}:\n{value}")
            out.append(value)
        return out

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="module")
def ranks():
    r = _Ranks()
    yield r
    r.close()


def _shard(batches, rank: int):
    """Rank `rank`'s half of every batch: ranks with batch b together see the batches of 2b."""
    return [tuple(t.chunk(WORLD)[rank] for t in b) for b in batches]


def _checked_find(model, loader, **kwargs) -> dict:
    """find() on this rank, with its error, time and whether the model and RNG were left unchanged."""
    before, rng = state_of(model), rng_states()
    t0 = time.perf_counter()
    try:
        res, error = lrfast.find(model, loader, **kwargs), None
    except Exception as e:  # noqa: BLE001 - the test checks which error each rank raised
        res, error = None, e
    seconds = time.perf_counter() - t0
    assert_same_state(before, state_of(model))
    assert_same_rng(rng, rng_states())
    out = {"error": None if error is None else type(error).__name__, "message": str(error), "seconds": seconds}
    if res is not None:
        keys = ("losses", "smoothed", "val_losses", "steps_run", "lrs", "info", "suggestion", "timings")
        out.update({key: getattr(res, key) for key in keys if getattr(res, key) is not None})
    return out


def _default_group_works() -> bool:
    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t) == WORLD


# ---- scenarios: run on both ranks ----


def _scenario_ddp(rank, steps, kwargs, seed_by_rank=False):
    # seed_by_rank: rank 1's model is initialized differently; the run starts from rank 0's weights, and rank 1's
    # model is left as it was (checked by _checked_find)
    model, batches = make_mlp(seed=rank if seed_by_rank else 0), make_batches(n=steps, batch=32)
    val = _shard(make_batches(n=2, batch=32, seed=7), rank) if "val_every" in kwargs else None
    return _checked_find(model, _shard(batches, rank), steps=steps, val_loader=val, **kwargs, **QUIET)


def _scenario_candidates(rank, steps, kwargs):
    return _checked_find(make_mlp(), make_batches(n=steps), steps=steps, distributed="candidates", **kwargs, **QUIET)


class _FailOn:
    """A loss that raises on one rank at its n-th call, or sleeps there for `stall` seconds."""

    def __init__(self, rank, fail_rank, n, stall=0.0):
        self.rank, self.fail_rank, self.n, self.stall, self.calls = rank, fail_rank, n, stall, 0

    def __call__(self, out, y):
        self.calls += 1
        if self.rank == self.fail_rank and self.calls == self.n:
            if not self.stall:
                raise RuntimeError(f"injected failure on rank {self.rank}")
            time.sleep(self.stall)
        return torch.nn.functional.cross_entropy(out, y)


class _BrokenLoader:
    def __iter__(self):
        raise OSError("injected loader failure on rank 1")


def _scenario_fault(rank, stall, timeout, mode="ddp", where="step"):
    loss_fn = _FailOn(rank, fail_rank=1 if where == "step" else -1, n=6, stall=stall)
    batches = make_batches(n=20, batch=32)
    loader = _shard(batches, rank) if mode == "ddp" else batches
    if where == "loader" and rank == 1:
        loader = _BrokenLoader()
    kwargs = dict(strategy="grid", lrs=[1e-3, 1e-2]) if mode == "candidates" else {}
    got = _checked_find(make_mlp(), loader, steps=20, loss_fn=loss_fn, timeout=timeout, distributed=mode, **kwargs,
                        **QUIET)  # fmt: skip
    return {**got, "default_group_works": _default_group_works()}


def _scenario_bad_input(rank, case):
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        return torch.nn.functional.cross_entropy(out, y)

    model, batches, kwargs = make_mlp(), make_batches(n=4), dict(steps=4, loss_fn=loss_fn, **QUIET)
    if case == "fewer candidates than ranks":
        got = _checked_find(model, batches, distributed="candidates", **kwargs)
    elif case == "candidates on other batches":
        got = _checked_find(model, _shard(batches, rank), distributed="candidates", strategy="grid", candidates=2,
                            **kwargs)  # fmt: skip
    else:  # "other models": rank 1's hidden layer is wider
        torch.manual_seed(0)
        width = 16 + 8 * rank
        model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 3))
        got = _checked_find(model, batches, **kwargs)
    return {**got, "steps_trained": len(calls), "default_group_works": _default_group_works()}


def _scenario_compile_fails_on_rank_1(rank):
    """compile=True on CPU runs the device-counter driver; rank 1's torch.compile fails at its first call."""
    real = torch.compile

    def compile_(f, **kw):
        if rank == 0:
            return f

        def failing(*args, **kwargs):
            raise RuntimeError("injected: compile failed on rank 1")

        return failing

    torch.compile = compile_
    try:
        model, batches = make_mlp(), make_batches(n=8, batch=32)
        return _checked_find(model, _shard(batches, rank), steps=8, compile=True, **QUIET)
    finally:
        torch.compile = real


def _scenario_ddp_wrapped(rank):
    from torch.nn.parallel import DistributedDataParallel

    batches = _shard(make_batches(n=8, batch=32), rank)
    wrapped = DistributedDataParallel(make_mlp())
    before = state_of(wrapped.module)
    got = _checked_find(wrapped, batches, steps=8, **QUIET)
    bare = _checked_find(make_mlp(), batches, steps=8, **QUIET)
    assert_same_state(before, state_of(wrapped.module))
    x, y = batches[0]
    torch.nn.functional.cross_entropy(wrapped(x), y).backward()  # DDP still trains: its hooks average the grads
    grad = wrapped.module[0].weight.grad.clone()
    others = [torch.empty_like(grad) for _ in range(WORLD)]
    dist.all_gather(others, grad)
    return {"wrapped": got, "bare": bare, "grads_equal": all(torch.equal(o, grad) for o in others)}


def _local(t: torch.Tensor) -> torch.Tensor:
    """A tensor's values on this rank (an FSDP2 DTensor's shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _scenario_range_test(rank, wrap):
    """RangeTest in a loop over this rank's shard of the batches, the model as it is (each rank trains its own copy),
    in DDP, or sharded with FSDP2 (fully_shard per layer and the root, on a CPU mesh): the losses averaged over the
    ranks, the same stop on every rank; the model and the optimizer (which has state from a step before) restored."""
    import torch.nn.functional as F

    model = make_mlp()
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif wrap == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.children():
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters())
    batches = _shard(make_batches(n=12, batch=32), rank)
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    opt.step()  # state to restore
    params = [_local(p).detach().clone() for p in model.parameters()]
    states = [{k: _local(v).clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    with lrfast.RangeTest(opt, steps=12, max_lr=1.0, restore=model) as rt:
        for x, y in rt.batches(batches):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rt.record(loss)
    restored = all(torch.equal(a, _local(p)) for a, p in zip(params, model.parameters())) and all(
        torch.equal(v, _local(opt.state[p][k])) for s, p in zip(states, model.parameters()) for k, v in s.items())
    first = F.cross_entropy(model(batches[0][0]), batches[0][1]).detach()  # the restored model's loss, this rank
    total = first.clone()
    dist.all_reduce(total)
    return {"smoothed": rt.result.smoothed, "losses": rt.result.losses, "steps_run": rt.result.steps_run,
            "restored": restored, "mean_first": float(total) / WORLD, "info": rt.result.info}  # fmt: skip


# ---- tests ----


@pytest.mark.parametrize(
    "kwargs,seed_by_rank",
    [
        (dict(optimizer="adamw"), False),
        (dict(optimizer="adamw"), True),
        (dict(optimizer="sgd", strategy="grid", lrs=[1e-2, 1e-1, 1.0], val_every=4), False),
        (dict(optimizer="adam", accumulate=2, early_stop_threshold=1.5, max_lr=100.0), False),
    ],
    ids=["adamw-sweep", "adamw-sweep-ranks-initialized-differently", "sgd-grid-val", "adam-accumulate-early-stop"],
)
def test_ddp_two_ranks_of_batch_b_equal_one_process_of_batch_2b(ranks, kwargs, seed_by_rank):
    steps = 16
    accumulate = kwargs.get("accumulate", 1)
    got = ranks.run("_scenario_ddp", steps=steps * accumulate, kwargs=kwargs, seed_by_rank=seed_by_rank)
    model, batches = make_mlp(), make_batches(n=steps * accumulate, batch=32)
    val = make_batches(n=2, batch=32, seed=7) if "val_every" in kwargs else None
    one = lrfast.find(model, batches, steps=steps * accumulate, val_loader=val, **kwargs, **QUIET)
    assert got[0]["error"] is None and got[0]["info"]["distributed"] == dict(mode="ddp", world_size=2, rank=0,
                                                                             backend="gloo")  # fmt: skip
    for key in ("losses", "smoothed", "val_losses", "lrs"):  # every rank returns the same result, bitwise
        if key in got[0]:
            np.testing.assert_array_equal(got[0][key], got[1][key])
    assert got[0]["steps_run"] == got[1]["steps_run"] == one.steps_run
    if "early_stop_threshold" in kwargs:
        assert one.steps_run < steps * accumulate  # the stop is decided from the global loss, the same step
    # fp32: the mean of two half-batch means (each rank's loss and grads, then (a + b) / 2) rounds differently from
    # the mean over 2b in one reduction; measured <= 4e-7 relative over these 16 steps, so 2e-6 (~16 fp32 ulps)
    np.testing.assert_allclose(got[0]["losses"], one.losses, rtol=2e-6)
    np.testing.assert_allclose(got[0]["smoothed"], one.smoothed, rtol=2e-6)
    if val is not None:
        np.testing.assert_allclose(got[0]["val_losses"], one.val_losses, rtol=2e-6)
    assert got[0]["suggestion"] == pytest.approx(one.suggestion, rel=1e-6)


@pytest.mark.parametrize("strategy,k", [("grid", 4), ("grid", 5), ("seeds", 3)])
def test_candidates_mode_splits_k_over_ranks_and_equals_one_process(ranks, strategy, k):
    kwargs = dict(optimizer="adam", strategy=strategy, candidates=k, min_lr=1e-4, max_lr=1e-1)
    got = ranks.run("_scenario_candidates", steps=12, kwargs=kwargs)
    one = lrfast.find(make_mlp(), make_batches(n=12), steps=12, **kwargs, **QUIET)
    assert got[0]["info"]["distributed"]["shards"] == [[0, k // 2], [k // 2, k]]
    for key in ("losses", "smoothed", "lrs"):
        np.testing.assert_array_equal(got[0][key], got[1][key])
    assert got[0]["losses"].shape == (k, 12) and got[0]["steps_run"] == got[1]["steps_run"] == one.steps_run
    # a candidate's maths does not depend on its shard, but vmap over K/2 vs K candidates (or the module itself for
    # 1) may batch the matmuls differently: measured bitwise equal for grid, <= 1.2e-7 relative for seeds-3 (K=1)
    np.testing.assert_allclose(got[0]["losses"], one.losses, rtol=1e-6)
    np.testing.assert_allclose(got[0]["smoothed"], one.smoothed, rtol=1e-6)
    assert got[0]["suggestion"] == pytest.approx(one.suggestion, rel=1e-6)
    # each rank reports its own seconds (the merged result summed every rank's: the same number on both ranks)
    assert got[0]["timings"]["steps"] != got[1]["timings"]["steps"]


@pytest.mark.parametrize(
    "mode,where,error",
    [
        ("ddp", "step", "RuntimeError: injected failure on rank 1"),  # rank 0 waits in the step's all-reduce
        ("ddp", "loader", "OSError: injected loader failure on rank 1"),  # rank 0 waits in the set-up check
        ("candidates", "step", "RuntimeError: injected failure on rank 1"),  # rank 0 waits in the final gather
    ],
)
def test_rank_raising_makes_every_rank_raise_at_once_and_state_is_restored(ranks, mode, where, error):
    got = ranks.run("_scenario_fault", stall=0.0, timeout=30.0, mode=mode, where=where)
    assert f"{got[1]['error']}: {got[1]['message']}" == error  # the rank that raised: its own error
    assert got[0]["error"] == "DistributedError" and "rank 0 of 2" in got[0]["message"]
    assert "Another rank most likely raised" in got[0]["message"]
    assert got[0]["seconds"] < 5.0  # the failing rank closed lrfast's group: no wait for the 30 s timeout
    assert got[0]["default_group_works"] and got[1]["default_group_works"]  # only lrfast's own group is gone


def test_rank_stalling_makes_every_rank_raise_within_the_timeout(ranks):
    got = ranks.run("_scenario_fault", stall=2.5, timeout=1.0)
    assert got[0]["error"] == got[1]["error"] == "DistributedError"
    assert "timeout=1 s" in got[0]["message"]
    assert 1.0 <= got[0]["seconds"] < 2.5  # rank 0 gave up after the timeout, before rank 1 woke up
    assert got[0]["default_group_works"] and got[1]["default_group_works"]


@pytest.mark.parametrize(
    "case,match",
    [
        ("fewer candidates than ranks", "every rank needs at least one; pass candidates >= 2"),
        ("candidates on other batches", "rank 1 read other batches than rank 0"),
        ("other models", "rank 1 has parameters=291 but rank 0 has 195"),
    ],
)
def test_bad_distributed_input_is_refused_on_every_rank_before_any_step(ranks, case, match):
    got = ranks.run("_scenario_bad_input", case=case)  # each rank also checked that its model and RNG are unchanged
    for g in got:
        assert g["error"] == "ValueError" and match in g["message"], g["message"]
        assert g["steps_trained"] == 0 and g["default_group_works"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(distributed="ddp"), "needs an initialized process group: run under torchrun"),
        (dict(distributed="candidates", strategy="grid"), "call torch.distributed.init_process_group()"),
        (dict(distributed="dp"), "distributed='dp' is not a mode"),
        (dict(timeout=0), "timeout=0 must be a positive number of seconds"),
        (dict(timeout="60"), "timeout='60' must be a positive number"),
    ],
)
def test_bad_distributed_arguments_without_a_group_are_refused(kwargs, match):
    model = make_mlp()
    before = state_of(model)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        lrfast.find(model, make_batches(), steps=4, **kwargs, **QUIET)
    assert_same_state(before, state_of(model))


def test_without_a_group_distributed_none_and_off_run_single_process():
    res = lrfast.find(make_mlp(), make_batches(), steps=4, **QUIET)
    off = lrfast.find(make_mlp(), make_batches(), steps=4, distributed="off", **QUIET)
    assert "distributed" not in res.info and "distributed" not in off.info
    np.testing.assert_array_equal(res.losses, off.losses)


def test_a_compile_failure_on_one_rank_makes_every_rank_run_the_eager_forward(ranks):
    """The fallback is decided collectively (warm-ups run without the ranks' averaging, then the ranks agree), so
    no rank runs extra all-reduces: both ranks fall back, finish, and return the same curve as without compile."""
    got = ranks.run("_scenario_compile_fails_on_rank_1")
    plain = ranks.run("_scenario_ddp", steps=8, kwargs={})
    assert got[0]["error"] is None and got[1]["error"] is None
    assert got[0]["info"]["compile"] is False and got[1]["info"]["compile"] is False
    assert any("failed on another rank" in n for n in got[0]["info"]["notes"])
    assert any("injected: compile failed on rank 1" in n for n in got[1]["info"]["notes"])
    np.testing.assert_array_equal(got[0]["losses"], got[1]["losses"])
    np.testing.assert_array_equal(got[0]["losses"], plain[0]["losses"])


def test_ddp_wrapped_model_is_accepted_and_left_working(ranks):
    got = ranks.run("_scenario_ddp_wrapped")
    for g in got:
        assert g["wrapped"]["error"] is None and g["grads_equal"]
        np.testing.assert_array_equal(g["wrapped"]["losses"], g["bare"]["losses"])


@pytest.mark.parametrize("wrap", ["none", "ddp", "fsdp2"])
def test_range_test_averages_the_ranks_losses_stops_them_together_and_restores_sharded_models(ranks, wrap):
    got = ranks.run("_scenario_range_test", wrap=wrap)
    for g in got:
        assert g["restored"] and g["info"]["distributed"]["world"] == WORLD
    np.testing.assert_array_equal(got[0]["smoothed"], got[1]["smoothed"])  # every rank recorded the same curve
    assert got[0]["steps_run"] == got[1]["steps_run"]
    # step 0's recorded loss is the mean of the ranks' losses on their shards (the restored model's, recomputed)
    assert got[0]["losses"][0, 0] == pytest.approx(got[0]["mean_first"], rel=1e-6)


TARGET = """
import torch
import torch.distributed as dist

def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(8)]
    rank = dist.get_rank()  # the CLI joined the group before calling this
    return model, [(x.chunk(2)[rank], y.chunk(2)[rank]) for x, y in batches]
"""


def test_cli_under_torchrun_runs_ddp_and_only_rank_0_prints_and_writes(tmp_path):
    (tmp_path / "target_dist.py").write_text(TARGET)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "lrfast.cli", "find", "target_dist:make", "--out", str(out),
           "--steps", "8", "--no-progress", "--timeout", "30"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("suggested LR") == 1 and proc.stdout.count("wrote ") == 1, proc.stdout
    assert sorted(os.listdir(out)) == ["lr_find.json", "lr_find.png"]
    info = json.loads((out / "lr_find.json").read_text())["info"]
    assert info["distributed"] == dict(mode="ddp", world_size=2, rank=0, backend="gloo")
