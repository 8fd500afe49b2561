"""Mixed precision: autocast (bf16 / fp16) around each candidate's forward, fp32 master weights and optimizer
state in the arena, and for fp16 one dynamic loss scale per candidate, so one candidate's overflow skips only its
own step (its LR is masked to 0 for that step, as a diverged candidate's is) and halves only its own scale."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Scaler:
    """Per-candidate dynamic loss scale, as torch.amp.GradScaler does for one model: start at 2**16, halve on an
    inf/NaN gradient (skipping that step), double after `growth_interval` clean steps. Scales are powers of two,
    so scaling and unscaling are exact."""

    def __init__(self, k: int, device: torch.device, init: float = 2.0**16, growth_interval: int = 2000):
        self.scale = torch.full((k,), init, dtype=torch.float32, device=device)
        self.clean = torch.zeros(k, dtype=torch.int64, device=device)
        self.skipped = torch.zeros(k, dtype=torch.int64, device=device)
        self.growth_interval = growth_interval

    def unscale_(self, segments) -> torch.Tensor:
        """Divide every candidate's grads by its scale; returns ok [K]: True where all its grads are finite."""
        ok = torch.ones_like(self.clean, dtype=torch.bool)
        for seg in segments:
            seg.g.div_(self.scale.to(seg.g.dtype)[:, None])
            ok &= torch.isfinite(seg.g).all(dim=1)
        return ok

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Everything `update` writes (in place, so a CUDA graph can capture it)."""
        return [self.scale, self.clean, self.skipped]

    def update(self, ok: torch.Tensor) -> None:
        self.clean.copy_(torch.where(ok, self.clean + 1, 0))
        grow = self.clean >= self.growth_interval
        self.scale.copy_(torch.where(ok, torch.where(grow, self.scale * 2, self.scale), self.scale / 2))
        self.clean.copy_(torch.where(grow, 0, self.clean))
        self.skipped += (~ok).long()
