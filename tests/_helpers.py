"""Small models, batches and state comparisons shared by the tests."""

import contextlib
import importlib
import os
import random
import sys

import numpy as np
import torch
from torch import nn


def make_mlp(seed: int = 0, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def make_batches(n: int = 6, batch: int = 16, seed: int = 1, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def state_of(model: nn.Module) -> dict:
    """Everything of a model that find() must leave bitwise as it was."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "ids": [id(p) for p in model.parameters()],
        "ptrs": [p.data_ptr() for p in model.parameters()],
        "slots": slots_of(model),
    }


def slots_of(model: nn.Module) -> list:
    """(module, kind, name, the object itself) for every parameter and buffer slot of every module: aliases (a
    module registered twice, tied weights) show up as the same object in several slots."""
    return [(m, kind, name, t) for m in model.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items()]  # fmt: skip


def assert_same_state(a: dict, b: dict) -> None:
    assert a["ids"] == b["ids"] and a["ptrs"] == b["ptrs"] and a["training"] == b["training"]
    assert len(a["slots"]) == len(b["slots"])
    for (m, kind, name, t), (m2, kind2, name2, t2) in zip(a["slots"], b["slots"]):
        assert m is m2 and kind == kind2 and name == name2 and t is t2, f"{kind} {name} is not the same object"
    for key in ("params", "buffers"):
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), f"{key} {n} changed"
    for n in a["grads"]:
        ga, gb = a["grads"][n], b["grads"][n]
        assert (ga is None) == (gb is None) and (ga is None or torch.equal(ga, gb)), f"grad {n} changed"


def rng_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def assert_same_rng(a, b) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:]
    assert a[2] == b[2]


def ulp(magnitude: float, dtype: torch.dtype = torch.float32) -> float:
    """The gap between `magnitude` and the next representable value of `dtype` (one unit in the last place)."""
    x = torch.tensor(abs(magnitude), dtype=dtype).clamp_min(torch.finfo(dtype).tiny)
    return (torch.nextafter(x, torch.tensor(float("inf"), dtype=dtype)) - x).item()


def assert_close_in_ulps(got: torch.Tensor, want: torch.Tensor, ulps: float, *of: torch.Tensor) -> None:
    """|got - want| <= ulps x the ulp of the largest magnitude among want and `of` (the operands; finite values): a
    rounding difference inside a kernel is an ulp of the values it combines, also where the result cancels towards 0."""
    finite = [t.detach().abs()[torch.isfinite(t)] for t in (want, *of)]  # inf and NaN must match where they are
    magnitude = max(float(t.max()) if t.numel() else 0.0 for t in finite)
    atol = ulps * ulp(magnitude, want.dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=atol,
                               msg=lambda m: f"{m}\n(allowed {ulps} ulp of {magnitude:.3g})")  # fmt: skip


def triton_kernels():
    """lrfast.kernels.triton_optim, its kernels interpreted on CPU when there is no GPU (TRITON_INTERPRET is read when
    the kernels are defined: set for the import only)."""
    name = "lrfast.kernels.triton_optim"
    if torch.cuda.is_available():
        return importlib.import_module(name)
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
        # the first launch imports more of triton, which checks the variable again: launch once while it is set
        module.sgd_step(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.ones(1), 1, module.SGDParams())
        return module
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


@contextlib.contextmanager
def torch_threads(n: int):
    """torch set to n intra-op threads meanwhile. A loop of K candidates on a CPU arena runs them side by side on
    min(K, n) threads, each with n // min(K, n) of them (engine/forward.py: _Threads), so a candidate's ops there
    are a K = 1 run's at that count: bitwise equal to it, where the same ops at another count round otherwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_measure_faster(monkeypatch) -> None:
    """The loop's clock for its threads (engine/forward._wall) made a counter, +1 s a reading: a candidate one after
    another measures 1 s, a call of m candidates on the threads 1 s too (1 / m a candidate), so the threads are kept
    whatever the machine's timings."""
    import itertools

    import lrfast.engine.forward as forward

    monkeypatch.setattr(forward, "_wall", itertools.count().__next__)
