"""One updater per optimizer path, all called alike after a step's backward: update(lr_table, number, mask), with
lr_table [S, K] (float64, on the run's device), number the 1-based step (an int, or the device step counter) and
mask [K] bool (False: the candidate stopped, or skips this step on an fp16 overflow).

- Fused: SGD / Adam / AdamW on the arena's kernels (lrfast._C, the reference, or Triton reading the LR table at
  the device counter: capturable in a CUDA graph), one call per segment for all K candidates.
- TorchOptim: any other optimizer through torch.optim itself: the plan's private instance (K = 1) or one instance
  per candidate over leaf views of that candidate's row of the arena (K > 1), stepped on the host."""

from __future__ import annotations

import torch

from lrfast import optimizers
from lrfast.engine.arena import Arena


class Fused:
    def __init__(self, arena: Arena):
        self.arena = arena
        self.capturable = arena.backend == "triton"  # reads LRs and step on the device: no host value per step
        self.path = f"fused {arena.backend}"

    def __call__(self, lr_table: torch.Tensor, number, mask: torch.Tensor | None) -> None:
        self.arena.update(lr_table, number, mask=mask)


class TorchOptim:
    capturable = False
    path = "generic torch.optim"

    def __init__(self, plan: optimizers.OptimizerPlan, arena: Arena):
        self.scales = plan.scales
        self.instances = [plan.instance] if arena.k == 1 else candidate_optimizers(plan, arena)

    def __call__(self, lr_table: torch.Tensor, number, mask: torch.Tensor | None) -> None:
        t = int(number) - 1
        live = [True] * len(self.instances) if mask is None else mask.tolist()
        for k, opt in enumerate(self.instances):
            if live[k]:  # a stopped candidate is frozen, as LR 0 does on the fused path
                optimizers.set_lr(opt, self.scales, float(lr_table[t, k]))
                opt.step()


def make(plan: optimizers.OptimizerPlan, arena: Arena) -> Fused | TorchOptim:
    return TorchOptim(plan, arena) if plan.kind == "generic" else Fused(arena)


def candidate_optimizers(plan: optimizers.OptimizerPlan, arena: Arena) -> list[torch.optim.Optimizer]:
    """Generic optimizers with K > 1: one private instance of the user's class per candidate, over leaf views of
    that candidate's row of the arena (params and grads), with the user's param groups and hyper-parameters."""
    opt, out = plan.instance, []
    for k in range(arena.k):
        leaf = {}
        for seg in arena.segments:
            for p, pv, gv in zip(seg.params, seg.views(seg.p, k), seg.views(seg.g, k)):
                t = pv.detach()
                t.grad = gv
                leaf[id(p)] = t
        groups = []
        for g in opt.param_groups:
            hyper = {key: v for key, v in g.items() if key != "params"}
            groups.append({**hyper, "params": [leaf[id(p)] for p in g["params"] if id(p) in leaf]})
        try:
            out.append(type(opt)(groups, **opt.defaults))
        except TypeError as e:
            raise NotImplementedError(
                f"optimizer={type(opt).__name__} with candidates > 1: its constructor does not take (groups, "
                f"**defaults) back ({e}); use optimizer='sgd'/'adam'/'adamw', or candidates=1"
            ) from e
    return out
