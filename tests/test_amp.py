"""precision="bf16" / "fp16": autocast around the forward, fp32 weights; fp16 with one loss scale per candidate."""

import copy

import numpy as np
import pytest
import torch
from _helpers import make_batches, make_mlp
from torch import nn

import lrfast
from lrfast.engine.amp import Scaler


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_k1_amp_curve_equals_a_plain_autocast_loop(precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model, batches = make_mlp(), make_batches()
    reference = copy.deepcopy(model)
    res = lrfast.find(model, batches, optimizer="sgd", min_lr=1e-3, max_lr=1e-1, steps=12, precision=precision,
                      early_stop_threshold=None, progress=False)  # fmt: skip
    opt = torch.optim.SGD(reference.parameters(), lr=1.0)
    expected = []
    for t in range(12):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(reference(x), y)
        (loss.float() * (2.0**16 if precision == "fp16" else 1.0)).backward()
        if precision == "fp16":
            for p in reference.parameters():
                p.grad /= 2.0**16
        opt.param_groups[0]["lr"] = float(res.lrs[0, t])
        opt.step()
        expected.append(loss.item())
    np.testing.assert_allclose(res.losses[0], expected, rtol=1e-6)
    assert f"{precision} autocast" in res.info["forward"]


def test_fp16_scaler_halves_only_the_overflowing_candidates_scale_and_skips_its_step():
    scaler = Scaler(3, torch.device("cpu"), init=8.0, growth_interval=2)

    class Seg:
        g = torch.tensor([[8.0, 16.0], [float("inf"), 1.0], [4.0, 4.0]])

    ok = scaler.unscale_([Seg])
    assert ok.tolist() == [True, False, True] and Seg.g[0].tolist() == [1.0, 2.0]
    scaler.update(ok)
    assert scaler.scale.tolist() == [8.0, 4.0, 8.0] and scaler.skipped.tolist() == [0, 1, 0]
    scaler.update(torch.tensor([True, True, True]))
    assert scaler.scale.tolist() == [16.0, 4.0, 16.0]  # two clean steps in a row double the scale


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_grid_with_amp_runs_every_candidate(precision):
    res = lrfast.find(make_mlp(), make_batches(), strategy="grid", candidates=3, min_lr=1e-4, max_lr=1e-2, steps=8,
                      precision=precision, progress=False)  # fmt: skip
    assert np.isfinite(res.losses).all() and f"{precision} autocast" in res.info["forward"]


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision='fp8'.*fp32, bf16, fp16"):
        lrfast.find(make_mlp(), make_batches(), precision="fp8", progress=False)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_bf16_parameters_train_on_fp32_master_weights(optimizer):
    """A bf16 model: the arena keeps fp32 masters (and moments); the model computes with their bf16 rounding. The
    curve equals a plain loop doing exactly that (master update in fp32 with the bf16 grad, weights = master
    rounded), and the model's bf16 weights are restored bitwise."""
    model = make_mlp().to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in make_batches()]
    before = [p.detach().clone() for p in model.parameters()]
    reference = copy.deepcopy(model)
    res = lrfast.find(model, batches, optimizer=optimizer, min_lr=1e-3, max_lr=1e-1, steps=10,
                      early_stop_threshold=None, progress=False)  # fmt: skip
    masters = [p.detach().float().clone() for p in reference.parameters()]
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW)(masters, lr=1.0, foreach=False)
    expected = []
    for t, lr in enumerate(res.lrs[0]):
        x, y = batches[t % len(batches)]
        for p in reference.parameters():
            p.grad = None
        loss = nn.functional.cross_entropy(reference(x), y)  # in bf16, as the default loss computes it
        loss.backward()
        for master, p in zip(masters, reference.parameters()):
            master.grad = p.grad.float()
        opt.param_groups[0]["lr"] = float(lr)
        opt.step()
        with torch.no_grad():
            for master, p in zip(masters, reference.parameters()):
                p.copy_(master)
        expected.append(loss.item())
    np.testing.assert_allclose(res.losses[0], expected, rtol=1e-6)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # without masters, bf16 updates of lr ~1e-3 x grad would round away: the loss must move
    assert abs(res.losses[0][-1] - res.losses[0][0]) > 1e-3
