"""Bad input gets a clear error naming the argument and the fix, before any training step, and nothing of the
user's changes."""

import pytest
import torch
from _helpers import assert_same_rng, assert_same_state, make_batches, make_mlp, rng_states, state_of
from torch import nn

import lrfast


class NoLossModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x):
        return (self.lin(x), "aux")


def _frozen():
    model = make_mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


BATCHES = make_batches()
CASES = {
    # name: (model factory, loader, kwargs, exception, words the message must contain)
    "empty_loader": (make_mlp, [], {}, ValueError, ["loader", "empty"]),
    "loader_not_iterable": (make_mlp, 42, {}, TypeError, ["loader", "DataLoader"]),
    "min_lr_zero": (make_mlp, BATCHES, {"min_lr": 0.0}, ValueError, ["min_lr=0.0", "> 0"]),
    "min_lr_negative": (make_mlp, BATCHES, {"min_lr": -1e-3}, ValueError, ["min_lr", "> 0"]),
    "min_lr_nan": (make_mlp, BATCHES, {"min_lr": float("nan")}, ValueError, ["min_lr", "finite"]),
    "max_lr_inf": (make_mlp, BATCHES, {"max_lr": float("inf")}, ValueError, ["max_lr", "finite"]),
    "min_lr_not_below_max_lr": (make_mlp, BATCHES, {"min_lr": 1.0, "max_lr": 1.0}, ValueError,
                                ["min_lr=1.0", "max_lr=1.0", "smaller"]),  # fmt: skip
    "steps_one": (make_mlp, BATCHES, {"steps": 1}, ValueError, ["steps=1", ">= 2"]),
    "steps_float": (make_mlp, BATCHES, {"steps": 10.5}, ValueError, ["steps=10.5", "integer"]),
    "unknown_mode": (make_mlp, BATCHES, {"mode": "cosine"}, ValueError, ["mode='cosine'", "exp", "linear"]),
    "unknown_optimizer_name": (make_mlp, BATCHES, {"optimizer": "lion"}, ValueError, ["optimizer='lion'", "adamw"]),
    "optimizer_wrong_type": (make_mlp, BATCHES, {"optimizer": 3}, TypeError, ["optimizer", "torch.optim"]),
    "optimizer_factory_returns_junk": (make_mlp, BATCHES, {"optimizer": lambda p: None}, TypeError,
                                       ["optimizer", "callable returned NoneType"]),  # fmt: skip
    "unknown_suggestion": (make_mlp, BATCHES, {"suggestion": "best"}, ValueError, ["suggestion='best'", "valley"]),
    "smooth_one": (make_mlp, BATCHES, {"smooth": 1.0}, ValueError, ["smooth=1.0", "[0, 1)"]),
    "threshold_below_one": (make_mlp, BATCHES, {"early_stop_threshold": 0.5}, ValueError,
                            ["early_stop_threshold=0.5", "None"]),  # fmt: skip
    "accumulate_zero": (make_mlp, BATCHES, {"accumulate": 0}, ValueError, ["accumulate=0", ">= 1"]),
    "seed_negative": (make_mlp, BATCHES, {"seed": -1}, ValueError, ["seed=-1"]),
    "not_a_model": (lambda: "model", BATCHES, {}, TypeError, ["model=str", "nn.Module"]),
    "frozen_model": (_frozen, BATCHES, {}, ValueError, ["no trainable parameters", "requires_grad"]),
    "device_differs_from_model": (make_mlp, BATCHES, {"device": "meta"}, ValueError, ["device='meta'", "model.to"]),
    "loss_fn_not_callable": (make_mlp, BATCHES, {"loss_fn": "mse"}, TypeError, ["loss_fn=str", "callable"]),
    "loss_not_scalar": (make_mlp, BATCHES, {"loss_fn": lambda o, y: o.sum(1)}, ValueError,
                        ["loss_fn", "scalar", "(16,)", "mean"]),  # fmt: skip
    "loss_nan_at_first_step": (make_mlp, [(torch.full((16, 8), float("nan")), torch.zeros(16, dtype=torch.long))],
                               {}, ValueError, ["first step", "model or the data is broken"]),  # fmt: skip
    "targets_out_of_range": (make_mlp, make_batches(classes=7), {}, ValueError,
                             ["loss_fn=None", "cross_entropy", "[0, classes)"]),  # fmt: skip
    "default_loss_cannot_use_output": (NoLossModel, BATCHES, {}, ValueError, ["loss_fn=None", "tuple", "loss_fn="]),
    "mse_shape_mismatch": (make_mlp, [(torch.randn(4, 8), torch.randn(4, 5))], {}, ValueError,
                           ["MSE", "(4, 3)", "(4, 5)"]),  # fmt: skip
    "batch_of_unsupported_type": (make_mlp, [3.0], {}, TypeError, ["batch", "float", "tuples"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_a_clear_error_and_changes_nothing(case):
    factory, loader, kwargs, exc, words = CASES[case]
    model = factory()
    before = state_of(model) if isinstance(model, nn.Module) else None
    rng = rng_states()
    with pytest.raises(exc) as info:
        lrfast.find(model, loader, progress=False, **{"steps": 5, **kwargs})
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    if before is not None:
        assert_same_state(before, state_of(model))
    assert_same_rng(rng, rng_states())


def test_optimizer_over_other_parameters_is_refused():
    model, other = make_mlp(), make_mlp(seed=1)
    with pytest.raises(ValueError, match="not one of the model's"):
        lrfast.find(model, BATCHES, optimizer=torch.optim.SGD(other.parameters(), lr=0.1), progress=False)


def test_unknown_keyword_names_it():
    with pytest.raises(TypeError, match="num_iter"):
        lrfast.find(make_mlp(), BATCHES, num_iter=10)


def test_one_shot_generator_shorter_than_steps_says_to_pass_a_reiterable_loader():
    with pytest.raises(ValueError, match="re-iterable"):
        lrfast.find(make_mlp(), iter(make_batches(n=2)), steps=5, progress=False)


@pytest.mark.parametrize("content", ["{not json", '{"schema": "other"}',
                                     '{"schema": "lrfast.LRFindResult", "schema_version": 99}',
                                     '{"schema": "lrfast.LRFindResult", "schema_version": 1}'])  # fmt: skip
def test_from_json_says_what_is_wrong(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="from_json"):
        lrfast.LRFindResult.from_json(path)
