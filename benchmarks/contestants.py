"""The contestants of benchmarks/compare.py, each one LR range test on (model, loader, Settings): lrfast (K = 1, and
K = 16 / 32 replicas with strategy "seeds"), torch-lr-finder, Lightning's `Tuner.lr_find` and a bare eager loop.
Peers are optional imports (`missing` says why one cannot run)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import workloads as W

CONTESTANTS = ("lrfast", "lrfast_k16", "lrfast_k32", "torch_lr_finder", "lightning", "bare")
PEERS = ("bare", "torch_lr_finder", "lightning")
# the package each contestant brings on top of torch (its import is timed apart from the range test)
MODULES = {"lrfast": "lrfast", "lrfast_k16": "lrfast", "lrfast_k32": "lrfast", "torch_lr_finder": "torch_lr_finder",
           "lightning": "pytorch_lightning", "bare": None}  # fmt: skip
SUGGESTION_METHOD = {"lrfast": "valley", "lrfast_k16": "median valley", "lrfast_k32": "median valley",
                     "torch_lr_finder": "steepest (plot)", "lightning": "steepest", "bare": ""}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    min_lr: float = 1e-7
    max_lr: float = 10.0
    steps: int = 100
    batch_size: int = 64
    early_stop: float | None = None  # None: off for every contestant; a number: that threshold where a peer has one
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None: torch's default (the cores)
    optimizer: str = "adam"  # "adam" | "adamw", torch defaults
    precision: str = "fp32"  # "fp32" | "bf16" autocast
    loss: Callable = F.cross_entropy
    quick: bool = False  # the workloads' tiny configs

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def for_workload(wl: W.Workload, s: Settings, steps: int | None = None, batch_size: int | None = None) -> Settings:
    """s with the workload's steps, batch, optimizer, precision and loss (steps / batch_size: given ones win)."""
    return dataclasses.replace(s, steps=steps or wl.steps, batch_size=batch_size or wl.batch_size,
                               optimizer=wl.optimizer, precision=wl.precision, loss=wl.loss)  # fmt: skip


def fresh(dataset, make_model, s: Settings, seed: int = 0):
    """The same initial weights and the same batch order for every contestant and every round."""
    torch.manual_seed(seed)
    model = make_model().to(s.device)
    return model, W.lrfast_data().loader(dataset, batch_size=s.batch_size, shuffle=True, seed=seed)


@contextlib.contextmanager
def _autocast(s: Settings):
    if s.precision == "bf16":
        with torch.autocast(torch.device(s.device).type, dtype=torch.bfloat16):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------- contestants
# Each returns {k, steps_run, suggestion, impl, and where it has them: steady_ms (ms/step), compile_s, capture_s};
# the caller times the whole call.


def _torch_impl(s: Settings) -> str:
    return f"torch.optim.{W.OPTIMIZERS[s.optimizer].__name__} default" + (" (for-loop on CPU)" if not s.cuda else "")


def run_lrfast(model, loader, s: Settings, k: int = 1):
    import lrfast

    strategy = {"candidates": k, "strategy": "seeds"} if k > 1 else {}
    r = lrfast.find(
        model, loader, optimizer=s.optimizer, loss_fn=s.loss, min_lr=s.min_lr, max_lr=s.max_lr, steps=s.steps,
        mode="exp", early_stop_threshold=s.early_stop, device=s.device, progress=False, precision=s.precision,
        **strategy,
    )  # fmt: skip
    impl = " + ".join(str(r.info[key]) for key in ("optimizer_path", "forward") if key in r.info)
    t = r.timings
    return {"k": int(np.shape(r.lrs)[0]) if np.ndim(r.lrs) == 2 else 1, "steps_run": int(r.steps_run),
            "suggestion": r.suggestion, "impl": impl, "compile_s": t.get("compile"), "capture_s": t.get("capture"),
            "steady_ms": 1e3 * t["steps"] / r.steps_run if t.get("steps") and r.steps_run else None}  # fmt: skip


def run_torch_lr_finder(model, loader, s: Settings):
    from torch_lr_finder import LRFinder

    optimizer = W.OPTIMIZERS[s.optimizer](model.parameters(), lr=s.min_lr)  # its start_lr is the optimizer's lr
    amp = {}
    if s.precision == "bf16":  # its torch.amp backend; bf16 needs no loss scale
        kind = torch.device(s.device).type
        amp = {"amp_backend": "torch", "amp_config": {"device_type": kind, "dtype": torch.bfloat16},
               "grad_scaler": torch.amp.GradScaler(kind, enabled=False)}  # fmt: skip
    finder = LRFinder(model, optimizer, s.loss, device=s.device, **amp)
    # diverge_th defaults to 5 x best of its own (undebiased, 0.05) EMA; inf never fires
    diverge_th = math.inf if s.early_stop is None else s.early_stop
    with _quiet():  # it prints and draws a tqdm bar with no switch to turn them off
        finder.range_test(loader, start_lr=s.min_lr, end_lr=s.max_lr, num_iter=s.steps, step_mode="exp",
                          diverge_th=diverge_th)  # fmt: skip
    finder.reset()
    lrs, losses = finder.history["lr"], finder.history["loss"]
    # its suggestion lives in plot(): lrs[10:-5][argmin(np.gradient(losses[10:-5]))], same maths without the figure
    suggestion = None
    if len(lrs) >= 17:
        suggestion = float(lrs[10:-5][int(np.gradient(np.asarray(losses[10:-5], dtype=float)).argmin())])
    return {"k": 1, "steps_run": len(lrs), "suggestion": suggestion, "impl": _torch_impl(s)}


