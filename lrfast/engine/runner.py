"""S steps of the range test. The LR comes from the table [S, K], losses go into a device buffer [K, S], and the
smoothed loss, best loss and alive mask are kept on the device; the host reads the alive mask every
`check_every` steps only, and stops when every candidate has diverged."""

from __future__ import annotations

import torch

from lrfast import optimizers
from lrfast.engine.arena import Arena
from lrfast.engine.tracker import Tracker


def run(step, arena: Arena, plan: optimizers.Plan, splits: list, lr_table: torch.Tensor, tracker: Tracker,
        bar=None, check_every: int = 1, generic: list | None = None, val: list | None = None,
        val_every: int = 1, scaler=None, sync=None) -> int:  # fmt: skip
    """Run up to S steps; returns the number of steps run (the last one is the step where the last candidate
    stopped). lr_table is [S, K] float64 on the device; splits[t] is what `step` takes at step t. `generic`: with
    K > 1 on the generic path, one torch.optim instance per candidate (update.candidate_optimizers). `val`: cached
    validation batches, scored (step.evaluate) after the update of every `val_every`-th step and of the last.
    `sync` (distributed.Sync, ddp mode): after each backward, grads and losses are averaged over the ranks, so every
    rank records the global loss and stops at the same step; validation losses are averaged too."""
    steps = lr_table.shape[0]
    for t in range(steps):
        loss = step(splits[t])
        if sync is not None:
            loss = sync.average(arena, loss)
        tracker.record(t, loss)
        if (t + 1) % check_every == 0 or t + 1 == steps:
            if not bool(tracker.alive.any()):
                if bar is not None:
                    bar.update(1)
                return int(tracker.steps_run.max())
        ok = None
        if scaler is not None:  # fp16: unscale; a candidate with an inf/NaN grad skips this step, only it
            ok = scaler.unscale_(arena.segments)
            scaler.update(ok)
        if plan.kind == "generic" and generic is not None:
            alive = (tracker.alive if ok is None else tracker.alive & ok).tolist()
            for k, opt in enumerate(generic):
                if alive[k]:  # a stopped candidate is frozen, as lr 0 does on the fused path
                    optimizers.set_lr(opt, plan.scales, float(lr_table[t, k]))
                    opt.step()
        elif plan.kind == "generic":
            if ok is None or bool(ok[0]):
                optimizers.set_lr(plan.generic, plan.scales, float(lr_table[t, 0]))
                plan.generic.step()
        else:
            lr = lr_table[t] if arena.k == 1 else lr_table[t] * tracker.alive
            arena.update(lr if ok is None else lr * ok, t + 1)
        after_update(t, steps, step, tracker, lr_table, bar, val, val_every, sync)
    return steps


def after_update(t: int, steps: int, step, tracker: Tracker, lr_table: torch.Tensor, bar, val, val_every: int,
                 sync) -> None:  # fmt: skip
    """Between step t and the next: score the validation batches (every `val_every`-th step and the last; averaged
    over the ranks with `sync`), and move the progress bar (its postfix reads the best LR on the host every 10
    steps, only while a bar is shown)."""
    if val is not None and ((t + 1) % val_every == 0 or t + 1 == steps):
        scores = step.evaluate(val)
        if sync is not None:
            scores = sync.mean_(scores, "averaging the validation losses over the ranks")
        tracker.val[:, t] = torch.where(tracker.alive, scores.to(torch.float64), tracker._nan)
    if bar is not None:
        bar.update(1)
        if t % 10 == 9 and not bar.disable:
            k = int(torch.argmin(tracker.best))
            bar.set_postfix_str(f"best loss at lr {float(lr_table[int(tracker.best_step[k]), k]):.2e}")
