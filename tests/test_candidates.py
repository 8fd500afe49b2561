"""K candidates in one pass (lrfast.find(..., candidates=K, strategy=...)): grid curves equal K = 1 runs and do
not depend on K, diverging candidates freeze, seeds are deterministic with a median / band / interval, the loop
fallback, generic optimizers, max_memory chunking, user-state safety, errors, JSON and plots."""

import contextlib
import math

import numpy as np
import pytest
import torch
from _helpers import assert_same_rng, assert_same_state, make_batches, make_mlp, rng_states, state_of
from torch import nn

import lrfast
from lrfast import strategies
from lrfast.result import LRFindResult

QUIET = dict(progress=False, early_stop_threshold=None)


def digits_mlp_batches(n=12, batch=32):
    from lrfast.data import digits

    x, y = digits().tensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return model, [(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(n)]


def test_grid_candidate_equals_k1_run_and_does_not_depend_on_k():
    model, batches = digits_mlp_batches()
    lrs16 = np.geomspace(1e-4, 1e-2, 16)
    lrs4 = lrs16[::5]  # 4 of the 16 LRs
    k16 = lrfast.find(model, batches, optimizer="adam", strategy="grid", lrs=lrs16, steps=25, forward="vmap", **QUIET)
    k4 = lrfast.find(model, batches, optimizer="adam", strategy="grid", lrs=lrs4, steps=25, forward="vmap", **QUIET)
    assert k16.info["forward"] == "vmap (K=16)" and k4.losses.shape == (4, 25)
    for j, lr in enumerate(lrs4):
        k1 = lrfast.find(model, batches, optimizer="adam", strategy="grid", lrs=[lr], steps=25, **QUIET)
        assert k1.info["forward"] == "module (K=1)"
        # fp32: vmapped bmm and eager mm round differently (~1e-7 per step); Adam at lr <= 1e-2 keeps it < 1e-5
        np.testing.assert_allclose(k4.losses[j], k1.losses[0], rtol=1e-5)
        np.testing.assert_allclose(k4.losses[j], k16.losses[5 * j], rtol=1e-5)


def test_grid_batchnorm_running_stats_are_per_candidate():
    batches = make_batches()
    model = make_mlp(batchnorm=True)
    res = lrfast.find(model, batches, strategy="grid", lrs=[1e-3, 3e-2], steps=12, **QUIET)
    for k, lr in enumerate([1e-3, 3e-2]):
        k1 = lrfast.find(model, batches, strategy="grid", lrs=[lr], steps=12, **QUIET)
        np.testing.assert_allclose(res.losses[k], k1.losses[0], rtol=1e-5)


def test_grid_lrs_are_log_spaced_from_min_to_max_and_constant():
    res = lrfast.find(make_mlp(), make_batches(), strategy="grid", candidates=5, min_lr=1e-4, max_lr=1.0, steps=6,
                      progress=False)  # fmt: skip
    assert res.lrs[0, 0] == 1e-4 and res.lrs[-1, 0] == 1.0
    np.testing.assert_allclose(res.lrs[:, 0], [1e-4, 1e-3, 1e-2, 1e-1, 1.0], rtol=1e-12)
    assert np.all(res.lrs == res.lrs[:, :1])


def test_diverging_candidate_is_frozen_and_the_others_go_on():
    res = lrfast.find(make_mlp(), make_batches(), optimizer="sgd", strategy="grid", lrs=[1e-2, 1e4], steps=30,
                      progress=False)  # fmt: skip
    assert res.steps_run == 30
    assert np.all(np.isfinite(res.losses[0]))
    stopped = int(np.argmax(np.isnan(res.losses[1])))
    assert 0 < stopped < 30 and np.all(np.isnan(res.losses[1, stopped:]))
    assert res.scores[1] == math.inf and math.isfinite(res.scores[0])
    assert res.suggestion == 1e-2


def test_run_stops_when_every_candidate_has_diverged():
    res = lrfast.find(make_mlp(), make_batches(), optimizer="sgd", strategy="grid", lrs=[1e4, 1e5], steps=60,
                      progress=False)  # fmt: skip
    assert res.steps_run < 60 and res.suggestion is None


def test_grid_score_is_tail_mean_and_suggestion_is_largest_lr_within_tolerance():
    losses = np.array([[5.0] * 10, [4.0] * 9 + [1.0], [4.0] * 9 + [1.04], [2.0] * 9 + [np.nan]])
    scores = strategies.grid_scores(losses)
    np.testing.assert_array_equal(scores, [5.0, 1.0, 1.04, np.inf])
    lrs = np.array([1e-3, 1e-2, 1e-1, 1.0])
    assert strategies.grid_suggestion(lrs, scores, 0.05) == 1e-1
    assert strategies.grid_suggestion(lrs, scores, 0.0) == 1e-2
    res = LRFindResult(np.repeat(lrs[:, None], 10, 1), losses, losses, 10, strategy="grid", tolerance=0.0)
    assert res.suggestion == 1e-2


def test_seeds_are_deterministic_differ_by_replica_and_give_median_and_interval():
    kw = dict(strategy="seeds", candidates=4, min_lr=1e-4, max_lr=1.0, steps=30, seed=3, progress=False, forward="vmap")
    a = lrfast.find(make_mlp(dropout=0.2), make_batches(), **kw)
    b = lrfast.find(make_mlp(dropout=0.2), make_batches(), **kw)
    assert a.info["forward"] == "vmap (K=4)"
    np.testing.assert_array_equal(a.losses, b.losses)
    assert not np.allclose(a.losses[0], a.losses[1])
    per = a.replica_suggestions()
    assert set(per) == set(lrfast.suggest.METHODS) and all(len(v) == 4 for v in per.values())
    lo, hi = a.interval
    assert lo <= a.suggestion <= hi
    median, low, high = a.band
    assert median.shape == (30,) and np.all(low[:5] <= median[:5]) and np.all(median[:5] <= high[:5])


def test_seeds_replica_order_does_not_depend_on_k():
    # no dropout: replica 0 of K = 3 (vmap, batches stacked per replica) is the K = 1 seeds run (the model itself)
    kw = dict(strategy="seeds", min_lr=1e-4, max_lr=1e-2, steps=12, seed=5, **QUIET)
    k3 = lrfast.find(make_mlp(), make_batches(n=12), candidates=3, **kw)
    k1 = lrfast.find(make_mlp(), make_batches(n=12), candidates=1, **kw)
    np.testing.assert_allclose(k3.losses[0], k1.losses[0], rtol=1e-5)
    orders = strategies.orders("seeds", 3, 12, 5)
    assert sorted(orders[1]) == list(range(12)) and not np.array_equal(orders[0], orders[1])


def test_seeds_with_batches_of_different_shapes_run_the_loop():
    batches = make_batches(n=4) + [make_batches(n=1, batch=5, seed=9)[0]]
    res = lrfast.find(make_mlp(), batches, strategy="seeds", candidates=2, steps=5, **QUIET)
    assert res.info["forward"].startswith("loop (K=2): batch 4 differs")


class ItemModel(nn.Module):
    """vmap can't serve .item() (data-dependent control flow): the per-candidate loop runs."""

    def __init__(self):
        super().__init__()
        self.net = make_mlp()

    def forward(self, x):
        return self.net(x) * (1.0 if self.net[0].weight.sum().item() > -1e9 else 2.0)


def test_loop_fallback_where_vmap_fails_gives_the_same_curves():
    batches = make_batches()
    model = ItemModel()
    res = lrfast.find(model, batches, strategy="grid", lrs=[1e-3, 1e-2, 3e-2], steps=10, **QUIET)
    assert res.info["forward"].startswith("loop (K=3): vmap failed")
    k1 = lrfast.find(model, batches, strategy="grid", lrs=[1e-2], steps=10, **QUIET)
    np.testing.assert_allclose(res.losses[1], k1.losses[0], rtol=1e-5)


def test_generic_optimizer_runs_one_instance_per_candidate():
    def opt(p):
        return torch.optim.RMSprop(p, lr=1.0, momentum=0.5)

    batches, model = make_batches(), make_mlp()
    res = lrfast.find(model, batches, optimizer=opt, strategy="grid", lrs=[1e-4, 1e-3], steps=10, **QUIET)
    assert res.info["optimizer_path"] == "generic torch.optim"
    k1 = lrfast.find(model, batches, optimizer=opt, strategy="grid", lrs=[1e-3], steps=10, **QUIET)
    np.testing.assert_allclose(res.losses[1], k1.losses[0], rtol=1e-5)


def test_max_memory_splits_k_into_chunks_with_the_same_results():
    batches, model = make_batches(), make_mlp(batchnorm=True)
    kw = dict(strategy="grid", lrs=[1e-4, 1e-3, 1e-2, 3e-2, 1e-1], steps=10, forward="vmap", **QUIET)
    whole = lrfast.find(model, batches, **kw)
    per = whole.info["memory"]["per_candidate"]
    assert whole.info["chunk"] == 5 and per > whole.info["memory"]["arena"] > 0
    chunked = lrfast.find(model, batches, max_memory=2 * per + whole.info["memory"]["batches"], **kw)
    assert chunked.info["chunk"] == 2 and any("chunks of 2" in n for n in chunked.info["notes"])
    assert chunked.info["forward"] == "vmap (K=2); module (K=1)"
    np.testing.assert_allclose(chunked.losses, whole.losses, rtol=1e-5)
    with pytest.raises(ValueError, match=r"max_memory=100: one candidate needs ~\d+ bytes"):
        lrfast.find(model, batches, max_memory=100, **kw)


@pytest.mark.parametrize("strategy", ["seeds", "grid"])
def test_k_candidates_leave_model_and_rng_bitwise_unchanged(strategy):
    model = make_mlp(dropout=0.3, batchnorm=True)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model.eval()
    before, rng = state_of(model), rng_states()
    lrfast.find(model, make_batches(), strategy=strategy, candidates=3, steps=8, progress=False)
    assert_same_state(before, state_of(model))
    assert_same_rng(rng, rng_states())


def test_k_candidates_leave_model_unchanged_after_keyboard_interrupt():
    model = make_mlp(batchnorm=True)
    before, rng = state_of(model), rng_states()
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(KeyboardInterrupt):
        lrfast.find(model, make_batches(), strategy="grid", candidates=3, loss_fn=loss_fn, steps=8, progress=False)
    assert_same_state(before, state_of(model))
    assert_same_rng(rng, rng_states())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(candidates=0, strategy="grid"), "candidates=0 must be an integer >= 1"),
        (dict(candidates=2.5, strategy="grid"), "candidates=2.5 must be an integer"),
        (dict(strategy="bands"), "strategy='bands' is not a strategy"),
        (dict(candidates=4), "strategy='sweep'.*use strategy='seeds'.*strategy='grid'"),
        (dict(lrs=[1e-3], strategy="seeds"), "lrs=... is only for strategy='grid'"),
        (dict(lrs=[1e-3, -1.0], strategy="grid"), "lrs=.*positive finite"),
        (dict(lrs=[1e-3, math.inf], strategy="grid"), "lrs=.*positive finite"),
        (dict(lrs=[1e-3], candidates=3, strategy="grid"), "candidates=3 but lrs has 1"),
        (dict(tolerance=-1, strategy="grid"), "tolerance=-1"),
        (dict(max_memory=0, strategy="grid"), "max_memory=0 must be a positive number"),
        (dict(candidates=1, strategy="grid"), "candidates=1 with strategy='grid'.*lrs=\\[lr\\]"),
    ],
)
def test_bad_candidate_arguments_raise_before_training(kwargs, match):
    model = make_mlp()
    before = state_of(model)
    with pytest.raises(ValueError, match=match):
        lrfast.find(model, make_batches(), steps=5, progress=False, **kwargs)
    assert_same_state(before, state_of(model))


