"""One updater per optimizer path, all called alike after a step's backward: update(lr_table, number, mask), with
lr_table [S, K] (float64, on the run's device), number the 1-based step (an int, or the device step counter) and
mask [K] bool (False: the candidate stopped, or skips this step on an fp16 overflow).

- HostFused: SGD / Adam / AdamW on lrfast._C or the reference (kernels/cpu.py), one call per segment for all K
  candidates; this step's LRs are read on the host.
- TritonFused: the same on the Triton kernels, which read the LR table and the step at the device counter, so the
  update is captured in the CUDA graph with the rest of the step.
- TorchOptim: any other optimizer through torch.optim itself: the plan's private instance (K = 1) or one instance
  per candidate over leaf views of that candidate's row of the arena (K > 1), stepped on the host."""

from __future__ import annotations

import torch

from lrfast import optimizers
from lrfast.engine.arena import Arena
from lrfast.kernels import cpu as kernels


class HostFused:
    capturable = False

    def __init__(self, arena: Arena):
        self.arena, self.path = arena, f"fused {arena.backend}"

    def __call__(self, lr_table: torch.Tensor, number, mask: torch.Tensor | None) -> None:
        step = int(number)  # a host read of a device counter: only without Triton (CPU, or CUDA without it)
        lr = lr_table[step - 1]
        if mask is not None:
            lr = lr * mask
        lr = lr.to("cpu", torch.float64)
        for s in self.arena.segments:
            seg_lr = lr if s.lr_scale == 1.0 else lr * s.lr_scale
            p, g = (s.p, s.g) if s.master is None else (s.master, s.g.float())
            if self.arena.kind == "adam":
                kernels.adam_step(p, g, s.state["m"], s.state["v"], seg_lr, step, s.hp)
            else:
                kernels.sgd_step(p, g, s.state.get("buf"), seg_lr, step, s.hp)
            if s.master is not None:
                s.p.copy_(s.master)  # the model computes with the rounding of the fp32 masters


class TritonFused:
    capturable = True
    path = "fused triton"

    def __init__(self, arena: Arena):
        from lrfast.kernels import triton_optim  # imports triton: only for a CUDA arena

        self.arena, self.kernel = arena, triton_optim
        self._tables: tuple | None = None  # (lr_table, its scaled copies, Adam's bias-correction tables)

    def __call__(self, lr_table: torch.Tensor, number, mask: torch.Tensor | None) -> None:
        if mask is not None:
            mask = mask.to(torch.float32)  # once for all segments (the kernels read a float mask)
        scaled, corrections = self._per_run(lr_table)
        for s in self.arena.segments:
            p, low = (s.p, None) if s.master is None else (s.master, s.p)  # low: bf16 / fp16 copy of the masters
            seg_lr = scaled[s.lr_scale]
            if self.arena.kind == "adam":
                self.kernel.adam_step(p, s.g, s.state["m"], s.state["v"], seg_lr, number, s.hp, mask=mask, low=low,
                                      corrections=corrections[s.hp.beta1, s.hp.beta2])  # fmt: skip
            else:
                self.kernel.sgd_step(p, s.g, s.state.get("buf"), seg_lr, number, s.hp, mask=mask, low=low)

    def _per_run(self, lr_table: torch.Tensor) -> tuple[dict, dict]:
        """What every step of a run reads and none changes, made at its first step: the LR table scaled per param
        group, and Adam's bias corrections [S, 2] per (beta1, beta2). A step then launches one kernel per segment
        (and the mask's cast), nothing else."""
        if self._tables is None or self._tables[0] is not lr_table:
            segments, steps, device = self.arena.segments, lr_table.shape[0], self.arena.device
            scaled = {s.lr_scale: lr_table if s.lr_scale == 1.0 else lr_table * s.lr_scale for s in segments}
            corrections = {}
            if self.arena.kind == "adam":
                corrections = {(s.hp.beta1, s.hp.beta2): self.kernel.bias_table(s.hp, steps, device) for s in segments}
            self._tables = (lr_table, scaled, corrections)
        return self._tables[1], self._tables[2]


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


def make(plan: optimizers.OptimizerPlan, arena: Arena) -> HostFused | TritonFused | TorchOptim:
    """The updater of this optimizer path and the arena's kernels."""
    if plan.kind == "generic":
        return TorchOptim(plan, arena)
    return TritonFused(arena) if arena.backend == "triton" else HostFused(arena)


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
