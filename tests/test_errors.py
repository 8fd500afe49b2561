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
    "graphs_on_cpu": (make_mlp, BATCHES, {"graphs": True}, ValueError, ["graphs=True", "CUDA", "graphs=None"]),
    "compile_not_bool": (make_mlp, BATCHES, {"compile": "yes"}, TypeError, ["compile='yes'", "True, False or None"]),
    "graphs_not_bool": (make_mlp, BATCHES, {"graphs": 1}, TypeError, ["graphs=1", "True, False or None"]),
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
    "loss_not_scalar_batched": (make_mlp, BATCHES, {"loss_fn": lambda o, y: o.sum(1), "strategy": "grid",
                                                    "candidates": 3, "forward": "vmap"}, ValueError,
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


# --- the command line: the same checks give the same message, as SystemExit("lrfast: ..."), not a traceback ---

TARGET = '''
import torch
from torch import nn

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
BATCHES = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(4)]

def good():
    return MODEL, BATCHES

def junk():
    return 42

def no_loader():
    return {"model": MODEL}

def not_a_model():
    return "model", BATCHES

def empty_loader():
    return MODEL, []
'''

CLI_CASES = {
    # name: (argv, with {tmp} for the test's folder, words the SystemExit message must contain)
    "data_dir_missing": (["demo", "--data", "{tmp}/missing"], ["--data", "not a folder", "IDX"]),
    "out_is_a_file": (["demo", "--out", "{tmp}/afile"], ["--out", "cannot be created"]),
    "out_under_a_file": (["find", "lrfast_cli_target:good", "--out", "{tmp}/afile/sub"],
                         ["--out", "cannot be created"]),
    "steps_one": (["demo", "--steps", "1"], ["steps=1", ">= 2"]),
    "min_lr_zero": (["find", "lrfast_cli_target:good", "--min-lr", "0"], ["min_lr=0.0", "> 0"]),
    "min_lr_above_max_lr": (["find", "lrfast_cli_target:good", "--min-lr", "1", "--max-lr", "0.1"],
                            ["min_lr=1.0", "max_lr=0.1", "smaller"]),  # fmt: skip
    "smooth_one": (["find", "lrfast_cli_target:good", "--smooth", "1"], ["smooth=1.0", "[0, 1)"]),
    "graphs_on_cpu": (["find", "lrfast_cli_target:good", "--graphs"], ["graphs=True", "CUDA"]),
    "threshold_below_one": (["demo", "--early-stop-threshold", "0.5"], ["early_stop_threshold=0.5", "None"]),
    "seed_negative": (["find", "lrfast_cli_target:good", "--seed", "-3"], ["seed=-3", "non-negative"]),
    "candidates_zero": (["find", "lrfast_cli_target:good", "--strategy", "grid", "--candidates", "0"],
                        ["candidates=0", ">= 1"]),  # fmt: skip
    "device_differs_from_model": (["find", "lrfast_cli_target:good", "--device", "meta"],
                                  ["device='meta'", "model.to"]),  # fmt: skip
    "target_returns_junk": (["find", "lrfast_cli_target:junk"], ["returned int", "(model, loader"]),
    "target_dict_without_loader": (["find", "lrfast_cli_target:no_loader"], ["without loader", "dict with"]),
    "target_returns_no_model": (["find", "lrfast_cli_target:not_a_model"], ["lrfast: model=str", "nn.Module"]),
    "target_loader_empty": (["find", "lrfast_cli_target:empty_loader"], ["lrfast: loader is empty"]),
    "target_without_colon": (["find", "lrfast_cli_target"], ["MODULE:FUNCTION"]),
    "target_function_missing": (["find", "lrfast_cli_target:nope"], ["cannot load", "nope"]),
}


def _never_trains(*args, **kwargs):
    raise AssertionError("a training step ran before the bad input was reported")


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_exits_with_the_message_before_training(case, tmp_path, monkeypatch, capsys):
    import sys

    from lrfast.cli import main
    from lrfast.engine import loop

    argv, words = CLI_CASES[case]
    (tmp_path / "lrfast_cli_target.py").write_text(TARGET)
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop.Step, "__call__", _never_trains)
    monkeypatch.delitem(sys.modules, "lrfast_cli_target", raising=False)
    import importlib

    sys.path.insert(0, str(tmp_path))
    try:
        target = importlib.import_module("lrfast_cli_target")
    finally:
        sys.path.remove(str(tmp_path))
    before, rng = state_of(target.MODEL), rng_states()
    listing = sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__")
    with pytest.raises(SystemExit) as info:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--no-progress"])
    message = str(info.value.code)
    for word in words:
        assert word in message, f"{word!r} not in {message}"
    assert "Traceback" not in capsys.readouterr().err
    assert_same_state(before, state_of(target.MODEL))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == listing
    if case not in ("data_dir_missing", "out_is_a_file", "steps_one", "threshold_below_one"):  # the demo seeds
        assert_same_rng(rng, rng_states())  # torch for its model's init, as documented