_LIGHTNING_MODULE = None


def _lightning_module(model, s: Settings):
    global _LIGHTNING_MODULE
    if _LIGHTNING_MODULE is None:
        import pytorch_lightning as pl

        class Wrapped(pl.LightningModule):
            def __init__(self, net, loss, optimizer_cls):
                super().__init__()
                self.net, self.loss, self.optimizer_cls = net, loss, optimizer_cls

            def training_step(self, batch, batch_idx):
                x, y = batch
                return self.loss(self.net(x), y)

            def configure_optimizers(self):
                return self.optimizer_cls(self.parameters())

        _LIGHTNING_MODULE = Wrapped
    return _LIGHTNING_MODULE(model, s.loss, W.OPTIMIZERS[s.optimizer])


def run_lightning(model, loader, s: Settings):
    import pytorch_lightning as pl
    from pytorch_lightning.tuner import Tuner

    module = _lightning_module(model, s)
    epochs = math.ceil(s.steps / max(1, len(loader))) + 1  # lr_find stops at max_steps; the epochs must not stop it
    # it saves a full checkpoint .lr_find_<uuid>.ckpt into default_root_dir (the CWD unless told): keep it in a
    # scratch directory that goes away, and run from there in case anything else lands in the CWD
    with tempfile.TemporaryDirectory(prefix="lrfast-bench-lightning-") as scratch, contextlib.chdir(scratch), _quiet():
        trainer = pl.Trainer(
            accelerator="gpu" if s.cuda else "cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, max_epochs=epochs, default_root_dir=scratch,
            precision="bf16-mixed" if s.precision == "bf16" else "32-true",
        )  # fmt: skip
        finder = Tuner(trainer).lr_find(
            module, train_dataloaders=loader, min_lr=s.min_lr, max_lr=s.max_lr, num_training=s.steps,
            mode="exponential", early_stop_threshold=s.early_stop, update_attr=False,
        )  # fmt: skip
        suggestion = finder.suggestion()
    return {"k": 1, "steps_run": len(finder.results["lr"]), "suggestion": suggestion, "impl": _torch_impl(s)}


def run_bare(model, loader, s: Settings):
    """The floor for eager code: zero_grad, forward (autocast for bf16), loss, backward, set the LR, optimizer step,
    .item(); torch's default optimizer on CPU, its fused one on CUDA; no smoothing, no early stop, no restore, no
    suggestion. steady_ms: the steps after the first 10 % (cuDNN / cuBLAS warm-up and allocator growth done)."""
    fused = {"fused": True} if s.cuda else {}
    optimizer = W.OPTIMIZERS[s.optimizer](model.parameters(), lr=s.min_lr, **fused)
    lrs = (s.min_lr * (s.max_lr / s.min_lr) ** (np.arange(s.steps) / max(1, s.steps - 1))).tolist()
    settle = max(1, s.steps // 10)
    model.train()
    batches = iter(loader)
    for i, lr in enumerate(lrs):
        if i == settle:
            sync(s)
            t_settled = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:  # the steps outrun the dataset: start a new epoch, as the peers do
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
        optimizer.zero_grad()
        with _autocast(s):
            loss = s.loss(model(x), y)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        loss.item()
    steady = 1e3 * (time.perf_counter() - t_settled) / (len(lrs) - settle) if len(lrs) > settle else None
    impl = f"torch.optim.{type(optimizer).__name__}" + (" fused" if s.cuda else " default")
    return {"k": 1, "steps_run": len(lrs), "suggestion": None, "impl": impl, "steady_ms": steady}


RUNNERS = {"lrfast": run_lrfast, "lrfast_k16": partial(run_lrfast, k=16), "lrfast_k32": partial(run_lrfast, k=32),
           "torch_lr_finder": run_torch_lr_finder, "lightning": run_lightning, "bare": run_bare}  # fmt: skip


@contextlib.contextmanager
def _quiet():
    """Peers' prints, tqdm bars, info logs and warnings go nowhere (the child's stdout carries one JSON line)."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null), \
            warnings.catch_warnings():  # fmt: skip
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def missing(contestant: str) -> str | None:
    """Why a contestant cannot run here, or None when it can."""
    module = MODULES[contestant]
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a peer broken by the installed torch
        return f"not available: {type(e).__name__}: {e}"
    if module == "lrfast" and not hasattr(sys.modules["lrfast"], "find"):
        return "not available: lrfast.find is missing in this checkout"
    return None


def sync(s: Settings) -> None:
    if s.cuda:
        torch.cuda.synchronize()
