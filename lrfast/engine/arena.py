"""K candidate copies of the trained parameters, their grads and optimizer state, as flat [K, N] buffers (one
segment per param group and dtype), so one kernel call updates every parameter of every candidate."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lrfast.kernels import cpu as kernels
from lrfast.kernels.reference import AdamParams, SGDParams
from lrfast.optimizers import Plan


@dataclass
class Segment:
    params: list[nn.Parameter]
    hp: SGDParams | AdamParams | None
    lr_scale: float
    p: torch.Tensor  # [K, N]
    g: torch.Tensor  # [K, N]
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def views(self, flat: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Candidate k's per-parameter views into `flat` (self.p or self.g), shaped like the parameters."""
        row, out, offset = flat[k], [], 0
        for param in self.params:
            n = param.numel()
            out.append(row[offset : offset + n].view(param.shape))
            offset += n
        return out

    def stacked(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views [K, *shape] of all candidates (for a batched forward)."""
        out, offset = [], 0
        for param in self.params:
            n = param.numel()
            out.append(flat[:, offset : offset + n].view(flat.shape[0], *param.shape))
            offset += n
        return out


class Arena:
    """Flat buffers for K candidates, all starting from the model's current weights."""

    def __init__(self, plan: Plan, k: int, device: torch.device):
        self.k, self.device, self.kind = k, device, plan.kind
        self.segments: list[Segment] = []
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
            sizes[dtype] = sizes.get(dtype, 0) + k * sum(p.numel() for p in params)
        self.grad_buffers = {dtype: torch.zeros(n, dtype=dtype, device=device) for dtype, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        for group, dtype, params in layout:
            n = sum(p.numel() for p in params)
            row = torch.cat([p.detach().reshape(-1).to(device) for p in params])
            flat = row.unsqueeze(0).repeat(k, 1).contiguous()
            g = self.grad_buffers[dtype][offsets[dtype] : offsets[dtype] + k * n].view(k, n)
            offsets[dtype] += k * n
            seg = Segment(params, group.hp, group.lr_scale, flat, g)
            if plan.kind == "adam":
                seg.state = {"m": torch.zeros_like(flat), "v": torch.zeros_like(flat)}
            elif plan.kind == "sgd" and group.hp.momentum != 0:
                seg.state = {"buf": torch.zeros_like(flat)}
            self.segments.append(seg)

    @property
    def numel(self) -> int:
        return sum(s.p.shape[1] for s in self.segments)

    @property
    def nbytes_per_candidate(self) -> int:
        per = 0
        for s in self.segments:
            per += (s.p[0].nbytes + s.g[0].nbytes) + sum(t[0].nbytes for t in s.state.values())
        return per

    def zero_grad(self) -> None:
        for buf in self.grad_buffers.values():
            buf.zero_()

    def update(self, lr: torch.Tensor, step: int) -> None:
        """One fused optimizer step for every candidate: lr [K] float64 (0 freezes a candidate); step is 1-based."""
        for s in self.segments:
            seg_lr = lr if s.lr_scale == 1.0 else lr * s.lr_scale
            if self.kind == "adam":
                kernels.adam_step(s.p, s.g, s.state["m"], s.state["v"], seg_lr, step, s.hp)
            else:
                kernels.sgd_step(s.p, s.g, s.state.get("buf"), seg_lr, step, s.hp)
