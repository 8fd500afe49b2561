"""The user's model, grads, buffers, training flags, optimizer and RNG states are bitwise unchanged after find(),
whether it returns or raises (KeyboardInterrupt included), and no file is written."""

import os
import tempfile

import pytest
import torch
from _helpers import assert_same_rng, assert_same_state, make_batches, make_mlp, rng_states, state_of
from torch import nn

import lrfast


def _model_with_everything():
    model = make_mlp(batchnorm=True, dropout=0.2)
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)  # a stale grad the user has
    model.eval()
    model[1].train()  # mixed training flags
    return model


def _interrupt_at(step, exc):
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        if calls["n"] == step:
            raise exc
        return nn.functional.cross_entropy(out, y)

    return loss_fn


def test_find_leaves_model_and_rng_bitwise_unchanged_after_returning():
    model = _model_with_everything()
    before, rng = state_of(model), rng_states()
    res = lrfast.find(model, make_batches(), steps=20, progress=False)
    assert res.steps_run == 20
    assert_same_state(before, state_of(model))
    assert_same_rng(rng, rng_states())


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")], ids=["keyboard_interrupt", "error"])
def test_find_restores_model_after_an_interruption_mid_run(exc):
    model = _model_with_everything()
    before, rng = state_of(model), rng_states()
    with pytest.raises(type(exc)):
        lrfast.find(model, make_batches(), loss_fn=_interrupt_at(7, exc), steps=20, progress=False)
    assert_same_state(before, state_of(model))
    assert_same_rng(rng, rng_states())


def test_find_restores_model_when_the_loader_raises():
    def loader():
        yield from make_batches(n=2)
        raise KeyboardInterrupt

    model = _model_with_everything()
    before, rng = state_of(model), rng_states()
    with pytest.raises(KeyboardInterrupt):
        lrfast.find(model, loader(), steps=5, progress=False)
    assert_same_state(before, state_of(model))
    assert_same_rng(rng, rng_states())


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_find_leaves_the_users_optimizer_and_its_state_untouched(optimizer):
    model = make_mlp()
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.RMSprop
    opt = cls(model.parameters(), lr=3e-3)
    x, y = make_batches(n=1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # the user's optimizer has state
    before_opt = {k: (v.clone() if torch.is_tensor(v) else v) for s in opt.state.values() for k, v in s.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    before = state_of(model)
    lrfast.find(model, make_batches(), optimizer=opt, steps=10, progress=False)
    after_opt = {k: v for s in opt.state.values() for k, v in s.items()}
    assert before_opt.keys() == after_opt.keys()
    for k in before_opt:
        assert torch.equal(torch.as_tensor(before_opt[k]), torch.as_tensor(after_opt[k]))
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert_same_state(before, state_of(model))


def test_find_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    temp_before = set(os.listdir(tempfile.gettempdir()))
    lrfast.find(make_mlp(), make_batches(), steps=10, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert set(os.listdir(tempfile.gettempdir())) - temp_before == set()
