"""like=: lrfast reproduces each peer's range test on the same model, weights, batches and optimizer.

The optimizer is torch.optim.Adam(amsgrad=True) on both sides: lrfast runs it through torch.optim itself (its generic
path), so any difference left is the range test's own (schedule, smoothing, stop rule, suggestion) and the curves
must be bitwise equal. Lightning and torch-lr-finder run live (test dependencies); fastai runs live where installed,
and otherwise against its curve of the scripted model committed in tests/peers/ (a loss that is its batch's number:
the same curve on every machine; tests/peers/make.py regenerates them), as torch-lr-finder does when missing."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lrfast
from lrfast import peers
from lrfast.result import LRFindResult

PEERS_DIR = Path(__file__).parent / "peers"
sys.path.insert(0, str(PEERS_DIR))
import make  # noqa: E402 - tests/peers/make.py: the runs the committed curves come from

MODELS = list(make.MODELS)


def _lrfast(model: str, like: str, **kw) -> LRFindResult:
    net, loader = make.setup(model)
    return lrfast.find(net, loader, optimizer=make.ADAM(net.parameters()), loss_fn=make.loss_fn(model), like=like,
                       progress=False, **kw)  # fmt: skip


def _lightning(model: str) -> dict:
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.tuner import Tuner

    class Lit(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, i):
            x, y = batch
            return make.loss_fn(model)(self.net(x), y)

        def configure_optimizers(self):
            return make.ADAM(self.parameters())

    net, loader = make.setup(model)
    quiet = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch")]
    levels = [q.level for q in quiet]
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, max_epochs=10,
                                 default_root_dir=tmp)  # fmt: skip
            found = Tuner(trainer).lr_find(Lit(net), train_dataloaders=loader, update_attr=False)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
    return {"lrs": found.results["lr"], "losses": found.results["loss"], "suggestion": found.suggestion()}


def _peer(peer: str, model: str) -> dict:
    """The peer's own run: live where it is installed, else its committed curve (the scripted model's only: a real
    model's curve holds the rounding of the machine it ran on)."""
    if importlib.util.find_spec(peer) is not None:
        try:
            return (make.fastai_curve if peer == "fastai" else make.torch_lr_finder_curve)(model)
        except ImportError:  # installed, but not importable here (e.g. fastai without its dependencies)
            pass
    if model not in make.COMMITTED:
        pytest.skip(f"{peer} is not importable here and a {model}'s curve depends on the machine's kernels (only the "
                    f"scripted model's is committed); tests/peers/make.py says how to install it")  # fmt: skip
    return json.loads((PEERS_DIR / f"{peer}_{model}.json").read_text())


def _same_lengths_and_lrs(got: LRFindResult, want: dict) -> int:
    n = len(want["lrs"])
    assert got.recorded(0) == n
    assert np.array_equal(got.lrs[0, :n], np.array(want["lrs"], dtype=np.float64))  # the peer's arithmetic, bitwise
    return n


@pytest.mark.parametrize("model", MODELS)
def test_like_lightning_gives_lightnings_own_curve_and_suggestion_bitwise(model):
    want = _lightning(model)
    got = _lrfast(model, "lightning")
    n = _same_lengths_and_lrs(got, want)
    assert np.array_equal(got.smoothed[0, :n], np.array(want["losses"]))
    assert got.suggestion == want["suggestion"] and got.method == "steepest"
    assert got.lrs[0, 0] == 1e-8 and got.lrs[0, -1] == 1.0  # Lightning's defaults


@pytest.mark.parametrize("model", MODELS)
def test_like_torch_lr_finder_gives_its_own_curve_and_suggestion_bitwise(model):
    want = _peer("torch_lr_finder", model)
    got = _lrfast(model, "torch_lr_finder")
    n = _same_lengths_and_lrs(got, want)
    assert np.array_equal(got.smoothed[0, :n], np.array(want["losses"]))
    assert got.suggestion == want["suggestion"]
    assert got.lrs[0, 0] == 1e-3  # torch-lr-finder starts at the optimizer's lr


