"""val_loader: every candidate scored on cached validation batches every val_every steps, training unchanged."""

import copy

import numpy as np
import pytest
import torch
from _helpers import make_batches, make_mlp
from torch import nn

import lrfast


def test_validation_losses_are_scored_every_val_every_steps_and_training_is_unchanged():
    model, train, val = make_mlp(batchnorm=True, dropout=0.2), make_batches(), make_batches(n=3, seed=9)
    kwargs = dict(min_lr=1e-4, max_lr=1e-1, steps=20, early_stop_threshold=None, progress=False)
    plain = lrfast.find(model, train, **kwargs)
    res = lrfast.find(model, train, val_loader=val, val_batches=2, val_every=5, **kwargs)
    assert np.array_equal(plain.losses, res.losses)  # scoring never changes training (dropout RNG, BN stats)
    scored = np.flatnonzero(~np.isnan(res.val_losses[0]))
    assert scored.tolist() == [4, 9, 14, 19]


def test_validation_loss_equals_an_eval_mode_forward_of_the_trained_weights():
    model, train, val = make_mlp(batchnorm=True), make_batches(), make_batches(n=2, seed=9)
    reference = copy.deepcopy(model)
    res = lrfast.find(model, train, optimizer="sgd", min_lr=1e-3, max_lr=1e-2, steps=3, val_loader=val,
                      val_every=3, early_stop_threshold=None, progress=False)  # fmt: skip
    opt = torch.optim.SGD(reference.parameters(), lr=1.0)
    for t in range(3):
        x, y = train[t]
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.param_groups[0]["lr"] = float(res.lrs[0, t])
        opt.step()
    reference.eval()
    with torch.no_grad():
        expected = np.mean([nn.functional.cross_entropy(reference(x), y).item() for x, y in val])
    assert res.val_losses[0, 2] == pytest.approx(expected, rel=1e-5)


def test_on_val_suggests_from_the_validation_curve_and_round_trips_json(tmp_path):
    res = lrfast.find(make_mlp(), make_batches(), steps=40, val_loader=make_batches(n=2, seed=9), val_every=1,
                      on="val", progress=False)  # fmt: skip
    n = res.steps_run
    assert res.suggestion == lrfast.suggest.valley(res.lrs[0][:n], res.val_losses[0][:n])
    res.to_json(tmp_path / "r.json")
    back = lrfast.LRFindResult.from_json(tmp_path / "r.json")
    assert back.on == "val" and np.array_equal(back.val_losses, res.val_losses, equal_nan=True)
    assert back.suggestion == res.suggestion


@pytest.mark.parametrize("strategy", ["grid", "seeds"])
def test_every_candidate_is_scored_on_validation(strategy):
    res = lrfast.find(make_mlp(), make_batches(), strategy=strategy, candidates=3, min_lr=1e-4, max_lr=1e-2,
                      steps=10, val_loader=make_batches(n=2, seed=9), val_every=5, progress=False)  # fmt: skip
    assert np.isfinite(res.val_losses[:, [4, 9]]).all() and np.isnan(res.val_losses[:, :4]).all()
    if strategy == "grid":  # candidate k's validation loss equals that of a K = 1 grid run at its LR
        one = lrfast.find(make_mlp(), make_batches(), strategy="grid", lrs=[float(res.lrs[1, 0])], steps=10,
                          val_loader=make_batches(n=2, seed=9), val_every=5, progress=False)  # fmt: skip
        np.testing.assert_allclose(res.val_losses[1, [4, 9]], one.val_losses[0, [4, 9]], rtol=1e-5)


@pytest.mark.parametrize("kwargs,words", [({"on": "val"}, ["on='val'", "val_loader"]),
                                          ({"on": "test"}, ["on='test'"]),
                                          ({"val_every": 0, "val_loader": []}, ["val_every=0"]),
                                          ({"val_batches": -1, "val_loader": []}, ["val_batches=-1"])])  # fmt: skip
def test_bad_validation_arguments_raise_before_training(kwargs, words):
    with pytest.raises(ValueError) as info:
        lrfast.find(make_mlp(), make_batches(), steps=5, progress=False, **kwargs)
    assert all(w in str(info.value) for w in words)


def test_a_validation_loader_shorter_than_val_batches_scores_each_batch_once():
    model, train, val = make_mlp(), make_batches(), make_batches(n=3, seed=9)
    res = lrfast.find(model, train, optimizer="sgd", min_lr=1e-9, max_lr=2e-9, steps=2, val_loader=val,
                      val_every=1, early_stop_threshold=None, progress=False)  # fmt: skip
    # at lr ~1e-9 the weights move ~1e-9: the score is the initial model's mean loss over the 3 batches, each once
    with torch.no_grad():
        want = np.mean([nn.functional.cross_entropy(model(x), y).item() for x, y in val])
        twice_0 = np.mean([nn.functional.cross_entropy(model(x), y).item() for x, y in [val[0], *val]])
    assert res.val_losses[0, 0] == pytest.approx(want, rel=1e-6) and abs(want - twice_0) > 1e-4
    assert any("val_loader has 3 batch(es), fewer than val_batches=4: each is scored once" in n
               for n in res.info["notes"])  # fmt: skip
