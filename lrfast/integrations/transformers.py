"""lrfast for the Hugging Face Trainer: the range test with the trainer's own model, train dataloader, optimizer
recipe (`create_optimizer`: its param groups, weight decay, optimizer class), loss (`compute_loss`), gradient
accumulation and clipping (`max_grad_norm`), standalone (`find`) or before training (`LRFastCallback`).

    res = lrfast.integrations.transformers.find(trainer)      # sets trainer.args.learning_rate = res.suggestion
    trainer.train()

    trainer = Trainer(..., callbacks=[LRFastCallback()])     # the range test at on_train_begin, the LR then set
                                                              # in the optimizer and its scheduler

The model, the optimizer and the RNG are restored bitwise (lrfast.RangeTest); nothing is written. transformers is
imported here, never by `import lrfast`."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch

from lrfast.rangetest import RangeTest
from lrfast.result import LRFindResult

try:
    import transformers
except ImportError as e:
    raise ImportError("lrfast.integrations.transformers needs transformers; pip install transformers") from e


def find(trainer: transformers.Trainer, *, update: bool = True, **options) -> LRFindResult:
    """Run the range test on `trainer`'s model with its train dataloader, optimizer (`create_optimizer`, made with
    the trainer's recipe when it has none yet, and dropped again so that `train()` makes its own at the new LR) and
    `compute_loss`; `options` are lrfast.RangeTest's (min_lr, max_lr, steps, like, ...). `update`: set
    `trainer.args.learning_rate` to the suggestion (kept, with a warning, when there is none)."""
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"trainer={type(trainer).__name__} is not a transformers.Trainer")
    created = trainer.optimizer is None
    optimizer = trainer.create_optimizer()
    try:
        result = _run(trainer.model, optimizer, trainer.get_train_dataloader(), trainer.args,
                      lambda model, inputs: trainer.compute_loss(model, trainer._prepare_inputs(inputs)),
                      options)  # fmt: skip
    finally:
        if created:
            trainer.optimizer = None
    if update:
        _update(trainer.args, result)
    return result


class LRFastCallback(transformers.TrainerCallback):
    """Before the first training step (on_train_begin), run the range test on the model, optimizer and train
    dataloader the Trainer made, then train at the suggestion: every param group's LR (their ratios to
    args.learning_rate kept), the scheduler's base LRs, and args.learning_rate. The loss is the model output's
    `.loss` (the Trainer's default compute_loss). `options` are lrfast.RangeTest's. `result` holds the result."""

    def __init__(self, **options):
        self.options, self.result = options, None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):  # fmt: skip
        if model is None or optimizer is None or train_dataloader is None:
            raise RuntimeError("LRFastCallback: the Trainer passed no model, optimizer or train dataloader to "
                               "on_train_begin; use lrfast.integrations.transformers.find(trainer)")  # fmt: skip
        self.result = _run(model, optimizer, train_dataloader, args, lambda m, inputs: _output_loss(m, inputs),
                           self.options)  # fmt: skip
        lr = self.result.suggestion
        if lr is None:
            warnings.warn(f"lrfast: {self.result.why_no_suggestion()}; training at learning_rate "
                          f"{args.learning_rate}", stacklevel=2)  # fmt: skip
            return
        scale = lr / args.learning_rate
        for g in optimizer.param_groups:
            for key in ("initial_lr", "lr"):
                if key in g:
                    g[key] = g[key] * scale
        if lr_scheduler is not None:
            lr_scheduler.base_lrs = [base * scale for base in lr_scheduler.base_lrs]
            lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        args.learning_rate = lr


def _run(model, optimizer, loader: Iterable, args, loss_of, options: dict) -> LRFindResult:
    """The range test: `args.gradient_accumulation_steps` batches per step (each loss divided by their number, as
    the Trainer does), grads clipped to `args.max_grad_norm` when it is > 0, one optimizer step."""
    accumulate = max(1, int(args.gradient_accumulation_steps))
    was_training = model.training
    model.train()
    try:
        with RangeTest(optimizer, restore=model, **options) as rt:
            for group in rt.batches(_groups(loader, accumulate)):
                total = 0.0
                for inputs in group:
                    loss = loss_of(model, inputs) / accumulate
                    loss.backward()
                    total = total + loss.detach()
                if args.max_grad_norm is not None and args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                rt.record(total)
    finally:
        model.train(was_training)
    result = rt.result
    result.info["loop"] = "transformers.Trainer"
    return result


class _groups:
    """The loader's batches n at a time (an incomplete last group dropped); iterable again, as the loader is."""

    def __init__(self, loader: Iterable, n: int):
        self.loader, self.n = loader, n

    def __iter__(self) -> Iterator[list]:
        group = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.n:
                yield group
                group = []


def _output_loss(model, inputs) -> torch.Tensor:
    outputs = model(**inputs)
    loss = outputs["loss"] if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError("LRFastCallback: the model returned no loss (the batches have no labels?); pass labels, "
                         "or use lrfast.integrations.transformers.find(trainer), which calls trainer.compute_loss")
    return loss


def _update(args, result: LRFindResult) -> None:
    if result.suggestion is None:
        warnings.warn(f"lrfast: {result.why_no_suggestion()}; args.learning_rate kept at {args.learning_rate}",
                      stacklevel=3)  # fmt: skip
        return
    args.learning_rate = result.suggestion
