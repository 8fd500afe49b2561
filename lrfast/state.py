"""Snapshot and restore of everything of the user's that a range test could change: parameters, grads, buffers,
training flags and the torch / CUDA / numpy / python RNG states. Restored in a `finally`, so an exception or
Ctrl-C leaves them bitwise as they were.

Nothing is copied back: during the run the model's parameters point into the arena and its buffers into private
clones; restoring points them back at the original tensors, which were never written."""

from __future__ import annotations

import random
import threading

import numpy as np
import torch
from torch import nn


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# The RNGs are process-wide: two range tests in two threads would seed and restore each other's RNG state. Runs
# are serialized from snapshot to restore, so concurrent calls give exactly the sequential results.
_RUN_LOCK = threading.RLock()


class Snapshot:
    """Taking one holds the process-wide run lock until restore()."""

    def __init__(self, model: nn.Module):
        _RUN_LOCK.acquire()
        try:
            self.params = [(p, p.data, p.grad) for p in model.parameters()]
            self.buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
            self.training = [(m, m.training) for m in model.modules()]
            self.rng = capture_rng()
        except BaseException:
            _RUN_LOCK.release()
            raise

    def lend(self, segments, device: torch.device) -> None:
        """Point the model at candidate 0 of the arena: parameters and grads become views of its flat buffers,
        other parameters' grads start empty, and buffers (BatchNorm running stats...) become private clones."""
        for p, _, _ in self.params:
            p.grad = None
        for seg in segments:
            for p, data, grad in zip(seg.params, seg.views(seg.p, 0), seg.views(seg.g, 0)):
                p.data = data
                p.grad = grad
        for m, name, b in self.buffers:
            m._buffers[name] = b.detach().to(device, copy=True)

    def unlend(self) -> None:
        """Point the parameters back at the user's tensors (never written), e.g. before the next chunk's arena
        copies them. Grads and buffers are set again by the next lend()."""
        for p, data, _ in self.params:
            p.grad = None
            p.data = data

    def restore(self) -> None:
        try:
            for m, flag in self.training:
                m.training = flag
            for p, data, grad in self.params:
                p.grad = None
                p.data = data
                p.grad = grad
            for m, name, b in self.buffers:
                m._buffers[name] = b
            restore_rng(self.rng)
        finally:
            _RUN_LOCK.release()
