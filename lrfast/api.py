"""lrfast.find: validate -> snapshot -> batches -> arena -> run -> result; the user's state restored in `finally`."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lrfast import batches as _batches
from lrfast import optimizers, schedule
from lrfast import suggest as _suggest
from lrfast.engine import runner
from lrfast.engine.arena import Arena
from lrfast.engine.step import ModuleStep
from lrfast.kernels import cpu as cpu_kernels
from lrfast.result import LRFindResult
from lrfast.state import Snapshot, seed_all


def find(
    model: nn.Module,
    loader: Iterable,
    *,
    optimizer="adamw",
    loss_fn: Callable | None = None,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    steps: int = 100,
    mode: str = "exp",
    smooth: float = 0.98,
    early_stop_threshold: float | None = 4.0,
    suggestion: str = "valley",
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> LRFindResult:
    """Run an LR range test on `model` with batches from `loader` and return the curve and a suggested LR.

    The LR grows from `min_lr` to `max_lr` over `steps` steps (`mode` "exp" or "linear", both endpoints hit); the
    loss is smoothed by a debiased EMA (`smooth`) and the test stops when the smoothed loss exceeds
    `early_stop_threshold` x its best (None: never) or is not finite. `optimizer` is "sgd" / "adam" / "adamw"
    (torch defaults), a torch.optim.Optimizer on the model's parameters (its class, hyper-parameters and param
    groups are used, its state is not touched), or a callable params -> Optimizer. Without `loss_fn`, the loss is
    the model output's `.loss`, or cross-entropy for integer targets, MSE for float targets. `suggestion` picks the
    method of `result.suggestion` (see lrfast.suggest). `seed` seeds every RNG during the run (shuffling,
    dropout) so the same call gives the same curve.

    The model's parameters, grads, buffers, training flags, the optimizer and the torch / numpy / python RNG states
    are bitwise unchanged afterwards, also after an exception or Ctrl-C. No file is written."""
    t0 = time.perf_counter()
    _check_args(model, loss_fn, min_lr, max_lr, steps, mode, smooth, early_stop_threshold, suggestion, seed, progress)
    device = _resolve_device(model, device)
    plan = optimizers.resolve(optimizer, model)
    lrs = schedule.table(float(min_lr), float(max_lr), steps, mode, k=1)

    snap = Snapshot(model)
    try:
        seed_all(seed)
        splits = [_batches.split(_batches.to_device(b, device)) for b in _batches.take(loader, steps)]
        arena = Arena(plan, 1, device)
        snap.lend(arena.segments, device)
        model.train()
        step = ModuleStep(model, arena, loss_fn)
        tracker = runner.Tracker(1, steps, smooth, early_stop_threshold, device)
        lr_table = torch.tensor(lrs.T, dtype=torch.float64, device=device).contiguous()  # [S, K]: row t contiguous
        t_setup = time.perf_counter()
        with _progress_bar(progress, steps) as bar:
            steps_run = runner.run(step, arena, plan, splits, lr_table, tracker, bar)
        losses, smoothed = tracker.losses.cpu().numpy(), tracker.smoothed.cpu().numpy()
        t_steps = time.perf_counter()
    finally:
        snap.restore()

    info = {
        "strategy": "sweep",
        "candidates": 1,
        "device": str(device),
        "optimizer": plan.optimizer_class,
        "optimizer_path": "generic torch.optim" if plan.kind == "generic" else f"fused {cpu_kernels.BACKEND}",
        "forward": "module (K=1)",
        "loss": step.loss_desc,
        "params": arena.numel,
        "notes": plan.notes + (["grads copied into the arena (autograd replaced the preset .grad)"]
                               if step.copy_grads else []),  # fmt: skip
    }
    timings = {"setup": t_setup - t0, "steps": t_steps - t_setup, "total": time.perf_counter() - t0}
    return LRFindResult(lrs, losses, smoothed, steps_run, method=suggestion, timings=timings, info=info)


def _check_args(model, loss_fn, min_lr, max_lr, steps, mode, smooth, threshold, suggestion, seed, progress) -> None:
    """Every argument error, before anything of the user's is touched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} is not a torch.nn.Module; pass the model to train")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn={type(loss_fn).__name__} is not callable; pass a function (output, target) -> loss")
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if not _is_real(value) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite positive number, e.g. {name}=1e-7")
    if min_lr <= 0:
        raise ValueError(f"min_lr={min_lr!r} must be > 0 (the sweep is exponential); e.g. min_lr=1e-7")
    if min_lr >= max_lr:
        raise ValueError(f"min_lr={min_lr!r} must be smaller than max_lr={max_lr!r}; swap them or widen the range")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
        raise ValueError(f"steps={steps!r} must be an integer >= 2 (a curve needs points); e.g. steps=100")
    if mode not in schedule.MODES:
        raise ValueError(f"mode={mode!r} is not a schedule; use one of: {', '.join(schedule.MODES)}")
    if not _is_real(smooth) or not 0 <= smooth < 1:
        raise ValueError(f"smooth={smooth!r} must be in [0, 1) (0: no smoothing); e.g. smooth=0.98")
    if threshold is not None and (not _is_real(threshold) or not threshold > 1 or not math.isfinite(threshold)):
        raise ValueError(
            f"early_stop_threshold={threshold!r} must be a number > 1 (stop when the smoothed loss exceeds it x "
            "the best), or None to never stop early; e.g. early_stop_threshold=4.0"
        )
    if suggestion not in _suggest.METHODS:
        raise ValueError(f"suggestion={suggestion!r} is not a method; use one of: {', '.join(_suggest.METHODS)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer; e.g. seed=0")
    if not isinstance(progress, bool):
        raise TypeError(f"progress={progress!r} must be True or False")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _resolve_device(model: nn.Module, device) -> torch.device:
    first = next(model.parameters(), None)
    model_device = first.device if first is not None else torch.device("cpu")
    if device is None:
        return model_device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device; e.g. device='cpu' or 'cuda:0'") from e
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
    if device != model_device:
        raise ValueError(
            f"device={str(device)!r} but the model is on {model_device}; move the model first "
            f"(model.to({str(device)!r})) or pass device=None to run where the model is"
        )
    return device


def _progress_bar(progress: bool, steps: int):
    from tqdm.auto import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal, so logs and CI output stay clean
    return tqdm(total=steps, desc="lrfast", unit="step", leave=False, disable=None if progress else True)
