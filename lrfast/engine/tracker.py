"""The run's bookkeeping on the device: raw and smoothed losses [K, S], the EMA, the best smoothed loss and its
step, the alive mask and the step each candidate stopped at. Every update is in place and the step may be a device
tensor, so a CUDA graph can capture `record` and replay it at every step. On CUDA with Triton, `record` is one
kernel launch (kernels/triton_optim.track) instead of ~30 small ones, bitwise the same values."""

from __future__ import annotations

import math

import numpy as np
import torch

from lrfast import peers


class Tracker:
    """Debiased EMA of the loss (fastai / Lightning): avg = b*avg + (1-b)*loss, smoothed = avg / (1 - b^n); with
    `like`, the peer's own smoothing (lrfast.peers.smoothing: per step avg = a*avg + c*loss, smoothed = avg / d).
    A candidate stops at the step where its smoothed loss exceeds threshold x its best smoothed loss, or is not
    finite; that step is recorded, later ones are NaN."""

    def __init__(self, k: int, steps: int, smooth: float, threshold: float | None, device: torch.device,
                 fused: bool | None = None, like: str | None = None):  # fmt: skip
        """`fused`: record with the Triton kernel (default: on CUDA when Triton is available)."""
        f64 = dict(dtype=torch.float64, device=device)
        self.losses = torch.full((k, steps), math.nan, **f64)
        self.smoothed = torch.full((k, steps), math.nan, **f64)
        self.avg = torch.zeros(k, **f64)
        self.best = torch.full((k,), math.inf, **f64)
        self.alive = torch.ones(k, dtype=torch.bool, device=device)
        self.steps_run = torch.full((k,), steps, dtype=torch.int64, device=device)
        self.best_step = torch.zeros(k, dtype=torch.int64, device=device)
        self.val = torch.full((k, steps), math.nan, **f64)
        self.threshold = threshold
        # the EMA's factors and debias of every step, computed on the host: an int step reads them as Python floats,
        # a device step from the tables [S, 3] (a, c, d), and both compute with the same numbers
        self.host = list(zip(*peers.smoothing(like, smooth, steps)))
        self.table = torch.tensor(self.host, dtype=torch.float64).reshape(steps, 3).to(device)
        self._nan = torch.tensor(math.nan, **f64)
        self._views: list | None = None  # numpy views of the CPU tensors (record's host path)
        self.kernels = _kernels(device) if fused is None else _kernels(device, required=True) if fused else None

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Everything `record` writes (to save and restore around a CUDA graph's warm-up)."""
        return [self.losses, self.smoothed, self.avg, self.best, self.alive, self.steps_run, self.best_step, self.val]

    def record(self, t, loss: torch.Tensor) -> None:
        """Step t's (0-based; an int, or a one-element int64 tensor on the device) losses [K]."""
        if self.kernels is not None:
            self.kernels.track(self, t, loss)
            return
        if not isinstance(t, torch.Tensor) and self.losses.device.type == "cpu":
            self._record_host(t, loss.detach().numpy().astype(np.float64))
            return
        alive = self.alive
        loss = loss.to(torch.float64)
        if isinstance(t, torch.Tensor):
            a, c, d = self.table.index_select(0, t.reshape(1)).unbind(1)
        else:
            a, c, d = self.host[t]
        self.avg.copy_(torch.where(alive, self.avg * a + c * loss, self.avg))
        smoothed = self.avg / d
        _put(self.losses, t, torch.where(alive, loss, self._nan))
        _put(self.smoothed, t, torch.where(alive, smoothed, self._nan))
        self.best_step.copy_(torch.where(alive & (smoothed < self.best), t, self.best_step))
        self.best.copy_(torch.where(alive, torch.fmin(self.best, smoothed), self.best))
        bad = ~torch.isfinite(smoothed)
        if self.threshold is not None:
            bad |= smoothed > self.threshold * self.best
        diverged = alive & bad
        self.steps_run.copy_(torch.where(diverged, t + 1, self.steps_run))
        self.alive &= ~diverged


    def _record_host(self, t: int, loss: np.ndarray) -> None:
        """record() on CPU with an int step: the same operations in numpy on views of the same tensors (IEEE float64
        like torch's CPU kernels, so the values are bitwise those of the torch ops), at a tenth of their dispatch
        cost (~20 us instead of ~170 us a step on the 2-core machine); up to SCALAR_ROWS candidates row by row on
        Python floats."""
        if self._views is None:
            self._views = [x.numpy() for x in (self.losses, self.smoothed, self.avg, self.best, self.alive,
                                               self.steps_run, self.best_step)]  # fmt: skip
        losses, smoothed_buf, avg, best, alive, steps_run, best_step = self._views
        a, c, d = self.host[t]
        if loss.size <= SCALAR_ROWS:  # Python floats (IEEE float64 too), a few microseconds a row
            for j, x in enumerate(loss.tolist()):
                if not alive[j]:
                    losses[j, t] = smoothed_buf[j, t] = math.nan
                    continue
                avg[j] = mean = float(avg[j]) * a + c * x
                s, b = mean / d, float(best[j])
                losses[j, t], smoothed_buf[j, t] = x, s
                if s < b:
                    best_step[j] = t
                best[j] = b = b if math.isnan(s) else s if math.isnan(b) else min(b, s)
                if not math.isfinite(s) or (self.threshold is not None and s > self.threshold * b):
                    steps_run[j], alive[j] = t + 1, False
            return
        with np.errstate(all="ignore"):
            avg[...] = np.where(alive, avg * a + c * loss, avg)
            smoothed = avg / d
            losses[:, t] = np.where(alive, loss, np.nan)
            smoothed_buf[:, t] = np.where(alive, smoothed, np.nan)
            best_step[...] = np.where(alive & (smoothed < best), t, best_step)
            best[...] = np.where(alive, np.fmin(best, smoothed), best)
            bad = ~np.isfinite(smoothed)
            if self.threshold is not None:
                bad |= smoothed > self.threshold * best
        diverged = alive & bad
        steps_run[...] = np.where(diverged, t + 1, steps_run)
        alive &= ~diverged


# Up to this many candidates record() on the host runs row by row on Python floats, above it on numpy arrays
# (measured a call on the 2-core AMD EPYC: K = 1 5.5 us, 2 6.3, 8 12.1; numpy 29 whatever K)
SCALAR_ROWS = 8


def _put(buf: torch.Tensor, t, column: torch.Tensor) -> None:
    """buf[:, t] = column; with a device t without reading it on the host (index_copy_, not indexing)."""
    if isinstance(t, torch.Tensor):
        buf.index_copy_(1, t.reshape(1), column.reshape(-1, 1))
    else:
        buf[:, t] = column


def _kernels(device: torch.device, required: bool = False):
    """kernels/triton_optim when its kernels run on this device, else None (or raise, when `required`)."""
    if device.type != "cuda" and not required:
        return None
    from lrfast.kernels import triton_optim  # imports triton (optional): only here

    if triton_optim.AVAILABLE and (device.type == "cuda" or triton_optim.INTERPRETED):
        return triton_optim
    if required:
        raise RuntimeError(f"the fused tracker needs the Triton kernels on {device}: {triton_optim.WHY or 'no CUDA'}")
    return None
