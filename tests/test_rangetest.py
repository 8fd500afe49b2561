"""lrfast.RangeTest: the range test inside the user's own loop. Around a hand-written loop it gives lrfast.find's
curve and suggestion (bitwise with torch.optim on both sides), sets every group's LR before each batch with the
groups' ratios kept, stops when the loss diverged, and restores the optimizers, the named modules (the same objects)
and the RNGs, also after an exception or Ctrl-C."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_same_rng, assert_same_state, make_batches, make_mlp, rng_states, state_of

import lrfast


def _loop(rt, model, optimizers, loader, fail_at: int = -1, seen: list | None = None):
    for t, (x, y) in enumerate(rt.batches(loader)):
        if t == fail_at:
            raise RuntimeError("the user's loop failed")
        if seen is not None:
            seen.append([g["lr"] for opt in optimizers for g in opt.param_groups])
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        rt.record(loss)


def _trained_optimizer(model, amsgrad=True):
    """An Adam that already has state (two real steps), as a user's mid-training optimizer."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=amsgrad)
    for x, y in make_batches(n=2, seed=9):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("like", [None, "lightning", "torch_lr_finder"])
def test_range_test_around_a_plain_loop_equals_find_bitwise(like):
    """With torch.optim's own Adam (amsgrad: lrfast.find runs it through torch.optim too) the loop's curve and
    suggestion are find's, bitwise, for lrfast's test and the peers'."""
    batches = make_batches(n=40, batch=32)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), amsgrad=True)
    with lrfast.RangeTest(opt, steps=40, max_lr=1.0, like=like, restore=model) as rt:
        _loop(rt, model, [opt], batches)
    want = lrfast.find(make_mlp(), batches, optimizer=lambda p: torch.optim.Adam(p, amsgrad=True), steps=40,
                       max_lr=1.0, like=like, progress=False)  # fmt: skip
    got = rt.result
    assert got.steps_run == want.steps_run and np.array_equal(got.lrs, want.lrs)
    np.testing.assert_array_equal(got.smoothed, want.smoothed)
    np.testing.assert_array_equal(got.losses, want.losses)
    assert got.suggestion == want.suggestion


def test_range_test_with_plain_adam_follows_finds_fused_kernel_to_rounding():
    """find runs plain Adam on its fused kernel (within 1 ulp of torch.optim per update): the loop's first loss is
    find's bitwise, and the curve agrees to 1e-6 relative over its first half (before large LRs amplify rounding)."""
    batches = make_batches(n=40, batch=32)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters())
    with lrfast.RangeTest(opt, steps=40, max_lr=1.0, restore=model) as rt:
        _loop(rt, model, [opt], batches)
    want = lrfast.find(make_mlp(), batches, optimizer="adam", steps=40, max_lr=1.0, progress=False)
    assert want.info["optimizer_path"].startswith("fused")
    got = rt.result
    assert got.losses[0, 0] == want.losses[0, 0]
    np.testing.assert_allclose(got.smoothed[0, :20], want.smoothed[0, :20], rtol=1e-6, atol=0)


def test_range_test_restores_model_optimizer_and_rng_by_identity():
    model = make_mlp(batchnorm=True, dropout=0.2)
    opt = _trained_optimizer(model)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    state = {p: dict(s) for p, s in opt.state.items()}
    values = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    groups = [dict(g) for g in opt.param_groups]
    model.eval()
    random.random(), np.random.rand(), torch.rand(1)  # the RNGs mid-stream
    before, rng = state_of(model), rng_states()
    with lrfast.RangeTest(opt, steps=15, restore=model) as rt:
        model.train()
        _loop(rt, model, [opt], make_batches(n=15))
    assert rt.result.steps_run > 0
    assert_same_state(before, state_of(model))
    assert_same_rng(rng, rng_states())
    assert all(a is b for a, b in zip(params, model.parameters())) and all(p.grad is g for p, g in zip(params, grads))
    assert set(opt.state) == set(state)
    for p, s in opt.state.items():
        assert all(s[k] is v for k, v in state[p].items())  # the same state tensors, their values back
        assert all(torch.equal(s[k], v) for k, v in values[p].items())
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in groups]  # fmt: skip
    assert not model.training


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_range_test_restores_everything_when_the_loop_raises(error):
    model = make_mlp()
    opt = _trained_optimizer(model)
    before, rng, lr = state_of(model), rng_states(), opt.param_groups[0]["lr"]
    with pytest.raises(error):
        with lrfast.RangeTest(opt, steps=20, restore=model) as rt:
            for t, (x, y) in enumerate(rt.batches(make_batches(n=20))):
                if t == 5:
                    raise error("the user's loop failed")
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                rt.record(loss)
    assert_same_state(before, state_of(model))
    assert_same_rng(rng, rng_states())
    assert opt.param_groups[0]["lr"] == lr and rt.result.steps_run == 5


