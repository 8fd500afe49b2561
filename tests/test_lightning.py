"""lrfast.integrations.lightning: the range test on a LightningModule's training_step / configure_optimizers
equals lrfast.find on the bare model, writes the suggestion where Lightning's lr_find would, leaves the module
bitwise as it was, and the LRFastFinder callback sets the LR before the Trainer's first step, writing no file."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_same_rng, assert_same_state, rng_states, state_of
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning", reason="the Lightning integration needs pytorch-lightning")

import lrfast  # noqa: E402
from lrfast.integrations import lightning as lrl  # noqa: E402

# Lightning 2.6's own pytree helper warns under torch 2.13 (LeafSpec deprecated); not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
STEPS = 30


class LitMLP(pl.LightningModule):
    """lr as `self.lr` (style "attr") or as `self.hparams.learning_rate` via save_hyperparameters (style "hparams")."""

    def __init__(self, style: str = "attr", learning_rate: float = 1e-3, fail_at: int = -1):
        super().__init__()
        if style == "hparams":
            self.save_hyperparameters("learning_rate")
        elif style == "attr":
            self.lr = learning_rate
        self.style, self.fail_at, self.calls = style, fail_at, 0
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.calls += 1
        if batch_idx == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        self.log_dict({"a": loss})
        return loss

    def configure_optimizers(self):
        lr = self.hparams.learning_rate if self.style == "hparams" else getattr(self, "lr", 1e-3)
        opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=1e-4)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def loader(n=128, batch=16, shuffle=True):
    g = torch.Generator().manual_seed(3)
    ds = TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=batch, shuffle=shuffle)


def lr_of(module):
    return module.hparams.learning_rate if module.style == "hparams" else module.lr


def test_curve_equals_lrfast_find_on_the_bare_model():
    module, data = LitMLP(), loader()
    bare = copy.deepcopy(module.net)
    opt = torch.optim.Adam(bare.parameters(), lr=1e-3, weight_decay=1e-4)
    ref = lrfast.find(bare, data, optimizer=opt, steps=STEPS, progress=False)
    res = lrl.find(module, train_dataloaders=data, steps=STEPS, progress=False)
    for name in ("lrs", "losses", "smoothed"):
        assert np.array_equal(getattr(res, name), getattr(ref, name), equal_nan=True), name
    assert res.suggestion == ref.suggestion and res.info["optimizer"] == "Adam"
    assert res.info["loss"] == 'output["loss"]'


@pytest.mark.parametrize("style", ["attr", "hparams"])
def test_sets_the_suggestion_and_leaves_everything_else_bitwise(style):
    module = LitMLP(style)
    module.net[0].weight.grad = torch.ones_like(module.net[0].weight)
    module.eval()
    before, rng, keys = state_of(module), rng_states(), set(module.__dict__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # self.log outside a Trainer would warn on every call
        res = lrl.find(module, train_dataloaders=loader(), steps=STEPS, progress=False)
    assert res.suggestion is not None and lr_of(module) == res.suggestion
    assert_same_state(before, state_of(module))
    assert_same_rng(rng, rng_states())
    assert set(module.__dict__) == keys and module.calls == STEPS


def test_attr_name_and_update_attr_false():
    module = LitMLP("none")
    module.my_lr = 0.5
    res = lrl.find(module, train_dataloaders=loader(), attr_name="my_lr", steps=STEPS, progress=False)
    assert module.my_lr == res.suggestion
    module.my_lr = 0.5
    lrl.find(module, train_dataloaders=loader(), update_attr=False, steps=STEPS, progress=False)
    assert module.my_lr == 0.5


def test_module_bitwise_unchanged_when_training_step_raises_mid_run():
    module = LitMLP(fail_at=5)
    before, rng, keys = state_of(module), rng_states(), set(module.__dict__)
    with pytest.raises(RuntimeError, match="boom"):
        lrl.find(module, train_dataloaders=loader(), steps=STEPS, progress=False)
    assert_same_state(before, state_of(module))
    assert_same_rng(rng, rng_states())
    assert set(module.__dict__) == keys and module.lr == 1e-3


@pytest.mark.parametrize("attr_name", ["", "lr_typo"])
def test_missing_lr_attribute_is_a_clear_error_before_training(attr_name):
    module = LitMLP("none")
    with pytest.raises(AttributeError, match="attr_name") as e:
        lrl.find(module, train_dataloaders=loader(), attr_name=attr_name, steps=STEPS, progress=False)
    assert "update_attr=False" in str(e.value) and module.calls == 0


def test_datamodule_is_set_up_and_module_dataloader_used():
    class DM(pl.LightningDataModule):
        def setup(self, stage):
            self.stage = stage

        def train_dataloader(self):
            return loader()

    dm = DM()
    res = lrl.find(LitMLP(), datamodule=dm, steps=STEPS, progress=False)
    assert dm.stage == "fit"
    module = LitMLP()
    module.train_dataloader = loader
    assert np.array_equal(lrl.find(module, steps=STEPS, progress=False).losses, res.losses)


def test_first_optimizer_accepts_every_configure_optimizers_form():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    forms = [opt, [opt], (opt,), ([opt], [sched]), {"optimizer": opt, "lr_scheduler": sched}, [{"optimizer": opt}]]
    assert all(lrl.first_optimizer(f) is opt for f in forms)
    with pytest.raises(ValueError, match="optimizer"):
        lrl.first_optimizer(None)


def test_several_optimizers_are_refused_as_lightning_refuses_them_under_automatic_optimization():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    other = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.1)
    for conf in ([opt, other], ([opt, other], []), [{"optimizer": opt}, {"optimizer": other}]):
        with pytest.raises(ValueError, match=r"returned 2 optimizers \(SGD, Adam\).*pass optimizer="):
            lrl.first_optimizer(conf)


def test_train_dataloader_hook_drawing_random_data_leaves_the_rng_unchanged():
    """module.train_dataloader() runs outside lrfast.find's snapshot; the entry point puts the RNGs back too."""
    module = LitMLP()

    def random_loader():
        ds = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))  # draws from the global RNG
        return DataLoader(ds, batch_size=16, shuffle=True)

    module.train_dataloader = random_loader
    before = rng_states()
    lrl.find(module, steps=STEPS, progress=False)
    assert_same_rng(before, rng_states())


def test_no_suggestion_is_explained_and_the_lr_is_kept_with_a_warning():
    module = LitMLP()
    with pytest.warns(UserWarning, match="the learning rate is left as it was: no suggestion: the run stopped at step"):
        res = lrl.find(module, train_dataloaders=loader(), steps=STEPS, min_lr=50, max_lr=100, progress=False)
    assert res.suggestion is None and module.lr == 1e-3
    assert any(n.startswith("no suggestion") and "min_lr" in n for n in res.info["notes"])


class _LRAtFirstStep(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.base_lrs = trainer.lr_scheduler_configs[0].scheduler.base_lrs


def test_callback_sets_the_lr_before_the_first_step_and_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module, finder, probe = LitMLP(), lrl.LRFastFinder(steps=STEPS, progress=False), _LRAtFirstStep()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[finder, probe])  # fmt: skip
    trainer.fit(module, train_dataloaders=loader())
    lr = finder.result.suggestion
    assert lr is not None and module.lr == lr and probe.lr == lr and probe.base_lrs == [lr]
    assert trainer.global_step == 2
    assert list(tmp_path.iterdir()) == []
