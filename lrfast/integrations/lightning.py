"""lrfast for PyTorch Lightning: the range test on a LightningModule's own `training_step` and
`configure_optimizers`, standalone (`find`) or as a Trainer callback (`LRFastFinder`).

Unlike Lightning's `Tuner.lr_find`, nothing is written (no `.lr_find_*.ckpt` in the working directory) and no
Trainer is needed: the module runs through `lrfast.find`, which restores its parameters, buffers, training flags
and the RNG bitwise. Lightning is imported here, never by `import lrfast`."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lrfast.api import find as _find
from lrfast.result import LRFindResult
from lrfast.state import capture_rng, restore_rng

try:  # the unified package first, as Lightning's own docs import it
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError(
            "lrfast.integrations.lightning needs PyTorch Lightning; pip install pytorch-lightning (or lightning)"
        ) from e

_parsing = importlib.import_module(f"{pl.__name__}.utilities.parsing")
_CombinedLoader = importlib.import_module(f"{pl.__name__}.utilities.combined_loader").CombinedLoader

LR_ATTRS = ("lr", "learning_rate")  # the names Lightning's lr_find looks for, in its order


def find(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    train_dataloaders: Iterable | None = None,
    *,
    update_attr: bool = True,
    attr_name: str = "",
    **find_kwargs,
) -> LRFindResult:
    """Run `lrfast.find` on `module.training_step(batch, batch_idx)` with the first optimizer of
    `module.configure_optimizers()` (its LR scheduler is not used during the test; pass `optimizer=` to override).

    Batches come from `train_dataloaders`, else `datamodule.train_dataloader()` (after `datamodule.prepare_data()`
    and `datamodule.setup("fit")`, as `Trainer.fit` calls them), else `module.train_dataloader()`. The test runs
    where the module is. `self.log` / `self.log_dict` in `training_step` are no-ops during the test. With
    `update_attr`, the suggestion is written to `attr_name`, or the first of `lr` / `learning_rate` found on the
    module or in `module.hparams` (as Lightning's `lr_find(update_attr=True)`); checked before the test runs.
    `find_kwargs` are `lrfast.find`'s (min_lr, max_lr, steps, suggestion, seed, candidates, ...)."""
    if not isinstance(module, pl.LightningModule):
        raise TypeError(f"module={type(module).__name__} is not a {pl.__name__}.LightningModule; for a plain "
                        "nn.Module use lrfast.find(model, loader)")  # fmt: skip
    attr = _lr_attr(module, attr_name) if update_attr else ""
    rng = capture_rng()  # the data hooks below may draw from the RNGs (a random split, random data): put back
    try:
        result = _find_with_hooks(module, datamodule, train_dataloaders, find_kwargs)
    finally:
        restore_rng(rng)
    if attr and result.suggestion is not None:
        _set_lr(module, attr, result.suggestion)
    return result


def _find_with_hooks(module, datamodule, train_dataloaders, find_kwargs: dict) -> LRFindResult:
    if train_dataloaders is None:
        if datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("fit")
            train_dataloaders = datamodule.train_dataloader()
        elif not pl.utilities.model_helpers.is_overridden("train_dataloader", module):
            raise ValueError(f"no train dataloader: {type(module).__name__} does not define train_dataloader(); pass "
                             "train_dataloaders=... or datamodule=...")  # fmt: skip
        else:
            train_dataloaders = module.train_dataloader()
    if "optimizer" not in find_kwargs:
        find_kwargs["optimizer"] = first_optimizer(module.configure_optimizers())
    return _run(module, train_dataloaders, find_kwargs)


class LRFastFinder(pl.Callback):
    """Finds the LR with lrfast when `trainer.fit` starts and sets it before training: the suggestion goes to the
    module's `lr` / `learning_rate` (or `attr_name`), and the trainer's optimizers and schedulers are rebuilt from
    `configure_optimizers()` so the first step already uses it. `self.result` holds the LRFindResult.

        trainer = pl.Trainer(callbacks=[LRFastFinder(steps=100)])
        trainer.fit(model, datamodule=dm)"""

    def __init__(self, update_attr: bool = True, attr_name: str = "", **find_kwargs):
        super().__init__()
        self.update_attr, self.attr_name, self.find_kwargs = update_attr, attr_name, find_kwargs
        self.result: LRFindResult | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The strategy has built the optimizers already (Trainer._run: strategy.setup, then on_fit_start), and the
        # fit loop sets up the train dataloader only when it runs: take the loader from the fit's data source.
        attr = _lr_attr(pl_module, self.attr_name) if self.update_attr else ""
        kwargs = dict(self.find_kwargs)
        rng = capture_rng()  # the loader hooks may draw from the RNGs: the fit goes on as without the finder
        try:
            if "optimizer" not in kwargs:
                kwargs["optimizer"] = trainer.optimizers[0] if trainer.optimizers else first_optimizer(
                    pl_module.configure_optimizers())  # fmt: skip
            self.result = _run(pl_module, _trainer_loader(trainer, pl_module), kwargs)
        finally:
            restore_rng(rng)
        lr = self.result.suggestion
        if not attr or lr is None:
            return
        _set_lr(pl_module, attr, lr)
        strategy = trainer.strategy
        if isinstance(strategy, (pl.strategies.SingleDeviceStrategy, pl.strategies.DDPStrategy)):
            strategy.setup_optimizers(trainer)  # configure_optimizers() again: groups' ratios and schedulers kept
        else:  # strategies that wrap their optimizers (DeepSpeed, FSDP): set the LR in place, as Lightning's does
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr


def first_optimizer(conf: Any) -> torch.optim.Optimizer:
    """The one optimizer of any of `configure_optimizers()`'s return forms: an optimizer, a list/tuple of them,
    ([optimizers], [schedulers]), {"optimizer": ..., "lr_scheduler": ...}, or a list/tuple of such dicts. Several
    optimizers are refused, as Lightning refuses them under automatic optimization."""
    found = _optimizers_in(conf)
    if len(found) > 1:
        raise ValueError(
            f"configure_optimizers() returned {len(found)} optimizers ({', '.join(type(o).__name__ for o in found)}); "
            "under automatic optimization Lightning trains with one (it raises for several, which need manual "
            "optimization), and a range test sweeps one optimizer's LR: pass optimizer=... to choose which, or "
            "run lrfast.find on the part of the model that optimizer trains"
        )
    if found:
        return found[0]
    raise ValueError(
        f"configure_optimizers() returned {type(conf).__name__} ({conf!r:.80}) with no optimizer in it; return an "
        "optimizer, a list of them, ([optimizers], [schedulers]) or {'optimizer': ...}, or pass optimizer=..."
    )


def _lr_attr(module: pl.LightningModule, attr_name: str) -> str:
    """The attribute the suggestion goes to, found before anything runs (Lightning's _determine_lr_attr_name).
    Reading `module.hparams` creates an empty `_hparams` on a module that never saved any: it is removed again."""
    fresh = "_hparams" not in module.__dict__
    try:
        return _find_lr_attr(module, attr_name)
    finally:
        if fresh and not module.__dict__.get("_hparams", True):
            del module.__dict__["_hparams"]


def _find_lr_attr(module: pl.LightningModule, attr_name: str) -> str:
    if attr_name:
        if not _parsing.lightning_hasattr(module, attr_name):
            raise AttributeError(
                f"attr_name={attr_name!r}: {type(module).__name__} has no attribute {attr_name!r}, nor has its "
                f"hparams; set self.{attr_name} (or self.save_hyperparameters()) in __init__, pass the attr_name "
                "configure_optimizers reads, or update_attr=False to only get the result"
            )
        return attr_name
    for name in LR_ATTRS:
        if _parsing.lightning_hasattr(module, name):
            return name
    raise AttributeError(
        f"update_attr=True but {type(module).__name__} has neither `lr` nor `learning_rate`, on the module or in "
        "its hparams, to write the suggestion to; pass attr_name='<the attribute configure_optimizers reads>', "
        "or update_attr=False to only get the result"
    )


def _set_lr(module: pl.LightningModule, attr: str, lr: float) -> None:
    """Lightning's lightning_setattr: the module, its hparams and the trainer's datamodule, wherever `attr` is."""
    fresh = "_hparams" not in module.__dict__
    _parsing.lightning_setattr(module, attr, lr)
    if fresh and not module.__dict__.get("_hparams", True):
        del module.__dict__["_hparams"]


class _TrainingStep(nn.Module):
    """model(batch=..., batch_idx=...) -> {"loss": module.training_step(batch, batch_idx)}. Holds the module as a
    submodule, so its parameters are the module's own and the module's optimizer passes lrfast's check."""

    def __init__(self, module: pl.LightningModule):
        super().__init__()
        self.module = module

    def forward(self, batch: Any, batch_idx: int) -> dict:
        out = self.module.training_step(batch, batch_idx)
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor):
            raise ValueError(
                f"training_step returned {type(out).__name__} at batch_idx={batch_idx}; the range test needs the "
                "loss tensor (or a dict with 'loss') at every step. Lightning's lr_find records NaN for a skipped "
                "batch and goes on; lrfast does not skip: every candidate trains on every cached batch so that "
                "curves compare step for step, and a missing loss would read as divergence. Leave the batches "
                "training_step skips out of the loader given to the range test (a filtering sampler or dataset)"
            )
        return {"loss": loss}