@pytest.mark.parametrize("model", MODELS)
def test_like_fastai_gives_its_own_curve_and_float32_suggestion(model):
    """fastai smooths in float32 (torch.lerp, then a float32 division): each smoothed point has its float32
    rounding, and an EMA with beta = 0.98 carries at most 1 / (1 - beta) = 50 of those along; lrfast smooths in
    float64 with fastai's float32 beta. Its suggestion is the float32 LR fastai returns."""
    want = _peer("fastai", model)
    got = _lrfast(model, "fastai")
    n = _same_lengths_and_lrs(got, want)
    ref = np.array(want["losses"])
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got.smoothed[0, :n] - ref) <= 50 * ulp)
    assert got.suggestion == want["suggestion"] == float(np.float32(want["suggestion"]))


def test_like_lightning_on_the_fused_kernels_follows_lightnings_curve_to_rounding(monkeypatch):
    """With plain Adam lrfast runs its fused kernel (within 1 ulp of torch.optim per update): the first points are
    bitwise Lightning's (no update yet, then 1 ulp of the weights), and the first half of the curve, before training
    at large LRs amplifies the rounding, agrees to 1e-6 relative (measured: 2e-8)."""
    monkeypatch.setattr(make, "ADAM", torch.optim.Adam)  # Lightning's side with plain Adam too
    want = _lightning("mlp")
    net, loader = make.setup("mlp")
    got = lrfast.find(net, loader, optimizer="adam", like="lightning", progress=False)
    assert got.info["optimizer_path"].startswith("fused")
    ref = np.array(want["losses"])
    assert got.smoothed[0, 0] == ref[0]
    half = len(ref) // 2
    np.testing.assert_allclose(got.smoothed[0, :half], ref[:half], rtol=1e-6, atol=0)


def test_peer_schedules_follow_their_formulas():
    lo, hi, n = 1e-8, 1.0, 100
    light = peers.sweep("lightning", lo, hi, n, "exp")
    assert light[0] == lo and light[1] == lo * (hi / lo) ** (2 / n) and light[-1] == hi  # the skipped exponent 1/N
    fast = peers.sweep("fastai", 1e-7, 10.0, n, "exp")
    assert fast[0] == 1e-7 and fast[-1] == 1e-7 * (10.0 / 1e-7) ** (99 / 100) < 10.0  # max_lr never reached
    tlf = peers.sweep("torch_lr_finder", 1e-3, 10.0, n, "linear")
    assert tlf[0] == 1e-3 and tlf[-1] == 10.0 and tlf[1] == 1e-3 + (1 / 99) * (10.0 - 1e-3)
    a, c, d = peers.smoothing("torch_lr_finder", 0.95, 3)
    assert (a, c, d) == ([0.0, 0.95, 0.95], [1.0, 0.05, 0.05], [1.0, 1.0, 1.0])  # seeded with the first loss
    a, c, d = peers.smoothing("lightning", 0.98, 2)
    assert d == [1 - 0.98**2, 1 - 0.98**3]  # Lightning counts one step too many


def test_like_takes_the_peers_defaults_only_where_lrfast_defaults_were_left_and_says_so():
    got = _lrfast("mlp", "lightning", steps=20, max_lr=0.1)
    assert got.lrs[0, 0] == 1e-8 and got.lrs[0, -1] == 0.1 and got.method == "steepest"
    note = next(n for n in got.info["notes"] if n.startswith("like='lightning'"))
    assert "min_lr=1e-08" in note and "max_lr" not in note and "suggestion='steepest'" in note


