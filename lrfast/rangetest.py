"""RangeTest: an LR range test that drives your own training loop (several optimizers, your AMP or clipping recipe,
sharded models), with lrfast's schedule, smoothing, stop rule, suggestion, result and restore.

    with lrfast.RangeTest(optimizer, steps=100, restore=model) as rt:
        for batch in rt.batches(loader):        # yields until `steps`, or until the loss diverged
            loss = compute_loss(model, batch)
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            rt.record(loss)                      # on the loss's device: no host sync per step
    rt.result                                    # LRFindResult: suggestion, plot, JSON

Before step t's batch is yielded, every param group of every optimizer gets step t's LR (the groups' LR ratios
kept: the largest group follows the sweep). `record` updates the smoothed loss, best and stop flag on the loss's
device (engine/tracker.Tracker); the host reads the flag every `check_every` steps (CUDA: a non-blocking copy,
polled). Under torch.distributed (a process group of more than one rank) the losses are averaged over the ranks
before they are recorded, so every rank stops at the same step. On exit (normal, exception, Ctrl-C) the
optimizers' state and hyper-parameters, the modules named by `restore` (parameters, buffers, grads: the same
objects, their values copied back) and the RNGs are restored bitwise."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lrfast import peers, schedule
from lrfast.distributed import rank_world
from lrfast.engine.loop import _all_stopped
from lrfast.engine.tracker import Tracker
from lrfast.options import FindOptions
from lrfast.result import LRFindResult
from lrfast.state import capture_rng, restore_rng


class RangeTest:
    def __init__(self, optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer], *, min_lr: float = 1e-7,
                 max_lr: float = 10.0, steps: int = 100, mode: str = "exp", smooth: float = 0.98,
                 early_stop_threshold: float | None = 4.0, suggestion: str = "valley", like: str | None = None,
                 restore: nn.Module | list[nn.Module] | None = None, check_every: int | None = None,
                 distributed: bool | None = None):  # fmt: skip
        """The options are lrfast.find's, checked alike (`like`: a peer's range test); `restore`: the module(s)
        whose parameters, buffers and grads are put back on exit (None: the model keeps what the test trained, and
        the result's notes say so); `check_every`: host reads of the stop flag (default 1 on CPU, 10 on CUDA);
        `distributed`: average the recorded losses over the ranks (default: when a process group of more than one
        rank is initialized)."""
        self.optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        for i, opt in enumerate(self.optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizer[{i}] is a {type(opt).__name__}, not a torch.optim.Optimizer; pass the "
                                "optimizer(s) your loop steps")  # fmt: skip
        self.opts = FindOptions(min_lr=min_lr, max_lr=max_lr, steps=steps, mode=mode, smooth=smooth,
                                early_stop_threshold=early_stop_threshold, suggestion=suggestion, like=like,
                                progress=False)  # fmt: skip
        lrs = [_lr_value(g["lr"]) for opt in self.optimizers for g in opt.param_groups]
        top = max(lrs)
        if not top > 0:
            raise ValueError("optimizer: every param group has lr 0; give the groups their LRs (their ratios are kept)")
        self.ratios = [[_lr_value(g["lr"]) / top for g in opt.param_groups] for opt in self.optimizers]
        o = self.opts
        lo = top if o.min_lr is None else o.min_lr  # like="torch_lr_finder" starts at the optimizer's lr
        if not lo < o.max_lr:
            raise ValueError(f"min_lr={lo!r} must be below max_lr={o.max_lr!r}")
        self.table = peers.sweep(o.like, lo, o.max_lr, o.steps, o.mode) if o.like else \
            schedule.sweep(lo, o.max_lr, o.steps, o.mode)  # fmt: skip
        modules = [] if restore is None else list(restore) if isinstance(restore, (list, tuple)) else [restore]
        for m in modules:
            if not isinstance(m, nn.Module):
                raise TypeError(f"restore: {type(m).__name__} is not a torch.nn.Module; pass the model(s) to put "
                                "back after the test, or None")  # fmt: skip
        self.modules = modules
        if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int)
                                        or check_every < 1):  # fmt: skip
            raise ValueError(f"check_every={check_every!r} must be an integer >= 1 (steps between host reads)")
        self.check_every = check_every
        self.distributed = distributed
        self.tracker: Tracker | None = None
        self.recorded = 0
        self._result: LRFindResult | None = None
        self._saved = None

    # --- the context: save on entry, restore on exit ---

    def __enter__(self) -> RangeTest:
        self._saved = (_save_modules(self.modules), [_save_optimizer(o) for o in self.optimizers], capture_rng())
        self._t0 = time.perf_counter()
        self._world = rank_world()[1] if self.distributed in (None, True) else 1
        if self.distributed and self._world == 1:
            raise ValueError("distributed=True needs an initialized torch.distributed process group of > 1 rank")
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.recorded:
                self._result = self._make_result()
        finally:
            modules, optimizers, rng = self._saved
            _restore_modules(modules)
            for saved in optimizers:
                _restore_optimizer(saved)
            restore_rng(rng)

    @property
    def result(self) -> LRFindResult:
        if self._result is None:
            raise RuntimeError("RangeTest.result: no result yet; it is made when the `with` block ends, after at "
                               "least one rt.record(loss)")  # fmt: skip
        return self._result

    # --- the loop ---

    def batches(self, loader: Iterable) -> Iterator:
        """The loader's batches (re-iterated when it is shorter than `steps`), step t's LR set before each; stops
        after `steps` or when the recorded loss diverged (read every `check_every` steps)."""
        if self._saved is None:
            raise RuntimeError("RangeTest.batches: use it inside `with lrfast.RangeTest(...) as rt:`")
        pending: collections.deque = collections.deque()
        it = iter(loader)
        for t in range(self.opts.steps):
            if t != self.recorded:
                raise RuntimeError(f"RangeTest: step {t - 1} recorded no loss; call rt.record(loss) once per batch")
            if t and t % self._check_every() == 0 and _all_stopped(self.tracker.alive, pending):
                return
            self._set_lr(float(self.table[t]))
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                try:
                    batch = next(it)
                except StopIteration:
                    raise ValueError("loader yielded no batch; pass a loader with at least one batch") from None
            yield batch

    def record(self, loss: torch.Tensor) -> None:
        """This step's loss (a one-element tensor; detached here). Raises when called twice in a step."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"rt.record(loss): loss must be a one-element tensor, got {_describe(loss)}")
        if self.recorded >= self.opts.steps:
            raise RuntimeError(f"rt.record: all {self.opts.steps} steps are recorded; iterate rt.batches(loader)")
        loss = loss.detach().reshape(1)
        if self._world > 1:
            loss = loss.to(torch.float64, copy=True)
            torch.distributed.all_reduce(loss)  # SUM: gloo has no AVG
            loss /= self._world
        if self.tracker is None:
            o = self.opts
            self.tracker = Tracker(1, o.steps, o.smooth, o.early_stop_threshold, loss.device, like=o.like)
        self.tracker.record(self.recorded, loss)
        self.recorded += 1

    def _check_every(self) -> int:
        if self.check_every is None:
            self.check_every = 10 if self.tracker.alive.device.type == "cuda" else 1
        return self.check_every

    def _set_lr(self, lr: float) -> None:
        for opt, ratios in zip(self.optimizers, self.ratios):
            for g, ratio in zip(opt.param_groups, ratios):
                value = lr * ratio if ratio != 1.0 else lr
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"].fill_(value)
                else:
                    g["lr"] = value

    def _make_result(self) -> LRFindResult:
        tr, o = self.tracker, self.opts
        steps_run = min(int(tr.steps_run.max()), self.recorded)
        notes = [] if self.modules else ["restore=None: the model keeps the weights the range test trained (pass "
                                         "restore=model to put them back)"]  # fmt: skip
        if self.recorded < o.steps and int(tr.steps_run.max()) == o.steps:
            notes.append(f"the loop ended after {self.recorded} of {o.steps} steps, before the loss diverged")
        timings = {"total": time.perf_counter() - self._t0}
        info = {"strategy": "sweep", "candidates": 1, "loop": "RangeTest",
                "optimizer": ", ".join(type(opt).__name__ for opt in self.optimizers), "notes": notes}  # fmt: skip
        if self._world > 1:
            info["distributed"] = {"world": self._world, "losses": "averaged over the ranks"}
        result = LRFindResult(self.table[None], tr.losses.cpu().numpy(), tr.smoothed.cpu().numpy(), steps_run,
                              method=o.suggestion, timings=timings, info=info, runs=[steps_run],
                              like=o.like)  # fmt: skip
        why = result.why_no_suggestion()
        if why:
            notes.append(why)
        return result


def _lr_value(lr) -> float:
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def _describe(x) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _save_modules(modules: list[nn.Module]) -> list:
    """Per module: every parameter and buffer with a copy of its value, every grad object with a copy, the training
    flags. Restored into the same objects."""
    saved = []
    for m in modules:
        tensors = {id(t): (t, t.detach().clone()) for t in [*m.parameters(), *m.buffers()]}
        grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in m.parameters()]
        saved.append((list(tensors.values()), grads, [(sub, sub.training) for sub in m.modules()]))
    return saved