# --- the Lightning entry: lrfast.integrations.lightning.find ---


def _lightning_cases():
    pl = pytest.importorskip("pytorch_lightning", reason="the Lightning entry needs pytorch-lightning")
    import torch.nn.functional as F

    class Lit(pl.LightningModule):
        def __init__(self, manual=False, lr=True, loader=True, opt=True, step_returns=True):
            super().__init__()
            torch.manual_seed(0)
            self.net = make_mlp()
            if lr:
                self.lr = 1e-3
            self.automatic_optimization = not manual
            self.has_loader, self.has_opt, self.step_returns = loader, opt, step_returns

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            return loss if self.step_returns else None

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3) if self.has_opt else None

        def train_dataloader(self):
            return BATCHES if self.has_loader else None

    class NoLoader(pl.LightningModule):  # no train_dataloader(): Lightning itself would raise its own error
        def __init__(self):
            super().__init__()
            self.net, self.lr = make_mlp(), 1e-3

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    return {
        # name: (module factory, kwargs of lightning.find, exception, words)
        "train_dataloader_not_defined": (NoLoader, {}, ValueError,
                                         ["does not define train_dataloader()", "train_dataloaders="]),  # fmt: skip
        "not_a_lightning_module": (make_mlp, {}, TypeError, ["module=Sequential", "LightningModule", "lrfast.find"]),
        "manual_optimization": (lambda: Lit(manual=True), {}, ValueError,
                                ["automatic_optimization is False", "loss_fn"]),  # fmt: skip
        "no_dataloader": (lambda: Lit(loader=False), {}, ValueError, ["no train dataloader", "train_dataloaders="]),
        "no_lr_attribute": (lambda: Lit(lr=False), {}, AttributeError, ["lr", "attr_name=", "update_attr=False"]),
        "attr_name_missing": (Lit, {"attr_name": "base_lr"}, AttributeError, ["attr_name='base_lr'", "self.base_lr"]),
        "configure_optimizers_returns_none": (lambda: Lit(opt=False), {}, ValueError,
                                              ["configure_optimizers()", "optimizer=..."]),  # fmt: skip
        "steps_one": (Lit, {"steps": 1}, ValueError, ["steps=1", ">= 2"]),
        "min_lr_zero": (Lit, {"min_lr": 0.0}, ValueError, ["min_lr=0.0", "> 0"]),
        "training_step_returns_none": (lambda: Lit(step_returns=False), {}, ValueError,
                                       ["training_step returned NoneType", "loss tensor", "Leave the batches"]),
    }


LIGHTNING_CASES = ["train_dataloader_not_defined",
                   "not_a_lightning_module", "manual_optimization", "no_dataloader", "no_lr_attribute",
                   "attr_name_missing", "configure_optimizers_returns_none", "steps_one", "min_lr_zero",
                   "training_step_returns_none"]  # fmt: skip


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.parametrize("case", LIGHTNING_CASES)
def test_lightning_bad_input_raises_a_clear_error_and_changes_nothing(case, monkeypatch):
    cases = _lightning_cases()
    assert sorted(cases) == sorted(LIGHTNING_CASES)
    from lrfast.engine import loop
    from lrfast.integrations import lightning as lrl

    factory, kwargs, exc, words = cases[case]
    if case != "training_step_returns_none":  # that one is only seen when the first step runs
        monkeypatch.setattr(loop.Step, "__call__", _never_trains)
    module = factory()
    before, rng = state_of(module), rng_states()
    with pytest.raises(exc) as info:
        lrl.find(module, progress=False, **{"steps": 5, **kwargs})
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    assert_same_state(before, state_of(module))
    assert_same_rng(rng, rng_states())


def test_the_three_tables_hold_at_least_20_cases():
    assert len(CASES) + len(CLI_CASES) + len(LIGHTNING_CASES) >= 20


# --- batches of mixed structure: found before training, naming the loader, the batch index and what differs ---


def _xy(n=16, features=8, seed=0, target_dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, features, generator=g), y.to(target_dtype)


MIXED = {
    # name: (loader, index of the odd batch, words the message must contain)
    "tuple_then_dict": ([_xy(), _xy(), {"x": _xy()[0]}], 2, ["keyword inputs ['x']", "1 positional input"]),
    "fewer_features": ([_xy(), _xy(), _xy(), _xy(features=5)], 3, ["input 0 has shape [16, 5]", "[16, 8]"]),
    "target_dtype": ([_xy(), _xy(target_dtype=torch.float32)], 1, ["target is torch.float32", "torch.int64"]),
    "extra_dim": ([_xy(), (torch.randn(16, 1, 8), _xy()[1])], 1, ["input 0 has 3 dims", "2 dims"]),
    "more_inputs": ([_xy(), (*_xy(), _xy()[1])], 1, ["2 positional inputs", "1 positional input"]),
    "tensor_then_number": ([_xy(), (_xy()[0], 1)], 1, ["target is a int", "a Tensor"]),
}


