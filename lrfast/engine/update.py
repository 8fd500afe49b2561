"""One updater per optimizer path, all called alike after a step's backward: update(lr_table, number, mask, grads),
with lr_table [S, K] (float64, on the run's device), number the 1-based step (an int, or the device step counter),
mask [K] bool (False: the candidate stopped, or skips this step on an fp16 overflow) and grads the forward's
`grads` (None: the arena's grads hold this step's; only HostFused is handed any).

- HostFused: SGD / Adam / AdamW on lrfast._C or the reference (kernels/cpu.py), one call per segment for all K
  candidates; this step's LRs are read on the host. Or, where the batched call handed it autograd's own grads of
  the large parameters (`direct`, DIRECT_FROM, BatchedStep.grads): one call per parameter over its columns of the
  arena reading them where autograd left them (no copy into the arena: the digits MLP's K = 16 step 0.3-0.5 ms of
  ~9 faster), the others' runs of columns from the arena, the last parameter first.
- TritonFused: the same on the Triton kernels, which read the LR table and the step at the device counter, so the
  update is captured in the CUDA graph with the rest of the step.
- TorchOptim: any other optimizer through torch.optim itself: the plan's private instance (K = 1) or one instance
  per candidate over leaf views of that candidate's row of the arena (K > 1), stepped on the host."""

from __future__ import annotations

import torch

from lrfast import optimizers
from lrfast.engine.arena import Arena
from lrfast.kernels import cpu as kernels

# HostFused reads a parameter's grads where autograd left them from this many elements (all K rows) on: below, a
# kernel call (~3 us) costs more than the copy into the arena it saves (~10 GB/s here: 3 us ~ 8k floats); and only
# where its own call runs on as many threads as its segment's would (kernels.threads_for): a machine of many cores
# whose one core reaches a fraction of its memory bandwidth would otherwise update a parameter of 1M elements on
# one core where the whole arena's call used several
DIRECT_FROM = 1 << 15


class HostFused:
    capturable = False

    def __init__(self, arena: Arena):
        self.arena, self.path = arena, f"fused {arena.backend}"
        direct = []
        for s in arena.segments:
            threads = kernels.threads_for(arena.k * sum(p.numel() for p in s.params))
            direct += [arena.k * p.numel() >= DIRECT_FROM and kernels.threads_for(arena.k * p.numel()) >= threads
                       for p in s.params]  # fmt: skip
        # per parameter (the segments' in order): whether a batched call may hand its grads over as autograd made
        # them (`grads`); None: none may (none that large, or fp16 / bf16 masters)
        self.direct = direct if any(direct) and all(s.master is None for s in arena.segments) else None
        self._pieces = self._columns() if self.direct else []  # _handed()'s
        self._column_views: dict = {}  # _views()

    def __call__(self, lr_table: torch.Tensor, number, mask: torch.Tensor | None, grads: list | None = None) -> None:
        """`grads`: per parameter, autograd's grads [rows, *shape] of those `direct` marks (rows: the first live
        ones) or None (the arena's columns hold its grads)."""
        step = int(number)  # a host read of a device counter: only without Triton (CPU, or CUDA without it)
        lr = lr_table[step - 1]
        if mask is not None:
            lr = lr * mask
        lr = lr.to("cpu", torch.float64)
        seg_lr = {id(s): lr if s.lr_scale == 1.0 else lr * s.lr_scale for s in self.arena.segments}
        if grads is not None:
            self._handed(seg_lr, step, grads)
            return
        for s in self.arena.segments:
            p, g = (s.p, s.g) if s.master is None else (s.master, s.g.float())
            self._kernel(s, p, g, s.state, seg_lr[id(s)], step)
            if s.master is not None:
                s.p.copy_(s.master)  # the model computes with the rounding of the fp32 masters

    def _kernel(self, s, p, g, state: dict, lr: torch.Tensor, step: int) -> None:
        if self.arena.kind == "adam":
            kernels.adam_step(p, g, state["m"], state["v"], lr, step, s.hp)
        else:
            kernels.sgd_step(p, g, state.get("buf"), lr, step, s.hp)

    def _handed(self, seg_lr: dict, step: int, grads: list) -> None:
        """The update over each handed parameter's columns with its grads as autograd left them, and over each run
        of the others' columns with the arena's; the last first, so the first layers' weights, updated last, are
        still in cache for the next forward (the digits MLP: 0.15 ms of the 0.5 this path saves). `seg_lr`: each
        segment's LRs (by id), scaled once a call."""
        for s, a, b, i in reversed(self._pieces):
            g = None if i is None else grads[i]
            g = s.g[:, a:b] if g is None else g.reshape(g.shape[0], -1)
            rows = g.shape[0]
            p, state = self._views(s, a, b, rows)
            self._kernel(s, p, g, state, seg_lr[id(s)][:rows], step)

    def _views(self, s, a: int, b: int, rows: int) -> tuple[torch.Tensor, dict]:
        """Columns [a, b) of the first `rows` rows of s.p and its state, made once per (columns, rows)."""
        key = (id(s), a, rows)
        if key not in self._column_views:
            self._column_views[key] = (s.p[:rows, a:b], {name: t[:rows, a:b] for name, t in s.state.items()})
        return self._column_views[key]

    def _columns(self) -> list:
        """[(segment, first column, end, the handed parameter's index or None for a run of the others)]."""
        pieces, i = [], 0
        for s in self.arena.segments:
            run = None  # the run of the others' columns going on in this segment
            for a, b in s.columns():
                if self.direct[i]:
                    pieces.append((s, a, b, i))
                    run = None
                elif run is not None:
                    run = pieces[-1] = (s, run[1], b, None)
                else:
                    run = (s, a, b, None)
                    pieces.append(run)
                i += 1
        return pieces


class TritonFused:
    capturable = True
    path = "fused triton"

    def __init__(self, arena: Arena):
        from lrfast.kernels import triton_optim  # imports triton: only for a CUDA arena

        self.arena, self.kernel = arena, triton_optim
        self._tables: tuple | None = None  # (lr_table, its scaled copies, Adam's bias-correction tables)

    def __call__(self, lr_table: torch.Tensor, number, mask: torch.Tensor | None, grads: None = None) -> None:
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

    def __call__(self, lr_table: torch.Tensor, number, mask: torch.Tensor | None, grads: None = None) -> None:
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