@pytest.mark.parametrize("strategy", ["sweep", "seeds", "grid"])
def test_json_round_trip_and_plot_for_every_strategy(strategy, tmp_path):
    k = 1 if strategy == "sweep" else 3
    res = lrfast.find(make_mlp(), make_batches(), strategy=strategy, candidates=k, min_lr=1e-4, max_lr=1.0,
                      steps=20, progress=False)  # fmt: skip
    res.to_json(tmp_path / "r.json")
    back = LRFindResult.from_json(tmp_path / "r.json")
    assert back.strategy == strategy and back.suggestion == res.suggestion and back.interval == res.interval
    np.testing.assert_array_equal(back.losses, res.losses)
    ax = res.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0 and ax.get_xscale() == "log"


@pytest.mark.parametrize("shared", [True, False])
def test_batched_linear_runs_as_w_xT_with_contiguous_weight_grads_equal_to_each_candidates_linear(shared):
    """Inside the batched call on CPU (forward._batchable) F.linear with stacked weights is (w @ x^T)^T + b: the
    outputs and weight grads equal each candidate's own F.linear to the dot-product rounding bound (n * eps * the sum
    of |terms|, n = 13), and the weight grads come out contiguous, as the arena keeps them (vmap's own rule gives
    them transposed)."""
    from torch.func import vmap

    from lrfast.engine.forward import _batchable

    g = torch.Generator().manual_seed(0)
    k, n = 3, 13
    w = torch.randn(k, 4, n, generator=g, requires_grad=True)
    b = torch.randn(k, 4, generator=g, requires_grad=True)
    x = torch.randn(5, n, generator=g) if shared else torch.randn(k, 5, n, generator=g)
    f = vmap(torch.nn.functional.linear, in_dims=(None if shared else 0, 0, 0))
    with _batchable(torch.device("cpu")):
        out = f(x, w, b)
    (gw,) = torch.autograd.grad(out.square().sum(), [w])
    xs = [x if shared else x[j] for j in range(k)]
    ref = torch.stack([torch.nn.functional.linear(xs[j], w[j], b[j]) for j in range(k)])
    (rgw,) = torch.autograd.grad(ref.square().sum(), [w])
    eps = torch.finfo(torch.float32).eps
    bound = n * eps * torch.stack([xs[j].abs() @ w[j].abs().T + b[j].abs() for j in range(k)])
    assert torch.all((out - ref).abs() <= bound) and not torch.equal(gw, torch.zeros_like(gw))
    ax = [xj.abs() for xj in xs]
    gbound = torch.stack([2 * bound[j].T @ ax[j] + 6 * eps * (2 * ref[j].abs()).T @ ax[j] for j in range(k)])
    assert torch.all((gw - rgw).abs() <= gbound)
    assert gw.is_contiguous()
    x3 = torch.randn(2, 5, n, generator=g)  # [B, T, C]: left to vmap's own rule
    with _batchable(torch.device("cpu")):
        out3 = vmap(torch.nn.functional.linear, in_dims=(None, 0, 0))(x3, w, b)
    assert torch.equal(out3, vmap(torch.nn.functional.linear, in_dims=(None, 0, 0))(x3, w, b))


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adamw_groups"])
def test_batched_steps_hand_autograds_grads_to_the_update_with_the_curves_of_copying_them(monkeypatch, optimizer):
    """The batched call hands the large parameters' grads to the fused update as autograd made them (no copy into
    the arena; update.DIRECT_FROM): the same kernel per element on the same values, so the curves are bitwise those
    of the copying path, also once the highest LRs stop and the call runs only the rows up to the last live one, and
    with param groups (one arena segment each, their own LR ratio and weight decay)."""
    from lrfast.engine import update

    model, batches = digits_mlp_batches()
    if optimizer == "adamw_groups":
        optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3},
                                       {"params": model[2].parameters(), "lr": 3e-3, "weight_decay": 0.1}])
    lrs = np.geomspace(1e-3, 30.0, 6)
    handed_rows = []
    real = update.HostFused._handed

    def spy(self, lr, step, grads):
        handed_rows.append({g.shape[0] for g in grads if g is not None})
        return real(self, lr, step, grads)

    monkeypatch.setattr(update.HostFused, "_handed", spy)
    runs = {}
    for direct_from in (1, 2**62):  # every parameter handed; none
        monkeypatch.setattr(update, "DIRECT_FROM", direct_from)
        runs[direct_from] = lrfast.find(model, batches, optimizer=optimizer, strategy="grid", lrs=lrs, steps=30,
                                        forward="vmap", progress=False)  # fmt: skip
    handed, copied = runs[1], runs[2**62]
    assert len(handed_rows) == handed.steps_run  # every step handed from the first (none in the copying run)
    assert {6} in handed_rows and any(max(rows) < 6 for rows in handed_rows)  # the stopped rows left out
    assert np.isnan(handed.losses[-1]).any() and np.isfinite(handed.losses[0]).all()
    np.testing.assert_array_equal(handed.losses, copied.losses)
    np.testing.assert_array_equal(handed.smoothed, copied.smoothed)


