"""One training step's forward and backward. K = 1: the model itself, its parameters pointing into the arena's
row 0 and its .grad into the arena's flat grad buffer, so backward accumulates straight into the buffer the fused
kernel reads (no gather, no copy)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lrfast.batches import Split, explain_arity, resolve_loss
from lrfast.engine.amp import autocast
from lrfast.engine.arena import Arena


class ModuleStep:
    def __init__(self, model: nn.Module, arena: Arena, loss_fn, precision: str = "fp32", scaler=None,
                 compile: bool = False):  # fmt: skip
        self.model, self.arena, self.user_loss_fn = model, arena, loss_fn
        self.forward = torch.compile(model, dynamic=False) if compile else model  # training forward (+ backward)
        self.precision, self.scaler = precision, scaler
        self.loss_f = None
        self.loss_desc = ""
        self.copy_grads = False  # set when autograd did not accumulate into the preset .grad views

    def __call__(self, split: Split) -> torch.Tensor:
        """Zero grads, forward, loss, backward; returns the detached loss as a [1] tensor."""
        self.arena.zero_grad()
        first = self.loss_f is None
        with autocast(self.arena.device, self.precision):
            if first:
                out = explain_arity(self.forward, split, *split.args, **split.kwargs)
            else:
                out = self.forward(*split.args, **split.kwargs)
            loss = self._first_loss(out, split) if first else self.loss_f(out, split)
        (loss if self.scaler is None else loss * self.scaler.scale[0]).backward()
        if first:  # autograd accumulates into preset .grad views; check once that it did
            for seg in self.arena.segments:
                for p, view in zip(seg.params, seg.views(seg.g, 0)):
                    if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                        self.copy_grads = True
        if self.copy_grads:
            self._copy_grads()
        return loss.detach().float().reshape(1)

    @torch.no_grad()
    def evaluate(self, splits: list[Split]) -> torch.Tensor:
        """Mean loss over the cached validation batches in eval mode (no dropout, BatchNorm running stats used,
        not updated), without touching grads or training; returns [1]."""
        self.model.eval()
        try:
            with autocast(self.arena.device, self.precision):
                total = sum(self.loss_f(self.model(*s.args, **s.kwargs), s).detach().float().reshape(1)
                            for s in splits)  # fmt: skip
        finally:
            self.model.train()
        return total / len(splits)

    def _first_loss(self, out, split: Split) -> torch.Tensor:
        """The first step's loss, checked: the default loss can use the batch, the loss is a finite scalar."""
        self.loss_f, self.loss_desc = resolve_loss(self.user_loss_fn, out, split)
        try:
            loss = self.loss_f(out, split)
        except (IndexError, RuntimeError) as e:
            if self.user_loss_fn is not None:
                raise
            raise ValueError(
                f"loss_fn=None: the default loss ({self.loss_desc}) failed on the first batch: {e}; fix the targets "
                "(class indices must lie in [0, classes)) or pass loss_fn=..."
            ) from e
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn: the loss must be a scalar tensor, got {shape}; reduce it (e.g. .mean()) or use a loss "
                "with reduction='mean'"
            )
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ValueError(
                f"the loss is {value} at the first step, before any update: the model or the data is broken (not "
                "the learning rate); check the inputs for NaN/inf and the model's initialization"
            )
        return loss

    def _copy_grads(self) -> None:
        for seg in self.arena.segments:
            for p, view in zip(seg.params, seg.views(seg.g, 0)):
                if p.grad is None:
                    view.zero_()
                elif p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
                    p.grad = view


class Accumulate:
    """Gradient accumulation: a step over N micro-batches whose grads and losses are averaged, which equals one
    step on their concatenation for a mean-reduced loss and micro-batches of one size. Wraps ModuleStep or
    BatchedStep (each call of which leaves one micro-batch's grads in the arena)."""

    def __init__(self, step, arena: Arena):
        self.step, self.arena = step, arena
        self.sums = [torch.empty_like(seg.g) for seg in arena.segments]

    def __call__(self, items: list) -> torch.Tensor:
        total = None
        for i, item in enumerate(items):
            loss = self.step(item)
            for acc, seg in zip(self.sums, self.arena.segments):
                acc.copy_(seg.g) if i == 0 else acc.add_(seg.g)
            total = loss if total is None else total + loss
        for acc, seg in zip(self.sums, self.arena.segments):
            torch.div(acc, len(items), out=seg.g)
        return total / len(items)

    def evaluate(self, splits: list) -> torch.Tensor:
        return self.step.evaluate(splits)
