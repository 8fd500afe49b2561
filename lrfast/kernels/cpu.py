"""Fused CPU optimizer steps over K candidates: lrfast._C (csrc/fused_optim.cpp) when it is built, else the
plain-torch spec in lrfast/kernels/reference.py, with the same contract (see that module's docstring):

    p, g, m, v, buf: [K, N] tensors with contiguous rows, row k = candidate k; lr: float64 CPU [K]; lr[k] == 0
    freezes candidate k (its p, buf, m, v are left bitwise unchanged); step: 1-based; g is never written.

fp32 CPU tensors go to the C++ kernels, p, m, v and buf at one row stride and g at any (one parameter's columns of
the arena's [K, N] buffers with the grads autograd made for it: update.HostFused's handed grads); anything else
valid (fp64, CUDA) runs the reference; anything invalid raises TypeError / ValueError naming the argument
(reference.check_args). The C++ result equals torch.optim(foreach=False) within fp32 rounding
(tests/test_kernels_cpu.py states the measured error).
"""

from __future__ import annotations

import importlib

import torch

from lrfast.kernels import reference
from lrfast.kernels.reference import AdamParams, SGDParams

__all__ = ["BACKEND", "WHY", "sgd_step", "adam_step", "threads_for", "SGDParams", "AdamParams"]

try:
    _C = importlib.import_module("lrfast._C")  # not `from lrfast import _C`: lrfast/__init__ may still be importing
except ImportError as e:  # built with LRFAST_BUILD_EXT=0, or no compiler at install time
    _C = None
    if isinstance(e, ModuleNotFoundError) and e.name == "lrfast._C":
        WHY: str | None = "lrfast._C not built (LRFAST_BUILD_EXT=0 at install, or no C++ compiler)"
    else:
        WHY = f"lrfast._C failed to import: {e}"
else:
    WHY = None

BACKEND: str = "cpp" if _C is not None else "reference"

_F32 = torch.float32
_F64 = torch.float64


# The fast-path tests below are the whole per-call validation of the C++ path. Measured per call: ~1.5 us of attribute
# checks, 0.3 us of data_ptr(), 0.4 us in pybind11: cpu.adam_step on 16 params 2.6-3.2 us vs 0.4 us calling _C
# directly; at 10k params the whole C++ AdamW step is ~6 us (torch.optim.AdamW(fused=True).step() ~30 us). Any test
# failing, including an AttributeError from a non-tensor, sends the call to the reference, which checks again and
# raises a clear error, or runs (fp64, CUDA). Tensors must not overlap (the kernel assumes restrict pointers).
# Threads: torch.get_num_threads() is passed per call (~0.05 us), so torch.set_num_threads governs lrfast's kernels.


def _c_ready(lr, step, g, p, *state) -> tuple[int, int] | None:
    """(ld, ldg) when the C++ kernel can take these arguments as they are: fp32 CPU [K, N] tensors of one shape with
    contiguous rows, p and the state at one row stride (ld) and g at its own (ldg), lr float64 CPU contiguous [K],
    step a Python int; else None."""
    shape = p.shape
    if _C is None or type(step) is not int or len(shape) != 2:
        return None
    ld = _ld(p, shape)
    ldg = _ld(g, shape)
    if ld is None or ldg is None or any(_ld(t, shape) != ld for t in state):
        return None
    if lr.dtype is _F64 and lr.is_cpu and lr.dim() == 1 and lr.numel() == shape[0] and lr.is_contiguous():
        return ld, ldg
    return None


def _ld(t, shape) -> int | None:
    """The row stride of an fp32 CPU tensor of this [K, N] shape whose rows are contiguous and do not overlap
    (reference.rows_contiguous; N for one row); else None."""
    if not (t.dtype is _F32 and t.is_cpu and t.shape == shape and reference.rows_contiguous(t)):
        return None
    return t.stride(0) if shape[0] > 1 else shape[1]


def threads_for(elements: int) -> int:
    """How many threads a kernel call over this many live elements runs on now: the C++ kernels' split of
    torch.get_num_threads() (a thread takes at least 2^19 elements), or torch's count for the reference (its torch
    ops thread themselves)."""
    n = torch.get_num_threads()
    return _C.threads_for(elements, n) if _C is not None else n


def sgd_step(p, g, buf, lr, step, hp: SGDParams) -> None:
    """One SGD step for every candidate with lr[k] != 0; equals torch.optim.SGD(foreach=False) per row."""
    try:
        with_buf = hp.momentum != 0
        state = (buf,) if with_buf and buf is not None else ()
        strides = _c_ready(lr, step, g, p, *state) if type(hp) is SGDParams and (state or not with_buf) else None
        if strides is not None:
            _C.sgd_step(
                p.data_ptr(), g.data_ptr(), buf.data_ptr() if with_buf else 0, lr.data_ptr(), p.shape[0], p.shape[1],
                *strides, step, hp.momentum, hp.dampening, hp.nesterov, hp.weight_decay, torch.get_num_threads(),
            )  # fmt: skip
            return
    except AttributeError:
        pass
    reference.sgd_step(p, g, buf, lr, step, hp)


def adam_step(p, g, m, v, lr, step, hp: AdamParams) -> None:
    """One Adam / AdamW (hp.decoupled) step for every candidate with lr[k] != 0; equals torch.optim.Adam / AdamW
    (foreach=False) per row."""
    try:
        strides = _c_ready(lr, step, g, p, m, v) if type(hp) is AdamParams else None
        if strides is not None:
            _C.adam_step(
                p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), lr.data_ptr(), p.shape[0], p.shape[1],
                *strides, step, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, hp.decoupled, torch.get_num_threads(),
            )  # fmt: skip
            return
    except AttributeError:
        pass
    reference.adam_step(p, g, m, v, lr, step, hp)
