"""The optimizer-step spec in plain torch: K candidates, row k of every [K, N] tensor is candidate k's flat parameters.

Each row runs exactly the tensor ops of torch.optim's single-tensor (foreach=False) SGD / Adam / AdamW step
(torch/optim/sgd.py `_single_tensor_sgd`, torch/optim/adam.py `_single_tensor_adam`, torch 2.13), with that row's
learning rate as a Python float, so a row equals torch.optim on that row alone bitwise. The fused kernels
(lrfast/kernels/cpu.py, csrc/fused_optim.cpp) must equal this within fp32 rounding.

Contract shared by every backend:
- p, g, buf, m, v: 2-D floating tensors [K, N] of one shape, dtype and device whose rows are contiguous (any row
  stride: one parameter's columns of a wider [K, N] buffer), not overlapping;
  p, buf, m, v are updated in place; g is read only (left unchanged).
- lr: float64 CPU tensor [K]; lr[k] is candidate k's learning rate for this step. lr[k] == 0 exactly FREEZES
  candidate k: its p, buf, m, v are left bitwise unchanged (the row is skipped; note torch.optim at lr 0 would
  still move Adam's m and v and SGD's buf).
- step: the 1-based number of this step, shared by all candidates. Adam's bias corrections use it; SGD's momentum
  uses torch.optim's first-step rule (step == 1: buf = the decayed grad, no dampening).
- buf is None when momentum == 0 (and ignored then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SGDParams", "AdamParams", "sgd_step", "adam_step"]


@dataclass(frozen=True)
class SGDParams:
    """torch.optim.SGD's hyper-parameters (lr aside), checked as torch.optim.SGD checks them."""

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self):
        if not self.momentum >= 0.0:
            raise ValueError(f"SGDParams: momentum must be >= 0, got {self.momentum}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"SGDParams: weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"SGDParams: nesterov needs momentum > 0 and dampening == 0, got momentum={self.momentum}, "
                f"dampening={self.dampening}"
            )


@dataclass(frozen=True)
class AdamParams:
    """torch.optim.Adam / AdamW's hyper-parameters (lr aside), checked as torch.optim.Adam checks them."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False  # True: AdamW (p *= 1 - lr*wd); False: Adam (g += wd*p)

    def __post_init__(self):
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not 0.0 <= b < 1.0:
                raise ValueError(f"AdamParams: {name} must be in [0, 1), got {b}")
        if not self.eps >= 0.0:
            raise ValueError(f"AdamParams: eps must be >= 0, got {self.eps}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"AdamParams: weight_decay must be >= 0, got {self.weight_decay}")


def check_args(p, g, state: dict, lr, step, hp, hp_type) -> None:
    """Raise TypeError / ValueError naming the first bad argument. `state` maps name -> tensor (buf, m, v)."""
    if not isinstance(hp, hp_type):
        raise TypeError(f"hp must be of type {hp_type.__name__}, got {type(hp).__name__}")
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"p must be a torch.Tensor, got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(f"p must be a floating tensor, got dtype {p.dtype}")
    if p.dim() != 2:
        raise ValueError(f"p must be 2-D [K, N] (row k = candidate k's flat parameters), got shape {tuple(p.shape)}")
    for name, t in (("p", p), ("g", g), *state.items()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != p.dtype:
            raise TypeError(f"{name} must have p's dtype {p.dtype}, got {t.dtype}")
    check_like(p, [("p", p), ("g", g), *state.items()], rows=True)
    if not isinstance(lr, torch.Tensor):
        raise TypeError(f"lr must be a float64 CPU tensor [K], got {type(lr).__name__}")
    if lr.dtype != torch.float64:
        raise TypeError(f"lr must be float64, got {lr.dtype}; pass lr.double()")
    if lr.device.type != "cpu":
        raise ValueError(f"lr must be on the CPU, got {lr.device}")
    if lr.shape != p.shape[:1]:
        raise ValueError(f"lr must have shape [K] = {tuple(p.shape[:1])}, got {tuple(lr.shape)}")
    if not lr.is_contiguous():
        raise ValueError("lr must be contiguous; pass lr.contiguous()")
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int (1-based), got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the 1-based number of this step), got {step}")


def check_like(p: torch.Tensor, named: list[tuple[str, torch.Tensor]], rows: bool = False) -> None:
    """Each (name, tensor) has p's shape and device and is contiguous (`rows`: its rows are, not overlapping), or a
    ValueError names it."""
    for name, t in named:
        if t.shape != p.shape:
            raise ValueError(f"{name} must have p's shape {tuple(p.shape)}, got {tuple(t.shape)}")
        if t.device != p.device:
            raise ValueError(f"{name} must be on p's device {p.device}, got {t.device}")
        if rows and not rows_contiguous(t):
            raise ValueError(f"{name} must have contiguous rows that do not overlap (stride 1 along N, a row stride "
                             f"of at least N; got strides {t.stride()}); pass {name}.contiguous() (and copy results "
                             "back)")  # fmt: skip
        if not rows and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; pass {name}.contiguous() (and copy results back)")


def rows_contiguous(t: torch.Tensor) -> bool:
    """A 2-D tensor's rows are each contiguous and do not overlap (the backends' contract; kernels/cpu.py's C++
    path reads the row stride)."""
    k, n = t.shape
    return (t.stride(1) == 1 or n <= 1) and (t.stride(0) >= n or k <= 1)


def _sgd_state(buf, hp: SGDParams) -> dict:
    if hp.momentum == 0:
        return {}
    if buf is None:
        raise ValueError(f"buf must be a [K, N] momentum buffer when momentum != 0 (momentum={hp.momentum}), got None")
    return {"buf": buf}


@torch.no_grad()
def sgd_step(p, g, buf, lr, step, hp: SGDParams) -> None:
    """One SGD step for every candidate with lr[k] != 0; equals torch.optim.SGD(foreach=False) on each row."""
    check_args(p, g, _sgd_state(buf, hp), lr, step, hp, SGDParams)
    momentum, dampening, wd = hp.momentum, hp.dampening, hp.weight_decay
    for k, lr_k in enumerate(lr.tolist()):
        if lr_k == 0.0:
            continue  # frozen candidate
        param, grad = p[k], g[k]
        if wd != 0:
            grad = grad.add(param, alpha=wd)
        if momentum != 0:
            b = buf[k]
            if step == 1:
                b.copy_(grad)
            else:
                b.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(b, alpha=momentum) if hp.nesterov else b
        param.add_(grad, alpha=-lr_k)


@torch.no_grad()
def adam_step(p, g, m, v, lr, step, hp: AdamParams) -> None:
    """One Adam (decoupled=False) / AdamW step for every candidate with lr[k] != 0; equals torch.optim.Adam / AdamW
    (foreach=False) on each row."""
    check_args(p, g, {"m": m, "v": v}, lr, step, hp, AdamParams)
    beta1, beta2, eps, wd = hp.beta1, hp.beta2, hp.eps, hp.weight_decay
    step_f = float(step)  # torch.optim reads its float32 step tensor with .item()
    bias_correction1 = 1 - beta1**step_f
    bias_correction2 = 1 - beta2**step_f
    bias_correction2_sqrt = bias_correction2**0.5
    for k, lr_k in enumerate(lr.tolist()):
        if lr_k == 0.0:
            continue  # frozen candidate
        param, grad, exp_avg, exp_avg_sq = p[k], g[k], m[k], v[k]
        if wd != 0:
            if hp.decoupled:
                param.mul_(1 - lr_k * wd)
            else:
                grad = grad.add(param, alpha=wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr_k / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