class _Numbered:
    """Re-iterable {"batch": b, "batch_idx": i} over a train loader (i restarts at 0 each epoch, as in Lightning):
    lrfast passes the dict as keyword arguments, so every cached batch keeps its own batch_idx."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __iter__(self) -> Iterator[dict]:
        if isinstance(self.loader, _CombinedLoader):
            for batch, batch_idx, _ in self.loader:
                yield {"batch": batch, "batch_idx": batch_idx}
        else:
            for batch_idx, batch in enumerate(self.loader):
                yield {"batch": batch, "batch_idx": batch_idx}


def _run(module: pl.LightningModule, loader: Iterable, find_kwargs: dict) -> LRFindResult:
    if not module.automatic_optimization:
        raise ValueError(
            f"{type(module).__name__}.automatic_optimization is False: its training_step steps its own optimizers, "
            "which a range test can't drive; run lrfast.find on the underlying nn.Module with a loss_fn instead"
        )
    if loader is None:
        raise ValueError("no train dataloader: pass train_dataloaders=..., a datamodule, or define train_dataloader()")
    if _is_loader_collection(loader):  # several train loaders: batches combined as the fit loop does
        loader = _CombinedLoader(loader, "max_size_cycle")
    # Outside a Trainer, self.log warns on every call; inside one before the fit loop runs, it raises (no result
    # collection for on_fit_start). Instance attributes shadow the methods for the run; the dict is restored.
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    module.__dict__["log"] = module.__dict__["log_dict"] = _no_log
    try:
        result = _find(_TrainingStep(module), _Numbered(loader), **find_kwargs)
        why = result.why_no_suggestion()
        if why:
            warnings.warn(f"lrfast: the learning rate is left as it was: {why}", stacklevel=3)
        return result
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                module.__dict__[name] = saved[name]
            else:
                del module.__dict__[name]


def _no_log(*args, **kwargs) -> None:
    return None


def _is_loader_collection(loader: Any) -> bool:
    items = loader.values() if isinstance(loader, Mapping) else loader if isinstance(loader, (list, tuple)) else None
    return items is not None and len(items) > 0 and all(isinstance(x, Iterable) and not isinstance(
        x, (torch.Tensor, str, Mapping, list, tuple)) for x in items)  # fmt: skip


def _optimizers_in(conf: Any) -> list[torch.optim.Optimizer]:
    if isinstance(conf, torch.optim.Optimizer):
        return [conf]
    if isinstance(conf, Mapping):
        return _optimizers_in(conf.get("optimizer"))
    if isinstance(conf, (list, tuple)):
        if len(conf) == 2 and isinstance(conf[0], (list, tuple)):  # ([optimizers], [schedulers])
            return _optimizers_in(conf[0])
        return [o for item in conf for o in _optimizers_in(item)]
    return []


def _trainer_loader(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable | None:
    """The train loader(s) of this fit: the fit loop's when set up, else its data source (the loader passed to
    fit, the datamodule's or the module's train_dataloader(); the datamodule is set up by now), else the hooks."""
    if trainer.train_dataloader is not None:
        return trainer.train_dataloader
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is not None and source.is_defined():
        return source.dataloader()
    if trainer.datamodule is not None:
        return trainer.datamodule.train_dataloader()
    return pl_module.train_dataloader()