def test_every_group_of_every_optimizer_gets_the_steps_lr_with_its_ratio_kept():
    """A GAN-like loop: two optimizers, one with two groups; the largest LR follows the sweep, the others keep their
    ratio to it; the recorded LRs are the sweep's."""
    gen, disc = make_mlp(seed=1), make_mlp(seed=2)
    layers = list(gen.children())
    opt_g = torch.optim.Adam([{"params": layers[0].parameters(), "lr": 2e-3},
                              {"params": [p for m in layers[1:] for p in m.parameters()], "lr": 1e-3}])  # fmt: skip
    opt_d = torch.optim.SGD(disc.parameters(), lr=4e-3, momentum=0.9)
    seen = []

    def both(x):
        return gen(x) + disc(x)

    with lrfast.RangeTest([opt_g, opt_d], steps=12, max_lr=1.0, restore=[gen, disc]) as rt:
        _loop(rt, both, [opt_g, opt_d], make_batches(n=12), seen=seen)
    sweep = rt.result.lrs[0]
    for t, (a, b, d) in enumerate(seen[: rt.result.steps_run]):
        assert d == sweep[t] and a == sweep[t] * 0.5 and b == sweep[t] * 0.25
    assert opt_d.param_groups[0]["lr"] == 4e-3 and opt_g.param_groups[1]["lr"] == 1e-3


def test_the_loop_stops_when_the_loss_diverged_and_at_steps():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters())
    with lrfast.RangeTest(opt, steps=50, min_lr=1e-3, max_lr=1e4, restore=model) as rt:
        _loop(rt, model, [opt], make_batches(n=50))
    assert rt.recorded == rt.result.steps_run < 50  # diverged: the generator ended right after the stop
    with lrfast.RangeTest(opt, steps=7, max_lr=1e-3, restore=model) as rt:
        _loop(rt, model, [opt], make_batches(n=3))  # a loader shorter than steps is re-iterated
    assert rt.recorded == 7 and rt.result.steps_run == 7


def test_no_restore_keeps_the_trained_weights_and_says_so():
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    with lrfast.RangeTest(opt, steps=5, max_lr=1e-2) as rt:
        _loop(rt, model, [opt], make_batches(n=5))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert any("restore=None" in n for n in rt.result.info["notes"])
    assert not opt.state  # the optimizer is always put back: it had no state


def test_misuse_is_a_clear_error():
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        lrfast.RangeTest(model)
    with pytest.raises(ValueError, match="min_lr"):
        lrfast.RangeTest(opt, min_lr=-1)
    with pytest.raises(TypeError, match="nn.Module"):
        lrfast.RangeTest(opt, restore=opt)
    rt = lrfast.RangeTest(opt, steps=3)
    with pytest.raises(RuntimeError, match="inside `with"):
        next(iter(rt.batches(make_batches(n=3))))
    with pytest.raises(RuntimeError, match="recorded no loss"):
        with lrfast.RangeTest(opt, steps=3, restore=model) as rt:
            for _ in rt.batches(make_batches(n=3)):
                pass
    with pytest.raises(TypeError, match="one-element tensor"):
        with lrfast.RangeTest(opt, steps=3, restore=model) as rt:
            for x, y in rt.batches(make_batches(n=3)):
                rt.record(F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(RuntimeError, match="no result yet"):
        lrfast.RangeTest(opt).result


def test_a_nan_loss_stops_the_loop_and_the_suggestion_cuts_at_it():
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters())
    with lrfast.RangeTest(opt, steps=30, max_lr=1e-2, restore=model) as rt:
        for t, (x, y) in enumerate(rt.batches(make_batches(n=30))):
            loss = F.cross_entropy(model(x), y)
            rt.record(loss * math.nan if t == 20 else loss)
    res = rt.result
    assert res.steps_run == 21 and np.isnan(res.smoothed[0, 20]) and res.recorded(0) == 21