def _restore_modules(saved: list) -> None:
    with torch.no_grad():
        for tensors, grads, flags in saved:
            for t, value in tensors:
                t.copy_(value)
            for p, grad, value in grads:
                if grad is not None:
                    grad.copy_(value)
                p.grad = grad
            for sub, training in flags:
                sub.training = training


def _save_optimizer(opt: torch.optim.Optimizer):
    """The optimizer's state (the same dicts and tensors, with copies of their values) and every group's
    hyper-parameters."""
    state = {p: (s, {k: v.detach().clone() for k, v in s.items() if isinstance(v, torch.Tensor)},
                 {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)}) for p, s in opt.state.items()}
    groups = [{k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]  # fmt: skip
    return opt, state, groups


def _restore_optimizer(saved) -> None:
    opt, state, groups = saved
    with torch.no_grad():
        for p in [p for p in opt.state if p not in state]:
            del opt.state[p]
        for p, (s, tensors, others) in state.items():
            for k, v in tensors.items():
                if isinstance(s.get(k), torch.Tensor):
                    s[k].copy_(v)  # the same tensor, its value back
                else:
                    s[k] = v
            for k in [k for k in s if k not in tensors and k not in others]:
                del s[k]
            s.update(others)
            opt.state[p] = s
        for g, values in zip(opt.param_groups, groups):
            for k, v in values.items():
                if isinstance(v, torch.Tensor) and isinstance(g.get(k), torch.Tensor):
                    g[k].copy_(v)
                else:
                    g[k] = v


__all__ = ["RangeTest"]
