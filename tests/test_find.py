"""lrfast.find end to end on CPU: the K = 1 curve against a plain eager loop, the schedule, smoothing and early
stop, loaders, losses, optimizers and the result object."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from _helpers import make_batches, make_mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrfast
from lrfast import batches as lrb
from lrfast import schedule


def eager_losses(model, batches, opt, lrs, loss_fn=nn.functional.cross_entropy):
    """The plain PyTorch loop lrfast must equal: zero_grad, forward, loss, backward, set LR, step."""
    scales = [g["lr"] / max(g["lr"] for g in opt.param_groups) for g in opt.param_groups]
    out = []
    for t, lr in enumerate(lrs):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        for g, s in zip(opt.param_groups, scales):
            g["lr"] = float(lr) * s
        opt.step()
        out.append(loss.item())
    return np.array(out)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9, dampening=0.1, weight_decay=1e-3, foreach=False),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.8, nesterov=True, foreach=False),
    "adam": lambda p: torch.optim.Adam(p, lr=1.0, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, foreach=False),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1.0, weight_decay=0.05, foreach=False),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1.0, momentum=0.5, foreach=False),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1.0, foreach=False),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_k1_curve_equals_plain_eager_loop(name):
    batches = make_batches(n=7)
    model = make_mlp()
    reference = copy.deepcopy(model)
    res = lrfast.find(model, batches, optimizer=OPTIMIZERS[name], min_lr=1e-4, max_lr=3e-2, steps=40,
                      early_stop_threshold=None, progress=False)  # fmt: skip
    expected = eager_losses(reference, batches, OPTIMIZERS[name](reference.parameters()), res.lrs[0])
    assert res.steps_run == 40
    # fp32 rounding: the fused kernels group the same operations differently from torch.optim (1e-7 relative per
    # step); at these stable LRs the curves stay within ~1e-6 relative over 40 steps.
    np.testing.assert_allclose(res.losses[0], expected, rtol=2e-5, atol=1e-6)
    expected_path = "generic torch.optim" if name in ("rmsprop", "adagrad") else "fused"
    assert res.info["optimizer_path"].startswith(expected_path)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizer_names_use_torch_optim_defaults(name):
    from lrfast import optimizers

    model = make_mlp()
    by_name = optimizers.resolve(name, model)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    by_instance = optimizers.resolve(cls(model.parameters()), model)
    assert (by_name.kind, by_name.optimizer_class) == (by_instance.kind, by_instance.optimizer_class)
    assert [g.hp for g in by_name.groups] == [g.hp for g in by_instance.groups]


def test_param_groups_keep_their_lr_ratio_and_weight_decay():
    batches = make_batches()
    model = make_mlp()
    reference = copy.deepcopy(model)

    def groups(m):
        first = {"params": m[0].parameters(), "lr": 1e-3, "weight_decay": 0.0}
        last = {"params": m[3].parameters(), "lr": 4e-3, "weight_decay": 0.1}
        return torch.optim.AdamW([first, last], foreach=False)

    res = lrfast.find(model, batches, optimizer=groups(model), min_lr=1e-4, max_lr=1e-2, steps=20,
                      early_stop_threshold=None, progress=False)  # fmt: skip
    expected = eager_losses(reference, batches, groups(reference), res.lrs[0])
    np.testing.assert_allclose(res.losses[0], expected, rtol=2e-5, atol=1e-6)


def test_schedule_hits_both_endpoints_exactly():
    for mode in schedule.MODES:
        lrs = schedule.sweep(1e-7, 10.0, 100, mode)
        assert lrs[0] == 1e-7 and lrs[-1] == 10.0 and len(lrs) == 100
        assert np.all(np.diff(lrs) > 0)
    exp = schedule.sweep(1e-3, 1.0, 4, "exp")
    np.testing.assert_allclose(exp, [1e-3, 1e-2, 1e-1, 1.0], rtol=1e-15)
    assert list(schedule.sweep(1.0, 4.0, 4, "linear")) == [1.0, 2.0, 3.0, 4.0]


def test_smoothed_curve_is_the_debiased_ema_of_the_raw_losses():
    res = lrfast.find(make_mlp(), make_batches(), min_lr=1e-4, max_lr=1e-2, steps=30, smooth=0.9,
                      early_stop_threshold=None, progress=False)  # fmt: skip
    avg, expected = 0.0, []
    for n, loss in enumerate(res.losses[0], start=1):
        avg = 0.9 * avg + 0.1 * loss
        expected.append(avg / (1 - 0.9**n))
    np.testing.assert_allclose(res.smoothed[0], expected, rtol=1e-15)


def test_stops_at_the_step_where_the_smoothed_loss_exceeds_threshold_times_best():
    res = lrfast.find(make_mlp(), make_batches(), optimizer="sgd", min_lr=1e-3, max_lr=1e4, steps=100,
                      progress=False)  # fmt: skip
    n = res.steps_run
    assert 2 < n < 100
    sm = res.smoothed[0]
    assert np.all(np.isnan(sm[n:])) and np.all(np.isnan(res.losses[0][n:]))
    last = sm[n - 1]
    assert not math.isfinite(last) or last > 4.0 * np.min(sm[: n - 1])
    assert np.all(sm[: n - 1] <= 4.0 * np.minimum.accumulate(sm[: n - 1]))


def test_short_loader_is_cycled_until_steps_batches_were_seen():
    batches = make_batches(n=3)
    seen = lrb.take(batches, 8)
    assert [id(b) for b in seen] == [id(batches[i % 3]) for i in range(8)]


def test_plain_tensor_dataloader_fast_path_yields_the_same_batches_as_iterating_it():
    ds = TensorDataset(torch.randn(50, 4), torch.randint(0, 3, (50,)))
    for kwargs in ({"shuffle": True}, {"shuffle": True, "generator": 3}, {"shuffle": False, "drop_last": True}):
        def make():  # a loader with a generator of its own is stateful: a fresh one for each way of reading it
            gen = kwargs.get("generator")
            return DataLoader(ds, batch_size=16, **{**kwargs, "generator": gen and torch.Generator().manual_seed(gen)})

        assert lrb._is_plain_tensor_loader(make())
        torch.manual_seed(7)
        loader = make()
        expected = [b for _ in range(4) for b in loader][:10]
        rng_after_iterating = torch.get_rng_state()
        torch.manual_seed(7)
        fast = lrb.take(make(), 10)
        assert len(fast) == 10
        for a, b in zip(fast, expected):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        if kwargs.get("drop_last"):  # 3 batches an epoch: both read 4 epochs, so both drew the same numbers
            assert torch.equal(rng_after_iterating, torch.get_rng_state())


def test_default_loss_is_mse_for_float_targets_and_output_loss_when_the_model_has_one():
    torch.manual_seed(0)
    reg = nn.Linear(8, 2)
    data = [(torch.randn(4, 8), torch.randn(4, 2)) for _ in range(3)]
    assert lrfast.find(reg, data, steps=5, progress=False).info["loss"].startswith("mse")

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 1)

        def forward(self, x, labels=None):
            out = self.lin(x)
            return {"logits": out, "loss": ((out.squeeze(-1) - labels) ** 2).mean()}

    dict_batches = [{"x": torch.randn(4, 8), "labels": torch.randn(4)} for _ in range(3)]
    res = lrfast.find(WithLoss(), dict_batches, steps=5, progress=False)
    assert res.info["loss"] == 'output["loss"]' and np.isfinite(res.losses[0]).all()


def test_loss_fn_receives_output_and_target():
    seen = []

    def loss_fn(out, y):
        seen.append((out.shape, y.shape))
        return nn.functional.cross_entropy(out, y)

    lrfast.find(make_mlp(), make_batches(), loss_fn=loss_fn, steps=3, progress=False)
    assert seen == [(torch.Size([16, 3]), torch.Size([16]))] * 3


def test_same_seed_gives_bitwise_identical_curves_and_another_seed_differs_with_dropout():
    loader = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=8, shuffle=True)
    model = make_mlp(dropout=0.3)
    a = lrfast.find(model, loader, steps=20, progress=False, seed=1)
    b = lrfast.find(model, loader, steps=20, progress=False, seed=1)
    c = lrfast.find(model, loader, steps=20, progress=False, seed=2)
    assert np.array_equal(a.losses, b.losses, equal_nan=True)
    assert not np.array_equal(a.losses, c.losses, equal_nan=True)


def test_result_json_round_trip_keeps_curves_nan_and_suggestion(tmp_path):
    res = lrfast.find(make_mlp(), make_batches(), optimizer="sgd", min_lr=1e-3, max_lr=1e4, steps=60,
                      progress=False)  # fmt: skip
    assert res.steps_run < 60
    path = tmp_path / "r.json"
    res.to_json(path)
    back = lrfast.LRFindResult.from_json(path)
    for key in ("lrs", "losses", "smoothed"):
        np.testing.assert_array_equal(getattr(back, key), getattr(res, key))
    assert back.steps_run == res.steps_run and back.suggestion == res.suggestion
    assert json.loads(path.read_text())["schema_version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_plot_returns_axes_and_writes_png(tmp_path):
    res = lrfast.find(make_mlp(), make_batches(), steps=30, progress=False)
    ax = res.plot(tmp_path / "lr.png")
    assert ax.get_xscale() == "log"
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"


def test_suggestion_follows_the_chosen_method():
    res = lrfast.find(make_mlp(), make_batches(), min_lr=1e-5, max_lr=10, steps=60, suggestion="minimum",
                      progress=False)  # fmt: skip
    n = res.steps_run
    assert res.suggestion == lrfast.suggest.minimum(res.lrs[0][:n], res.smoothed[0][:n])
    assert res.suggest("valley") == lrfast.suggest.valley(res.lrs[0], res.smoothed[0])


def test_info_reports_backends():
    info = lrfast.info()
    assert info["cpu_kernels"] in ("cpp", "reference")
    assert (info["cpu_kernels"] == "cpp") == (info["cpu_kernels_why_not_cpp"] is None)
    assert info["cuda"] == torch.cuda.is_available()


def test_progress_bar_shows_steps_per_second_and_the_best_lr_so_far(monkeypatch):
    import io

    from tqdm import tqdm

    import lrfast.api

    out = io.StringIO()
    monkeypatch.setattr(lrfast.api, "_progress_bar", lambda progress, steps: tqdm(
        total=steps, unit="step", file=out, disable=False, mininterval=0))  # fmt: skip
    lrfast.find(make_mlp(), make_batches(), steps=30)
    text = out.getvalue()
    assert "step/s" in text and "best loss at lr" in text


def test_progress_false_and_non_tty_print_nothing(capsys):
    lrfast.find(make_mlp(), make_batches(), steps=10, progress=True)  # stderr is captured: not a terminal
    lrfast.find(make_mlp(), make_batches(), steps=10, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("strategy,k", [("sweep", None), ("grid", 3), ("seeds", 2)])
def test_accumulate_equals_one_step_on_the_concatenated_batch(strategy, k):
    micro = make_batches(n=8, batch=8)
    whole = [(torch.cat([micro[2 * i][0], micro[2 * i + 1][0]]), torch.cat([micro[2 * i][1], micro[2 * i + 1][1]]))
             for i in range(4)]  # fmt: skip
    kwargs = dict(min_lr=1e-4, max_lr=1e-2, steps=4, early_stop_threshold=None, progress=False, strategy=strategy,
                  candidates=k)  # fmt: skip
    a = lrfast.find(make_mlp(), micro, accumulate=2, **kwargs)
    b = lrfast.find(make_mlp(), whole, **kwargs)
    # sum of two half-batch means / 2 vs one mean over 16: fp32 rounding only
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-6, atol=1e-7)
    assert "2 micro-batches per step" in a.info["forward"]


def test_tensor_batches_call_the_model_with_the_tensor_and_loss_fn_with_output_and_batch():
    torch.manual_seed(0)
    auto = nn.Sequential(nn.Linear(8, 3), nn.Linear(3, 8))
    data = [torch.randn(16, 8) for _ in range(3)]
    res = lrfast.find(auto, data, loss_fn=lambda out, x: nn.functional.mse_loss(out, x), steps=6, progress=False)
    assert res.info["loss"] == "loss_fn(output, batch)" and np.isfinite(res.losses).all()


def test_hugging_face_style_model_takes_dict_batches_and_returns_output_with_loss():
    from dataclasses import dataclass

    @dataclass
    class Output:  # the shape of a transformers ModelOutput: attributes, loss first
        loss: torch.Tensor | None
        logits: torch.Tensor

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, 20)

        def forward(self, input_ids, attention_mask=None, labels=None):
            logits = self.head(self.emb(input_ids))
            loss = None if labels is None else nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
            return Output(loss, logits)

    torch.manual_seed(0)
    ids = torch.randint(0, 20, (6, 4, 5))
    batches = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    res = lrfast.find(TinyLM(), batches, steps=12, progress=False)
    assert res.info["loss"] == "output.loss" and res.steps_run == 12 and np.isfinite(res.losses).all()
