"""Faults during a run: a loader that raises, a loss that turns NaN for one candidate or for all of them, and out of
memory on the first chunk. After each: the model, the optimizer and the RNG are bitwise as they were, and no file
is left in the working directory or the temp dir."""

import contextlib
import copy
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_same_rng, assert_same_state, make_batches, make_mlp, rng_states, state_of
from torch import nn

import lrfast
from lrfast.engine import forward


def _temp_names() -> set:
    return {n for n in os.listdir(tempfile.gettempdir()) if "lrfast" in n.lower()}


@contextlib.contextmanager
def nothing_lost(model, tmp_path, monkeypatch, optimizer=None):
    """Around a faulty run: the model, the optimizer (state and param groups) and the RNG are bitwise unchanged,
    and no file appears in the working directory or (named like lrfast) in the temp dir."""
    monkeypatch.chdir(tmp_path)
    before, rng, temp = state_of(model), rng_states(), _temp_names()
    opt_before = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    yield
    assert_same_state(before, state_of(model))
    assert_same_rng(rng, rng_states())
    if optimizer is not None:
        after = optimizer.state_dict()
        assert after["param_groups"] == opt_before["param_groups"] and not after["state"] and not opt_before["state"]
        assert optimizer.param_groups[0]["params"] == list(model.parameters())
    assert list(tmp_path.iterdir()) == []
    assert _temp_names() <= temp


class RaisingLoader:
    """A re-iterable loader that raises at batch `at` (of each epoch)."""

    def __init__(self, at: int, exc: BaseException):
        self.batches, self.at, self.exc = make_batches(n=8), at, exc

    def __iter__(self):
        for t, b in enumerate(self.batches):
            if t == self.at:
                raise self.exc
            yield b


