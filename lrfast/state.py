"""Snapshot and restore of everything of the user's that a range test could change: parameters, grads, buffers,
training flags and the torch / CUDA / numpy / python RNG states. Restored in a `finally`, so an exception or
Ctrl-C leaves them bitwise as they were.

Nothing is copied back: during the run the model's parameters point into the arena and its buffers into private
clones; restoring points them back at the original tensors, which were never written, and puts the very same
Parameter and buffer objects back into every module slot that held them (a module registered under two names, tied
weights), whatever happened inside: tests check this with `is`."""

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


def forked_rng(device: torch.device):
    """The CPU RNG, and `device`'s when it is a GPU, put back afterwards (a probe forward's dropout draws nothing
    that the run sees)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# The RNGs are process-wide: two range tests in two threads would seed and restore each other's RNG state. Runs
# are serialized from snapshot to restore, so concurrent calls give exactly the sequential results.
_RUN_LOCK = threading.RLock()


class Slots:
    """Every place a model holds a parameter or a buffer: (the module's _parameters / _buffers dict, name, tensor),
    one entry per module and name. A module registered under two names is one module (one dict), and a weight tied
    between two modules is one tensor in two dicts, so swapping by the tensor's identity swaps every alias at once.

    torch.func.functional_call is not used: with a module registered twice it swaps the aliases one after the other
    and restores the wrong tensor (the model is left holding a plain Tensor instead of the user's Parameter, and
    the user's optimizer silently stops updating it); with both names passed it refuses them as tied."""

    def __init__(self, model: nn.Module):
        # each parameter's and buffer's first name (as named_parameters / named_buffers give it) -> its id
        self.ids = {n: id(t) for named in (model.named_parameters(), model.named_buffers()) for n, t in named}
        modules = list(model.modules())
        self.params = [(m._parameters, n, t) for m in modules for n, t in m._parameters.items() if t is not None]
        self.buffers = [(m._buffers, n, t) for m in modules for n, t in m._buffers.items() if t is not None]

    def call(self, module: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], args: tuple,
             kwargs: dict):
        """module(*args, **kwargs) with every slot holding the tensor named n (by its first name) holding params[n]
        (buffers[n]) instead, where given; afterwards, also on an exception, every slot holds its original object
        again. (try/finally, not a context manager: torch.compile traces it.)"""
        new = {self.ids[n]: t for given in (params, buffers) for n, t in given.items()}
        try:
            for d, name, t in self.params + self.buffers:
                if id(t) in new:
                    d[name] = new[id(t)]
            return module(*args, **kwargs)
        finally:
            self.put_back()

    def put_back(self) -> None:
        for d, name, t in self.params + self.buffers:
            d[name] = t


class Snapshot:
    """Taking one holds the process-wide run lock until restore()."""

    def __init__(self, model: nn.Module):
        _RUN_LOCK.acquire()
        try:
            self.slots = Slots(model)
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
        clones: dict[int, torch.Tensor] = {}  # one clone per buffer object: a buffer shared by two modules stays shared
        for m, name, b in self.buffers:
            if id(b) not in clones:
                clones[id(b)] = b.detach().to(device, copy=True)
            m._buffers[name] = clones[id(b)]

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
            self.slots.put_back()  # the very objects, in every slot (aliases, tied weights), whatever happened inside
            for p, data, grad in self.params:
                p.grad = None
                p.data = data
                p.grad = grad
            restore_rng(self.rng)
        finally:
            _RUN_LOCK.release()
