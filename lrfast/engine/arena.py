"""K candidate copies of the trained parameters, their grads and optimizer state, as flat [K, N] buffers (one
segment per param group and dtype), so one kernel call updates every parameter of every candidate."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lrfast.kernels import cpu as kernels
from lrfast.kernels.reference import AdamParams, SGDParams
from lrfast.optimizers import OptimizerPlan


@dataclass
class Segment:
    params: list[nn.Parameter]
    hp: SGDParams | AdamParams | None
    lr_scale: float
    p: torch.Tensor  # [K, N], the parameters' dtype: what the model computes with
    g: torch.Tensor  # [K, N]
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # fp32 for low-precision parameters
    master: torch.Tensor | None = None  # [K, N] fp32 master weights of bf16 / fp16 parameters (p is their rounding)

    def columns(self) -> list[tuple[int, int]]:
        """Each parameter's columns [first, end) of the segment's rows."""
        out, offset = [], 0
        for param in self.params:
            out.append((offset, offset + param.numel()))
            offset += param.numel()
        return out

    def views(self, flat: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Candidate k's per-parameter views into `flat` (self.p or self.g), shaped like the parameters."""
        row = flat[k]
        return [row[a:b].view(param.shape) for param, (a, b) in zip(self.params, self.columns())]

    def stacked(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views [K, *shape] of all candidates (for a batched forward)."""
        return [flat[:, a:b].view(flat.shape[0], *param.shape) for param, (a, b) in zip(self.params, self.columns())]


def backend_for(kind: str, device: torch.device) -> tuple[str, str | None]:
    """(the kernels a fused arena of `kind` on `device` runs, why the Triton kernels are off): Triton on CUDA where
    it is available, else lrfast._C on CPU where it is built, else the reference."""
    if device.type == "cuda" and kind != "generic":
        from lrfast.kernels import triton_optim  # imports triton: only for a CUDA arena

        return ("triton" if triton_optim.AVAILABLE else "reference"), triton_optim.WHY
    return ("cpp" if kernels.BACKEND == "cpp" else "reference"), None


# Rows are padded to a multiple of this many elements (zeros, never viewed by a parameter, which every kernel leaves
# at zero): Triton 3.6's sm_90 code for a row length that is a multiple of 16 uses 8 ld.global.v4 loads per block,
# otherwise 41 scalar ones, and rows k > 0 start misaligned (read from the compiled kernels; not yet timed on a GPU).
ROW_ALIGN = 16


def padded(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN


class Arena:
    """Flat buffers for K candidates, all starting from the model's current weights; each row is padded to a
    multiple of ROW_ALIGN elements (the parameters' views cover the first ones)."""

    def __init__(self, plan: OptimizerPlan, k: int, device: torch.device, backend: str | None = None):
        """`backend`: the kernels Arena.update runs ("cpp" | "reference" | "triton"; default backend_for's)."""
        self.k, self.device, self.kind = k, device, plan.kind
        self.backend = backend or backend_for(plan.kind, device)[0]
        self.segments: list[Segment] = []
        self._grad_rows: dict[tuple[int, int], list[torch.Tensor]] = {}  # zero_grad(rows)'s views
        layout = []
        for group in plan.groups:
            by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
            for p in group.params:
                by_dtype.setdefault(p.dtype, []).append(p)
            layout += [(group, dtype, params) for dtype, params in by_dtype.items()]
        # every segment's grads [K, n] are consecutive slices of one flat buffer per dtype, so a distributed run
        # all-reduces all the grads of a dtype in one call
        sizes: dict[torch.dtype, int] = {}
        for _, dtype, params in layout:
            sizes[dtype] = sizes.get(dtype, 0) + k * padded(sum(p.numel() for p in params))
        self.grad_buffers = {dtype: torch.zeros(n, dtype=dtype, device=device) for dtype, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        for group, dtype, params in layout:
            used = sum(p.numel() for p in params)
            n = padded(used)
            tail = torch.zeros(n - used, dtype=dtype, device=device)
            row = torch.cat([p.detach().reshape(-1).to(device) for p in params] + [tail])
            flat = row.unsqueeze(0).repeat(k, 1).contiguous()
            g = self.grad_buffers[dtype][offsets[dtype] : offsets[dtype] + k * n].view(k, n)
            offsets[dtype] += k * n
            seg = Segment(params, group.hp, group.lr_scale, flat, g)
            if plan.kind != "generic" and dtype in (torch.bfloat16, torch.float16):
                seg.master = flat.float()  # the update runs in fp32 on the masters, p gets their rounding
            upd = flat if seg.master is None else seg.master
            if plan.kind == "adam":
                seg.state = {"m": torch.zeros_like(upd), "v": torch.zeros_like(upd)}
            elif plan.kind == "sgd" and group.hp.momentum != 0:
                seg.state = {"buf": torch.zeros_like(upd)}
            self.segments.append(seg)

    @property
    def nbytes_per_candidate(self) -> int:
        per = 0
        for s in self.segments:
            per += (s.p[0].nbytes + s.g[0].nbytes) + sum(t[0].nbytes for t in s.state.values())
            per += 0 if s.master is None else s.master[0].nbytes
        return per

    def start_rows(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Candidate 0's weights (and fp32 masters) per segment: at the start every candidate's are these, so
        `reset(start_rows)` can put the arena back without a copy of all K rows."""
        return [(s.p[0].clone(), None if s.master is None else s.master[0].clone()) for s in self.segments]

    def reset(self, rows: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Every candidate back to `rows` (start_rows()), optimizer state zero, as the arena started."""
        for s, (p, master) in zip(self.segments, rows):
            s.p.copy_(p.expand_as(s.p))
            if master is not None:
                s.master.copy_(master.expand_as(s.master))
            for t in s.state.values():
                t.zero_()

    def zero_grad(self, rows: tuple[int, int] | None = None) -> None:
        """Every candidate's grads zero; `rows` (first, end): only those candidates' (their views made once)."""
        if rows is None:
            for buf in self.grad_buffers.values():
                buf.zero_()
            return
        views = self._grad_rows.get(rows)
        if views is None:
            views = self._grad_rows[rows] = [s.g[rows[0] : rows[1]] for s in self.segments]
        for v in views:
            v.zero_()