@pytest.mark.parametrize("strategy", ["sweep", "grid"])
def test_loader_raising_at_step_t_propagates_unchanged_before_training(strategy, tmp_path, monkeypatch):
    from lrfast.engine import loop

    def never(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(loop.Step, "__call__", never)  # batches are cached up front: the fault surfaces before step 0
    exc = OSError("the dataset's disk went away")
    model = make_mlp(batchnorm=True, dropout=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with nothing_lost(model, tmp_path, monkeypatch, opt):
        with pytest.raises(OSError) as info:
            lrfast.find(model, RaisingLoader(5, exc), optimizer=opt, steps=10, strategy=strategy, progress=False)
    assert info.value is exc


class Drifting(nn.Module):
    """An MLP plus a scalar `drift` whose loss term is drift itself (grad 1): plain SGD moves it by -lr per step, and
    the logits turn NaN once drift < -limit, i.e. from step floor(limit / lr) + 1 on, for that candidate only."""

    def __init__(self, limit: float = 2.2):
        super().__init__()
        self.net = make_mlp()
        self.drift = nn.Parameter(torch.zeros(()))
        self.limit = limit

    def forward(self, x):
        logits = self.net(x)
        return torch.where(self.drift < -self.limit, torch.full_like(logits, math.nan), logits), self.drift


def drift_loss(out, y):
    logits, drift = out
    return F.cross_entropy(logits, y) + drift


STEPS = 12


def test_nan_loss_for_one_candidate_freezes_it_and_the_others_go_on(tmp_path, monkeypatch):
    model = Drifting()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nothing_lost(model, tmp_path, monkeypatch, opt):
        res = lrfast.find(model, make_batches(), optimizer=opt, loss_fn=drift_loss, strategy="grid",
                          lrs=[1e-3, 1e-2, 0.5], steps=STEPS, early_stop_threshold=None, progress=False)  # fmt: skip
    assert res.steps_run == STEPS
    assert np.all(np.isfinite(res.losses[:2]))  # the others ran every step
    assert np.all(np.isfinite(res.losses[2, :5])) and np.all(np.isnan(res.losses[2, 5:]))  # NaN from step 5 on
    assert res.scores[2] == math.inf and res.suggestion in (1e-3, 1e-2)


def test_nan_loss_for_every_candidate_is_a_clean_early_stop(tmp_path, monkeypatch):
    model = Drifting()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nothing_lost(model, tmp_path, monkeypatch, opt):
        res = lrfast.find(model, make_batches(), optimizer=opt, loss_fn=drift_loss, strategy="grid",
                          lrs=[0.5, 1.0, 2.0], steps=STEPS, early_stop_threshold=None, progress=False)  # fmt: skip
    # NaN from step 5 (lr 0.5), 3 (lr 1) and 2 (lr 2): the run stops after step 5, the last candidate's stop
    assert res.steps_run == 6
    for k, first_nan in enumerate([5, 3, 2]):
        assert np.all(np.isfinite(res.losses[k, :first_nan])) and np.all(np.isnan(res.losses[k, first_nan:]))
    assert res.suggestion is None or res.suggestion in (0.5, 1.0, 2.0)
    assert all(s == math.inf for s in res.scores)


def test_nan_loss_in_a_sweep_stops_it_early_with_a_result(tmp_path, monkeypatch):
    model = Drifting(limit=0.5)
    with nothing_lost(model, tmp_path, monkeypatch):
        res = lrfast.find(model, make_batches(), optimizer="sgd", loss_fn=drift_loss, min_lr=1e-3, max_lr=1.0,
                          steps=30, early_stop_threshold=None, progress=False)  # fmt: skip
    assert 1 < res.steps_run < 30
    assert np.all(np.isfinite(res.losses[0, : res.steps_run - 1])) and np.isnan(res.losses[0, res.steps_run - 1])
    assert res.suggestion is None or 1e-3 <= res.suggestion <= 1.0


# --- out of memory on the first chunk: retried with half the candidates, the same curves ---

OOM_KW = dict(strategy="grid", lrs=[1e-3, 1e-2, 3e-2, 1e-1], steps=8, early_stop_threshold=None, progress=False,
              forward="vmap")


def _oom_when(monkeypatch, cls, too_many, exc=None, at_call=None):
    """cls.__call__ raises out of memory when its arena holds more than `too_many` candidates (on every call, or
    only on call `at_call`)."""
    original = cls.__call__
    calls = {"n": 0}

    def patched(self, item):
        calls["n"] += 1
        if self.arena.k > too_many and (at_call is None or calls["n"] == at_call):
            raise exc if exc is not None else torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, item)

    monkeypatch.setattr(cls, "__call__", patched)


def test_oom_on_the_first_chunk_retries_with_half_the_candidates(tmp_path, monkeypatch):
    model, batches = make_mlp(batchnorm=True), make_batches()
    whole = lrfast.find(model, batches, **OOM_KW)
    assert whole.info["chunk"] == 4
    _oom_when(monkeypatch, forward.BatchedStep, too_many=2)
    with nothing_lost(model, tmp_path, monkeypatch):
        res = lrfast.find(model, batches, **OOM_KW)
    assert res.info["chunk"] == 2 and res.info["forward"] == "vmap (K=2)"
    assert any("out of memory with 4 candidates" in n and "OutOfMemoryError" in n and "chunks of 2" in n
               for n in res.info["notes"])  # fmt: skip
    np.testing.assert_allclose(res.losses, whole.losses, rtol=1e-5)
    np.testing.assert_allclose(res.smoothed, whole.smoothed, rtol=1e-5)
    assert res.steps_run == whole.steps_run and res.suggestion == whole.suggestion


def test_oom_as_a_runtime_error_halves_down_to_one_candidate(tmp_path, monkeypatch):
    model, batches = make_mlp(), make_batches()
    whole = lrfast.find(model, batches, **OOM_KW)
    err = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes")
    _oom_when(monkeypatch, forward.BatchedStep, too_many=1, exc=err)
    with nothing_lost(model, tmp_path, monkeypatch):
        res = lrfast.find(model, batches, **OOM_KW)
    assert res.info["chunk"] == 1 and res.info["forward"] == "module (K=1)"
    notes = " | ".join(res.info["notes"])
    assert "out of memory with 4 candidates" in notes and "out of memory with 2 candidates" in notes
    np.testing.assert_allclose(res.losses, whole.losses, rtol=1e-5)


def test_oom_while_allocating_the_arena_is_retried_too(tmp_path, monkeypatch):
    from lrfast import run
    from lrfast.engine.arena import Arena

    class SmallArena(Arena):
        def __init__(self, plan, k, device, backend=None):
            if k > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (arena)")
            super().__init__(plan, k, device, backend)

    model, batches = make_mlp(), make_batches()
    whole = lrfast.find(model, batches, **OOM_KW)
    monkeypatch.setattr(run, "Arena", SmallArena)
    with nothing_lost(model, tmp_path, monkeypatch):
        res = lrfast.find(model, batches, **OOM_KW)
    assert res.info["chunk"] == 2
    np.testing.assert_allclose(res.losses, whole.losses, rtol=1e-5)


def test_oom_with_a_single_candidate_is_a_clear_error_and_nothing_changes(tmp_path, monkeypatch):
    from lrfast.engine import forward

    model = make_mlp(batchnorm=True, dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _oom_when(monkeypatch, forward.BatchedStep, too_many=0)
    _oom_when(monkeypatch, forward.ModuleStep, too_many=0)
    for kw in (OOM_KW, dict(steps=8, progress=False)):  # grid K=4 (4 -> 2 -> 1, then fails) and a sweep
        with nothing_lost(model, tmp_path, monkeypatch, opt):
            with pytest.raises(MemoryError) as info:
                lrfast.find(model, make_batches(), optimizer=opt, **kw)
        assert isinstance(info.value, torch.OutOfMemoryError)  # a caller's `except torch.OutOfMemoryError` holds
        message = str(info.value)
        for words in ("with a single candidate", "not even one candidate", "fewer steps", "smaller batches",
                      "max_memory", "CUDA out of memory"):  # fmt: skip
            assert words in message, f"{words!r} not in {message}"
        assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_oom_after_the_first_step_is_not_retried_and_propagates(tmp_path, monkeypatch):
    exc = torch.OutOfMemoryError("CUDA out of memory at step 3")
    _oom_when(monkeypatch, forward.BatchedStep, too_many=0, exc=exc, at_call=3)
    model = make_mlp()
    with nothing_lost(model, tmp_path, monkeypatch):
        with pytest.raises(torch.OutOfMemoryError) as info:
            lrfast.find(model, make_batches(), **OOM_KW)
    assert info.value is exc


def test_oom_inside_vmap_reaches_the_retry_instead_of_the_loop_fallback(tmp_path, monkeypatch):
    model, batches = make_mlp(), make_batches()
    whole = lrfast.find(model, batches, **OOM_KW)
    real = forward.BatchedStep._vmap

    def vmap_oom(self, item, rows=None):
        if self.arena.k > 2:
            raise torch.OutOfMemoryError("injected: out of memory inside vmap")
        return real(self, item, rows)

    monkeypatch.setattr(forward.BatchedStep, "_vmap", vmap_oom)
    with nothing_lost(model, tmp_path, monkeypatch):
        res = lrfast.find(model, batches, **OOM_KW)
    assert res.info["chunk"] == 2 and res.info["forward"] == "vmap (K=2)"
    np.testing.assert_allclose(res.losses, whole.losses, rtol=1e-5)


def test_oom_in_the_first_real_step_after_a_warm_up_is_retried_with_fewer_candidates(tmp_path, monkeypatch):
    """compile=True runs a warm-up step first (drive_graph); warm-ups are not steps, so an out-of-memory error in
    the first real step (the 2nd call of the forward) is still retried in smaller chunks (issue 16: captures)."""
    model, batches = make_mlp(), make_batches()
    whole = lrfast.find(model, batches, **OOM_KW)
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    _oom_when(monkeypatch, forward.BatchedStep, too_many=2, at_call=2)
    with nothing_lost(model, tmp_path, monkeypatch):
        res = lrfast.find(model, batches, compile=True, **OOM_KW)
    assert res.info["chunk"] == 2 and any("retried in chunks of 2" in n for n in res.info["notes"])
    np.testing.assert_allclose(res.losses, whole.losses, rtol=1e-5)