LOSS_CASES = [  # (loss, its keywords, whether forward._Rules serves it)
    (nn.functional.cross_entropy, {}, True),
    (nn.functional.cross_entropy, {"reduction": "sum"}, True),
    (nn.functional.cross_entropy, {"reduction": "none", "ignore_index": 3}, True),
    (nn.functional.cross_entropy, {"ignore_index": -100}, True),
    (nn.functional.nll_loss, {}, True),
    (nn.functional.nll_loss, {"reduction": "sum", "ignore_index": 3}, True),
    (nn.functional.cross_entropy, {"label_smoothing": 0.1}, False),
    (nn.functional.cross_entropy, {"weight": torch.linspace(0.5, 2.0, 7)}, False),
]


@pytest.mark.parametrize("loss, kw, ruled", LOSS_CASES)
@pytest.mark.parametrize("one_sample", [False, True])
def test_batched_class_losses_equal_vmaps_own_rule_bitwise(monkeypatch, loss, kw, ruled, one_sample):
    """Inside the batched call (CPU) class-index cross-entropy and NLL run as forward._Rules computes them (no
    torch._check, whose first call imports sympy): losses and grads bitwise those of vmap's own rule; the other
    kinds (label smoothing, class weights) are left to vmap's rule."""
    from torch.func import vmap

    from lrfast.engine import forward as F

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3, 7, 5, generator=gen)
    x = torch.randn(5, generator=gen) if one_sample else torch.randn(9, 5, generator=gen)
    y = torch.tensor(3) if one_sample else torch.randint(0, 7, (9,), generator=gen)
    if not one_sample:
        y[::4] = kw.get("ignore_index", -100)  # some targets ignored
    served, rule = [], F._class_nll
    monkeypatch.setattr(F, "_class_nll", lambda *a: served.append(rule(*a)) or served[-1])

    def f(w_k):
        logits = w_k @ x if one_sample else x @ w_k.T
        return loss(logits.log_softmax(-1) if loss is nn.functional.nll_loss else logits, y, **kw)

    out = {}
    for ours in (True, False):
        leaf = w.clone().requires_grad_()
        with F._batchable(torch.device("cpu")) if ours else contextlib.nullcontext():
            value = vmap(f)(leaf)
        (grad,) = torch.autograd.grad(value.sum(), leaf)
        out[ours] = (value.detach(), grad)
    assert len(served) == 1 and (served[0] is not None) == ruled  # the rule served the batched call, or left it
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