@pytest.mark.parametrize("case", list(MIXED))
def test_batches_of_mixed_structure_are_refused_before_training(case, monkeypatch):
    from lrfast.engine import loop

    loader, index, words = MIXED[case]
    monkeypatch.setattr(loop.Step, "__call__", _never_trains)
    model = make_mlp()
    before, rng = state_of(model), rng_states()
    with pytest.raises(ValueError) as info:
        lrfast.find(model, loader, steps=len(loader), progress=False)
    message = str(info.value)
    assert message.startswith(f"loader: batch {index} differs from batch 0: "), message
    for word in words + ["except the batch size (dim 0)"]:
        assert word in message, f"{word!r} not in {message}"
    assert_same_state(before, state_of(model))
    assert_same_rng(rng, rng_states())


def test_mixed_validation_batches_name_val_loader():
    with pytest.raises(ValueError, match=r"^val_loader: batch 1 differs .* input 0 has shape \[16, 4\]"):
        lrfast.find(make_mlp(), BATCHES, val_loader=[_xy(), _xy(features=4)], val_batches=2, steps=5, progress=False)


def test_a_smaller_last_batch_and_padded_token_ids_are_accepted():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _xy(n=70)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # 16, 16, 16, 16, 6
    res = lrfast.find(make_mlp(), loader, steps=10, progress=False, early_stop_threshold=None)
    assert res.steps_run == 10

    class Bag(nn.Module):  # token ids padded per batch: [batch, length] with a length of its own
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(20, 4), nn.Linear(4, 3)

        def forward(self, ids):
            return self.out(self.emb(ids).mean(1))

    g = torch.Generator().manual_seed(0)
    tokens = [(torch.randint(0, 20, (8, n), generator=g), torch.randint(0, 3, (8,), generator=g)) for n in (5, 9, 7)]
    assert lrfast.find(Bag(), tokens, steps=6, progress=False, early_stop_threshold=None).steps_run == 6


class _ListInput(nn.Module):
    """model(xs) with xs a list of per-sample tensors (a custom collate), as torch-lr-finder's tests use."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 3)

    def forward(self, xs):
        return self.lin(torch.stack(xs))


def _list_loader(n=5, batch=2):
    from torch.utils.data import DataLoader

    x, y = _xy(n=n)
    return DataLoader(list(zip(x, y)), batch_size=batch,
                      collate_fn=lambda b: ([s for s, _ in b], torch.stack([t for _, t in b])))  # fmt: skip


@pytest.mark.parametrize("strategy", ["sweep", "seeds"])
def test_a_short_last_batch_of_list_inputs_is_accepted(strategy):
    """Batch sizes [2, 2, 1]: the list of per-sample inputs is one item shorter in the last batch, which is a batch
    size, not a structure, difference."""
    kwargs = dict(strategy="seeds", candidates=2) if strategy == "seeds" else {}
    res = lrfast.find(_ListInput(), _list_loader(), steps=6, progress=False, early_stop_threshold=None, **kwargs)
    assert res.steps_run == 6


def test_the_advice_for_mixed_batches_names_collate_fn_only_when_the_loader_has_its_own():
    from torch.utils.data import DataLoader, TensorDataset

    odd = [_xy(), _xy(features=5)]
    with pytest.raises(ValueError, match=r"check the batches loader yields$"):
        lrfast.find(make_mlp(), odd, steps=2, progress=False)
    x, y = _xy(n=20)
    plain = DataLoader(TensorDataset(torch.cat([x, torch.zeros(4, 8)]), torch.cat([y, y[:4]])), batch_size=16)
    with pytest.raises(ValueError, match=r"check the dataset and the collate_fn of loader$"):
        lrfast.find(make_mlp(), DataLoader(plain.dataset, batch_size=16, collate_fn=lambda b: (
            torch.stack([s[0] for s in b])[:, : 8 if len(b) == 16 else 5], torch.stack([s[1] for s in b]))),
            steps=2, progress=False)  # fmt: skip


@pytest.mark.parametrize("kwargs", [{}, dict(strategy="grid", candidates=2)], ids=["k1", "grid"])
def test_a_batch_with_extra_items_says_how_batches_are_split(kwargs):
    """(x, y, e1, e2) becomes model(x, y, e1) with target e2: the model's own TypeError is explained."""
    x, y = _xy()
    batches = [(x, y, torch.zeros(16), torch.ones(16))] * 3
    model = make_mlp()
    before = state_of(model)
    with pytest.raises(TypeError, match=r"called as model\(<input 0>, <input 1>, <input 2>\) with the batch's last "
                                        r"item as the target: .*positional argument.*wrap the model.*loss_fn="):
        lrfast.find(model, batches, steps=3, progress=False, **kwargs)
    assert_same_state(before, state_of(model))
