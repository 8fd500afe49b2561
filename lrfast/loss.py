"""How a model output becomes the loss, in one copy: the default loss resolved from the first batch, the checks of
the first loss (a finite scalar, before any update), and the explanation of a first call that fails on how the
batch was split into the model's inputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lrfast.batches import Split

LossFn = Callable[[Any, Split], torch.Tensor]


def resolve_loss(loss_fn: Callable | None, output: Any, batch: Split) -> tuple[LossFn, str]:
    """Pick how a model output becomes the loss, once, from the first batch: the user's loss_fn(output, target)
    (loss_fn(output, batch) when the batch has no target), else the model's own `output.loss` / `output["loss"]`,
    else cross-entropy for integer targets and MSE for float targets. Returns (fn, description)."""
    if loss_fn is not None:
        if batch.target is None:
            return (lambda out, b: loss_fn(out, b.kwargs or b.args[0])), "loss_fn(output, batch)"
        return (lambda out, b: loss_fn(out, b.target)), "loss_fn(output, target)"
    if getattr(output, "loss", None) is not None:
        return (lambda out, b: out.loss), "output.loss"
    if isinstance(output, Mapping) and output.get("loss") is not None:
        return (lambda out, b: out["loss"]), 'output["loss"]'
    target = batch.target
    if target is None and batch.kwargs and not batch.args:  # a dict batch: model(**batch), nothing else to compare
        raise ValueError(
            f"loss_fn=None: the batch is a dict (keys {', '.join(map(str, batch.kwargs))}) and the model's output "
            f"({type(output).__name__}) has no .loss / ['loss']; a Hugging Face model computes its loss when the "
            "batch has 'labels' (add them, e.g. labels=input_ids for a causal LM), or pass "
            "loss_fn=lambda output, batch: ..."
        )
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
        got = f"output {type(output).__name__}, target {type(target).__name__}"
        raise ValueError(
            f"loss_fn=None and the default loss can't use this batch ({got}): it needs a tensor output and a tensor "
            "target, or a model output with a .loss; pass loss_fn=lambda output, target: ..."
        )
    if not target.is_floating_point() and not target.is_complex() and target.dtype != torch.bool:
        if output.dim() < 1 or output.shape[0] != target.shape[0]:
            raise ValueError(
                f"loss_fn=None: cross-entropy (integer targets) needs output [batch, classes, ...] and target [batch, "
                f"...]; got output {tuple(output.shape)} and target {tuple(target.shape)}; pass loss_fn=..."
            )
        return (lambda out, b: F.cross_entropy(out, b.target.long())), "cross_entropy (integer targets)"
    if target.is_floating_point():
        if output.shape != target.shape:
            raise ValueError(
                f"loss_fn=None: MSE (float targets) needs output and target of the same shape; got output "
                f"{tuple(output.shape)} and target {tuple(target.shape)}; pass loss_fn=..."
            )
        return (lambda out, b: F.mse_loss(out, b.target)), "mse_loss (float targets)"
    raise ValueError(f"loss_fn=None and targets of dtype {target.dtype} have no default loss; pass loss_fn=...")


def first_loss(loss_f: LossFn, desc: str, user_loss_fn, out, batch: Split) -> torch.Tensor:
    """The first step's loss (K = 1), checked: the default loss can use the batch, and the loss is a finite scalar."""
    try:
        loss = loss_f(out, batch)
    except (IndexError, RuntimeError) as e:
        if user_loss_fn is not None:
            raise
        raise ValueError(
            f"loss_fn=None: the default loss ({desc}) failed on the first batch: {e}; fix the targets (class "
            "indices must lie in [0, classes)) or pass loss_fn=..."
        ) from e
    check_scalar(loss)
    check_finite(loss)
    return loss


def check_scalar(loss) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn: the loss must be a scalar tensor, got {shape}; reduce it (e.g. .mean()) or use a "
                         "loss with reduction='mean'")  # fmt: skip


def check_finite(loss: torch.Tensor) -> None:
    """The first step's losses (one per candidate), before any update: not finite means the model or the data is
    broken, not the learning rate."""
    values = loss.detach().reshape(-1).cpu()
    if not bool(torch.isfinite(values).all()):
        shown = values.tolist() if values.numel() > 1 else float(values[0])
        raise ValueError(
            f"the loss is {shown} at the first step, before any update: the model or the data is broken (not the "
            "learning rate); check the inputs for NaN/inf and the model's initialization"
        )


def explain_arity(f: Callable, batch: Split, /, *args, **kwargs):
    """f(*args, **kwargs) for the run's first call of the model on `batch`: a TypeError about the model's arguments
    is raised again with arity_error's explanation."""
    try:
        return f(*args, **kwargs)
    except TypeError as e:
        explained = arity_error(e, batch)
        if explained is None:
            raise
        raise explained from e


def arity_error(e: BaseException, batch: Split) -> TypeError | None:
    """When the first call of the model failed because of how the batch was split into its inputs (a TypeError
    about its arguments), a TypeError that says how lrfast splits batches and what to pass; else None."""
    text = str(e)
    if not isinstance(e, TypeError) or not any(w in text for w in ("positional argument", "keyword argument")):
        return None
    called = ", ".join([f"<input {i}>" for i in range(len(batch.args))] + [f"{k}=..." for k in batch.kwargs])
    target = "no target" if batch.target is None else "the batch's last item as the target"
    return TypeError(
        f"the model failed on the first batch, called as model({called}) with {target}: {text}. lrfast splits a "
        "tuple/list batch (x1, ..., xn, y) into model(x1, ..., xn) and target y, a dict into model(**batch), a "
        "tensor into model(tensor); for other batches wrap the model (a module whose forward takes the inputs "
        "your batches hold, e.g. forward(self, x, y, *extra)) and pass loss_fn=lambda output, target: ..."
    )


