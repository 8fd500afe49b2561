"""Fused K-candidate SGD / Adam / AdamW steps as Triton kernels: one launch updates every parameter of every
candidate (grid: blocks of a row x candidates). Each candidate reads its LR from a device tensor, either the
current LRs [K] or the whole LR table [S, K] at the step counter, and the step counter may itself be a device
tensor, so nothing on the host changes between steps and a launch can be captured in a CUDA graph and replayed.

Contract (as lrfast/kernels/reference.py, except where said):
    p, m, v, buf: fp32 [K, N] contiguous on one device; g: [K, N] fp32, bf16 or fp16 (read only)
    lr: float tensor [K] on p's device, or [S, K]: the row of this step (step - 1) is used
    step: 1-based, a Python int or a 0-dim / [1] int64 tensor on p's device (read, never written)
    mask: optional float / bool [K]: candidate k's LR is multiplied by mask[k] (0 freezes it, e.g. diverged)
    low: optional bf16 / fp16 [K, N]: written with the updated p rounded to its dtype (bf16 weights with fp32
         master weights and moments: p is the master, low is what the model computes with)
An effective LR of exactly 0 leaves that candidate's p, m, v, buf (and low) unchanged. Bias corrections are
computed in fp64 from the step (by torch on the device for a device step). The element maths is fp32 and follows
torch.optim's single-tensor ops and ATen's CPU kernels rounding by rounding: the multiply-adds ATen fuses (add with
alpha, lerp's two branches, addcmul) are explicit tl.fma, division and sqrt are IEEE-rounded, nothing else is fused
(tl.fma is exact whether or not the compiler contracts). The result equals lrfast._C's AVX2 build bitwise and
torch.optim (foreach=False) within 1 ulp of the operands (torch's sqrt calls MKL on long rows).

Triton is imported here only; `import lrfast` never needs it. With TRITON_INTERPRET=1 set before this module is
imported, the kernels run on CPU tensors (slow: for tests)."""

from __future__ import annotations

import os

import torch

from lrfast.kernels.reference import AdamParams, SGDParams, check_like

__all__ = ["AVAILABLE", "WHY", "INTERPRETED", "sgd_step", "adam_step", "bias_corrections", "bias_table", "track",
           "SGDParams", "AdamParams"]

try:
    import triton
    import triton.language as tl
except ImportError as e:  # triton is optional at run time
    triton = tl = None
    _IMPORT_ERROR: str | None = f"triton is not installed ({e}); pip install triton"
else:
    _IMPORT_ERROR = None

INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_not() -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not INTERPRETED and not torch.cuda.is_available():
        return "no CUDA device (the Triton kernels run on GPUs; TRITON_INTERPRET=1 runs them on CPU for tests)"
    return None


WHY: str | None = _why_not()
AVAILABLE: bool = WHY is None

BLOCK = 1024
_LOW = (torch.bfloat16, torch.float16)

