"""lrfast.info(): which backends are live, and why any is not."""

from __future__ import annotations

import importlib.util
import os

import torch


def info() -> dict:
    from lrfast.kernels import cpu

    triton_ok = importlib.util.find_spec("triton") is not None
    return {
        "version": _version(),
        "torch": torch.__version__,
        "cpu_kernels": cpu.BACKEND,
        "cpu_kernels_why_not_cpp": cpu.WHY,
        "triton": _triton_version() if triton_ok else None,
        "triton_why_not": None if triton_ok else "triton is not installed (pip install triton); the GPU fused "
        "kernels need it",
        "cuda": torch.cuda.is_available(),
        "cuda_why_not": None if torch.cuda.is_available() else "torch.cuda.is_available() is False (no GPU or a "
        "CPU build of torch)",
        "gpu_kernels": "triton" if torch.cuda.is_available() and triton_ok else None,
        "gpu_engine": "torch.compile + CUDA graph replay (find's default on CUDA: compile=None, graphs=None)"
        if torch.cuda.is_available() and triton_ok else "eager (CUDA graphs need a CUDA device and triton)",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def _version() -> str:
    from lrfast import __version__

    return __version__


def _triton_version() -> str:
    import triton

    return triton.__version__