def test_like_sets_every_param_group_to_the_same_lr_and_says_so():
    net, loader = make.setup("mlp")
    layers = list(net.children())
    groups = [{"params": layers[0].parameters(), "lr": 1e-3}, {"params": [p for m in layers[1:] for p in
              m.parameters()], "lr": 1e-4}]  # fmt: skip
    got = lrfast.find(net, loader, optimizer=torch.optim.Adam(groups), like="torch_lr_finder", steps=20,
                      progress=False)  # fmt: skip
    assert got.lrs[0, 0] == 1e-3  # the largest group's lr
    assert any("every param group trains at the same LR" in n for n in got.info["notes"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(like="fastai", mode="linear"), "like='fastai' has no mode='linear'"),
    (dict(like="lightning", strategy="grid", candidates=4), "grid"),
    (dict(like="keras"), "like"),
    (dict(like="torch_lr_finder", optimizer=lambda p: torch.optim.Adam(p, lr=20.0)), "starts at the optimizer's lr"),
])  # fmt: skip
def test_bad_like_is_refused_before_any_step(kwargs, match):
    net, loader = make.setup("mlp")
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=match):
        lrfast.find(net, loader, progress=False, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


# --- NaN recorded before the stop (issue 17): suggestions cut at the steps run, never at the last finite point ---


def _nan_tail_result(like=None) -> LRFindResult:
    """30 steps, stopped at step 25 on a NaN smoothed loss (recorded), padded with NaN after; the loss drops at
    points 19 and 23, the last ones torch-lr-finder's and Lightning's windows keep."""
    lrs = np.geomspace(1e-5, 1.0, 30)
    smoothed = np.full(30, np.nan)
    k = np.arange(24)
    smoothed[:24] = 5.0 - 0.001 * k - 0.5 * (k >= 19) - 3.0 * (k >= 23)
    return LRFindResult(lrs, smoothed, smoothed, steps_run=25, runs=[25], method="steepest", like=like)


def test_suggestions_cut_at_the_steps_run_not_at_the_last_finite_point():
    res = _nan_tail_result()
    x, y = res.curve(0)
    assert res.recorded(0) == 25
    for method in lrfast.suggest.METHODS:  # fastai slices with the steps asked for (num_it), the others need not
        kw = {"num_it": 30} if method in ("valley", "slide", "minimum", "steep") else {}
        assert res.suggest(method) == lrfast.suggest.suggest(method, x[:25], y[:25], **kw), method
    # Lightning drops its last recorded point (the NaN at step 24): point 23 stays in, unlike the old trim at the
    # last finite point, which dropped it too
    assert res.suggest("steepest") == x[23] != lrfast.suggest.steepest(x[:24], y[:24])
    # torch-lr-finder's [10:-5] keeps point 19 of the 25 recorded (of 24, the old cut, it did not)
    assert res.suggest("torch_lr_finder") == x[19] != lrfast.suggest.torch_lr_finder(x[:24], y[:24])


def test_suggestions_on_a_nan_tail_equal_lightnings_own_rule():
    pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.tuner.lr_finder import _LRFinder

    res = _nan_tail_result()
    x, y = res.curve(0)
    finder = _LRFinder("exponential", 1e-5, 1.0, 30)
    finder.results = {"lr": x[:25].tolist(), "loss": y[:25].tolist()}
    with contextlib.redirect_stderr(None):
        want = finder.suggestion()
    assert want is not None and res.suggest("steepest") == want
    like = _nan_tail_result("lightning")  # a peer does not stop at a NaN: its list goes on, NaN, to step 30
    finder.results = {"lr": x.tolist(), "loss": y.tolist()}
    assert like.recorded(0) == 30 and like.suggest("steepest") == finder.suggestion()


def test_find_stopped_by_a_nan_loss_suggests_from_the_steps_it_ran():
    net, loader = make.setup("mlp")
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        loss = F.cross_entropy(out, y)
        return loss * math.nan if len(calls) > 40 else loss  # NaN from step 40 on (the first call is a probe)

    res = lrfast.find(net, loader, optimizer="adam", loss_fn=loss_fn, steps=60, progress=False)
    assert res.steps_run < 60 and np.isnan(res.smoothed[0, res.steps_run - 1])
    x, y = res.curve(0)
    n = res.steps_run
    assert res.suggestion == lrfast.suggest.valley(x[:n], y[:n], num_it=60)
    assert LRFindResult.from_dict(json.loads(json.dumps(res.to_dict(), default=str))).suggestion == res.suggestion


def test_a_method_that_picks_poorly_on_lrfasts_curves_is_said_in_the_notes():
    """steepest & co. are right on their peer's curve, poor on lrfast's (benchmarks/results/cpu/quality.md)."""
    poor = _lrfast("mlp", None, steps=20, suggestion="steepest")
    assert any("picks poorly on lrfast's curves" in n for n in poor.info["notes"])
    for res in (_lrfast("mlp", None, steps=20), _lrfast("mlp", "lightning", steps=20)):
        assert not any("picks poorly" in n for n in res.info["notes"])