if triton is not None:

    @triton.jit
    def _step_and_lr(lr_ptr, mask_ptr, step_ptr, step_val, k, K, STEP_ON_DEVICE: tl.constexpr,
                     LR_TABLE: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
        """This step's number (int64) and candidate k's effective LR (fp64)."""
        if STEP_ON_DEVICE:
            step = tl.load(step_ptr).to(tl.int64)
        else:
            step = tl.full((), step_val, tl.int64)
        if LR_TABLE:
            lr = tl.load(lr_ptr + (step - 1) * K + k).to(tl.float64)
        else:
            lr = tl.load(lr_ptr + k).to(tl.float64)
        if HAS_MASK:
            lr = lr * tl.load(mask_ptr + k).to(tl.float64)
        return step, lr

    @triton.jit
    def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, low_ptr, lr_ptr, mask_ptr, step_ptr, hp_ptr, bc_ptr, step_val, N, K,
                     DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr, STEP_ON_DEVICE: tl.constexpr,
                     LR_TABLE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LOW: tl.constexpr,
                     BC_TABLE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        k = tl.program_id(1)
        step, lr = _step_and_lr(lr_ptr, mask_ptr, step_ptr, step_val, k, K, STEP_ON_DEVICE, LR_TABLE, HAS_MASK)
        # hp (fp64): beta1, beta2, eps, weight_decay; bc (fp64): 1 - beta1**step, sqrt(1 - beta2**step), or a table
        # of them [S, 2] read at the step's row
        beta1, beta2 = tl.load(hp_ptr), tl.load(hp_ptr + 1)
        eps, wd = tl.load(hp_ptr + 2), tl.load(hp_ptr + 3)
        if BC_TABLE:
            bc_ptr += (step - 1) * 2
        bc1, bc2_sqrt = tl.load(bc_ptr), tl.load(bc_ptr + 1)
        step_size = (lr / bc1).to(tl.float32)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < tl.where(lr != 0.0, N, 0)  # lr 0: the candidate is frozen, nothing is read or written
        row = k.to(tl.int64) * N
        p = tl.load(p_ptr + row + offs, mask=live)
        g = tl.load(g_ptr + row + offs, mask=live).to(tl.float32)
        m = tl.load(m_ptr + row + offs, mask=live)
        v = tl.load(v_ptr + row + offs, mask=live, other=0.0)  # other: no sqrt of garbage in masked lanes
        if HAS_WD:
            if DECOUPLED:
                p = p * (1.0 - lr * wd).to(tl.float32)  # param.mul_(1 - lr * wd)
            else:
                g = tl.fma(p, wd.to(tl.float32), g)  # grad.add(param, alpha=wd)
        # exp_avg.lerp_(grad, w = 1 - beta1) as ATen's lerp_vec: fma(w, g - m, m) for |w| < 0.5, else
        # fma(w - 1, g - m, g), so that w = 1 (beta1 = 0) gives m = g exactly, as torch does
        w = (1.0 - beta1).to(tl.float32)
        if w < 0.5:
            m = tl.fma(w, g - m, m)
        else:
            m = tl.fma(w - 1.0, g - m, g)
        # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): ATen's addcmul is fma(value * g, g, self)
        v = tl.fma((1.0 - beta2).to(tl.float32) * g, g, v * beta2.to(tl.float32))
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt.to(tl.float32)) + eps.to(tl.float32)
        p = p - tl.div_rn(step_size * m, denom)
        tl.store(p_ptr + row + offs, p, mask=live)
        tl.store(m_ptr + row + offs, m, mask=live)
        tl.store(v_ptr + row + offs, v, mask=live)
        if HAS_LOW:
            tl.store(low_ptr + row + offs, p.to(low_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _sgd_kernel(p_ptr, g_ptr, buf_ptr, low_ptr, lr_ptr, mask_ptr, step_ptr, hp_ptr, step_val, N, K,
                    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_WD: tl.constexpr, STEP_ON_DEVICE: tl.constexpr,
                    LR_TABLE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LOW: tl.constexpr,
                    BLOCK: tl.constexpr):  # fmt: skip
        k = tl.program_id(1)
        step, lr = _step_and_lr(lr_ptr, mask_ptr, step_ptr, step_val, k, K, STEP_ON_DEVICE, LR_TABLE, HAS_MASK)
        # hp (fp64): momentum, dampening, weight_decay
        momentum = tl.load(hp_ptr).to(tl.float32)
        one_minus_dampening = (1.0 - tl.load(hp_ptr + 1)).to(tl.float32)
        wd = tl.load(hp_ptr + 2).to(tl.float32)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < tl.where(lr != 0.0, N, 0)
        row = k.to(tl.int64) * N
        p = tl.load(p_ptr + row + offs, mask=live)
        g = tl.load(g_ptr + row + offs, mask=live).to(tl.float32)
        if HAS_WD:
            g = tl.fma(p, wd, g)  # grad.add(param, alpha=wd)
        if MOMENTUM:
            buf = tl.load(buf_ptr + row + offs, mask=live)
            # buf.mul_(momentum).add_(grad, alpha=1 - dampening); torch's first-step rule: buf = grad
            buf = tl.where(step == 1, g, tl.fma(g, one_minus_dampening, buf * momentum))
            tl.store(buf_ptr + row + offs, buf, mask=live)
            if NESTEROV:
                g = tl.fma(buf, momentum, g)  # grad.add(buf, alpha=momentum)
            else:
                g = buf
        p = tl.fma(g, (-lr).to(tl.float32), p)  # param.add_(grad, alpha=-lr)
        tl.store(p_ptr + row + offs, p, mask=live)
        if HAS_LOW:
            tl.store(low_ptr + row + offs, p.to(low_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _track_kernel(loss_ptr, t_ptr, t_val, avg_ptr, best_ptr, alive_ptr, steps_run_ptr, best_step_ptr,
                      losses_ptr, smoothed_ptr, table_ptr, hp_ptr, K, S, T_ON_DEVICE: tl.constexpr,
                      HAS_THRESHOLD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """engine/tracker.Tracker.record for all K candidates in one program, op for op in fp64 (launched without
        FMA contraction, so each multiply and add rounds as torch's separate kernels do)."""
        k = tl.arange(0, BLOCK)
        live = k < K
        if T_ON_DEVICE:
            t = tl.load(t_ptr).to(tl.int64)
        else:
            t = tl.full((), t_val, tl.int64)
        # table (fp64) [S, 3]: step t's avg = a*avg + c*loss, smoothed = avg / d
        a, c, d = tl.load(table_ptr + 3 * t), tl.load(table_ptr + 3 * t + 1), tl.load(table_ptr + 3 * t + 2)
        loss = tl.load(loss_ptr + k, mask=live, other=0.0).to(tl.float64)
        alive = tl.load(alive_ptr + k, mask=live, other=0) != 0
        avg = tl.load(avg_ptr + k, mask=live, other=0.0)
        avg = tl.where(alive, avg * a + c * loss, avg)
        tl.store(avg_ptr + k, avg, mask=live)
        smoothed = avg / d
        at = k.to(tl.int64) * S + t
        tl.store(losses_ptr + at, tl.where(alive, loss, float("nan")), mask=live)
        tl.store(smoothed_ptr + at, tl.where(alive, smoothed, float("nan")), mask=live)
        best = tl.load(best_ptr + k, mask=live, other=0.0)
        best_step = tl.load(best_step_ptr + k, mask=live, other=0)
        tl.store(best_step_ptr + k, tl.where(alive & (smoothed < best), t, best_step), mask=live)
        smaller = tl.where(smoothed < best, smoothed, best)  # torch.fmin: a NaN loses to a number
        best = tl.where(alive, tl.where(best != best, smoothed, tl.where(smoothed != smoothed, best, smaller)), best)
        tl.store(best_ptr + k, best, mask=live)
        bad = (smoothed != smoothed) | (tl.abs(smoothed) == float("inf"))
        if HAS_THRESHOLD:
            bad = bad | (smoothed > tl.load(hp_ptr) * best)  # hp (fp64): the threshold
        diverged = alive & bad
        steps_run = tl.load(steps_run_ptr + k, mask=live, other=0)
        tl.store(steps_run_ptr + k, tl.where(diverged, t + 1, steps_run), mask=live)
        tl.store(alive_ptr + k, alive & (diverged == 0), mask=live)


_hp_cache: dict[tuple, torch.Tensor] = {}


def _hp_tensor(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The hyper-parameters as an fp64 device tensor, made once per (values, device) so a replayed graph's
    pointer stays valid."""
    key = (values, device)
    t = _hp_cache.get(key)
    if t is None:
        t = _hp_cache[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return t


def _check(p, g, state: dict, lr, step, mask, low) -> None:
    """Raise TypeError / ValueError naming the first bad argument."""
    if not AVAILABLE:
        raise RuntimeError(f"the Triton kernels are not available: {WHY}")
    for name, t in (("p", p), ("g", g), *state.items(), ("lr", lr)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if p.dtype != torch.float32 or p.dim() != 2:
        raise TypeError(f"p must be an fp32 [K, N] tensor (the master weights), got {p.dtype} {tuple(p.shape)}")
    if g.dtype not in (torch.float32, *_LOW):
        raise TypeError(f"g must be fp32, bf16 or fp16, got {g.dtype}")
    for name, t in state.items():
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be fp32 like p, got {t.dtype}")
    if p.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"p is on {p.device}: the compiled Triton kernels take CUDA tensors only (TRITON_INTERPRET=1 "
                         "before lrfast.kernels.triton_optim is imported runs them on CPU tensors, for tests)")
    check_like(p, [("p", p), ("g", g), *state.items()] + ([("low", low)] if low is not None else []))
    if low is not None and low.dtype not in _LOW:
        raise TypeError(f"low must be bf16 or fp16 (the model's low-precision weights), got {low.dtype}")
    k = p.shape[0]
    if not lr.is_floating_point() or lr.device != p.device or not lr.is_contiguous():
        raise ValueError(f"lr must be a contiguous float tensor on {p.device}, got {lr.dtype} on {lr.device}")
    if lr.dim() not in (1, 2) or lr.shape[-1] != k:
        raise ValueError(f"lr must be [K] = [{k}] or an LR table [S, {k}], got {tuple(lr.shape)}")
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.numel() != 1 or step.device != p.device:
            raise ValueError(f"step must be a Python int or a one-element int64 tensor on {p.device}, got "
                             f"{step.dtype} {tuple(step.shape)} on {step.device}")  # fmt: skip
    elif isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (1-based) or a device tensor, got {step!r}")
    elif lr.dim() == 2 and step > lr.shape[0]:
        raise ValueError(f"step={step} is past the LR table's {lr.shape[0]} rows")
    if mask is not None and (mask.shape != (k,) or mask.device != p.device):
        raise ValueError(f"mask must be [K] = [{k}] on {p.device}, got {tuple(mask.shape)} on {mask.device}")


def _common(p, lr, step, mask, low) -> tuple[tuple, dict]:
    on_device = isinstance(step, torch.Tensor)
    pointers = (low if low is not None else p, lr, mask if mask is not None else lr, step if on_device else lr)
    flags = dict(STEP_ON_DEVICE=on_device, LR_TABLE=lr.dim() == 2, HAS_MASK=mask is not None, HAS_LOW=low is not None,
                 BLOCK=BLOCK)  # fmt: skip
    return pointers, flags


def adam_step(p, g, m, v, lr, step, hp: AdamParams, *, mask=None, low=None, corrections=None) -> None:
    """One Adam / AdamW (hp.decoupled) step for every candidate whose effective LR is not 0. `corrections`:
    bias_corrections(hp, step, device) [2], or bias_table(hp, S, device) [S, 2] read at the step's row (what the
    engine passes: made once per run, nothing computed per step)."""
    if not isinstance(hp, AdamParams):
        raise TypeError(f"hp must be of type AdamParams, got {type(hp).__name__}")
    _check(p, g, {"m": m, "v": v}, lr, step, mask, low)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.to(torch.float32)
    k, n = p.shape
    if n == 0 or k == 0:
        return
    if corrections is None:
        corrections = bias_corrections(hp, step, p.device)
    elif corrections.dtype != torch.float64 or corrections.device != p.device or corrections.shape[-1:] != (2,):
        raise ValueError(f"corrections must be fp64 [2] or [S, 2] on {p.device} (bias_corrections / bias_table), got "
                         f"{corrections.dtype} {tuple(corrections.shape)} on {corrections.device}")  # fmt: skip
    elif corrections.dim() == 2 and not isinstance(step, torch.Tensor) and step > corrections.shape[0]:
        raise ValueError(f"step={step} is past the bias-correction table's {corrections.shape[0]} rows")
    values = (hp.beta1, hp.beta2, hp.eps, hp.weight_decay)
    (low_, lr_, mask_, step_), flags = _common(p, lr, step, mask, low)
    _adam_kernel[(triton.cdiv(n, BLOCK), k)](
        p, g, m, v, low_, lr_, mask_, step_, _hp_tensor(values, p.device), corrections.contiguous(),
        0 if flags["STEP_ON_DEVICE"] else step,
        n, k, DECOUPLED=hp.decoupled, HAS_WD=hp.weight_decay != 0, BC_TABLE=corrections.dim() == 2, **flags,
    )  # fmt: skip


def sgd_step(p, g, buf, lr, step, hp: SGDParams, *, mask=None, low=None) -> None:
    """One SGD step (momentum, dampening, nesterov, weight decay) for every candidate whose effective LR is not 0;
    buf is None when hp.momentum == 0."""
    if not isinstance(hp, SGDParams):
        raise TypeError(f"hp must be of type SGDParams, got {type(hp).__name__}")
    state = {}
    if hp.momentum != 0:
        if buf is None:
            raise ValueError(f"buf must be a [K, N] momentum buffer when momentum != 0 (momentum={hp.momentum})")
        state = {"buf": buf}
    _check(p, g, state, lr, step, mask, low)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.to(torch.float32)
    k, n = p.shape
    if n == 0 or k == 0:
        return
    values = (hp.momentum, hp.dampening, hp.weight_decay)
    (low_, lr_, mask_, step_), flags = _common(p, lr, step, mask, low)
    _sgd_kernel[(triton.cdiv(n, BLOCK), k)](
        p, g, buf if state else p, low_, lr_, mask_, step_, _hp_tensor(values, p.device),
        0 if flags["STEP_ON_DEVICE"] else step, n, k, MOMENTUM=bool(state), NESTEROV=hp.nesterov,
        HAS_WD=hp.weight_decay != 0, **flags,
    )  # fmt: skip


def bias_corrections(hp: AdamParams, step, device: torch.device) -> torch.Tensor:
    """[1 - beta1**step, sqrt(1 - beta2**step)] in fp64 on the device. For a device step, torch ops on the device
    (capturable; fp64 transcendentals stay out of the kernel, where not every backend lowers them)."""
    if isinstance(step, torch.Tensor):
        n = step.reshape(()).to(torch.float64)
        return torch.stack([1.0 - hp.beta1**n, torch.sqrt(1.0 - hp.beta2**n)])
    return torch.tensor([1.0 - hp.beta1**step, (1.0 - hp.beta2**step) ** 0.5], dtype=torch.float64, device=device)


def track(tracker, t, loss: torch.Tensor) -> None:
    """engine/tracker.Tracker.record(t, loss) as one kernel launch (t: an int, or the one-element int64 device
    counter), bitwise as its torch ops."""
    k, steps = tracker.losses.shape
    if loss.shape != (k,) or loss.device != tracker.losses.device or not loss.is_floating_point():
        raise ValueError(f"loss must be a float [K] = [{k}] tensor on {tracker.losses.device}, got {loss.dtype} "
                         f"{tuple(loss.shape)} on {loss.device}")  # fmt: skip
    on_device = isinstance(t, torch.Tensor)
    _track_kernel[(1,)](
        loss.contiguous(), t if on_device else loss, 0 if on_device else t, tracker.avg, tracker.best, tracker.alive,
        tracker.steps_run, tracker.best_step, tracker.losses, tracker.smoothed, tracker.table,
        _hp_tensor((float(tracker.threshold or 0.0),), loss.device), k, steps,
        T_ON_DEVICE=on_device, HAS_THRESHOLD=tracker.threshold is not None, BLOCK=max(16, triton.next_power_of_2(k)),
        enable_fp_fusion=False,
    )  # fmt: skip


def bias_table(hp: AdamParams, steps: int, device: torch.device) -> torch.Tensor:
    """bias_corrections for steps 1..S as one fp64 table [S, 2], computed on the host as for an int step (so a
    replayed graph and an eager run on the host counter get the same corrections bitwise)."""
    rows = [[1.0 - hp.beta1**n, (1.0 - hp.beta2**n) ** 0.5] for n in range(1, steps + 1)]
    return torch.tensor(rows, dtype=torch.float64).reshape(steps, 2).to(device)
