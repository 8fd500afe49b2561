"""Models that hold one module or one tensor in several places (a module registered under two names, ALBERT-style
repeated layers, tied input/output embeddings, a buffer shared by two modules): every strategy and K leaves the very
same objects in every slot, with the same values, and the user's optimizer still trains them afterwards."""

import numpy as np
import pytest
import torch
from _helpers import assert_same_state, make_batches, state_of
from torch import nn

import lrfast


class SharedTwice(nn.Module):
    """`self.again = self.shared`: one Linear registered under two names."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(8, 8)
        self.again = self.shared
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.again(torch.relu(self.norm(self.shared(x)))))


class Repeated(nn.Module):
    """ALBERT-style: nn.ModuleList([layer] * 3), one layer applied three times."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        layer = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.layers = nn.ModuleList([layer] * 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class TiedLM(nn.Module):
    """GPT-2-style tied embeddings (lm_head.weight is wte.weight) and one buffer registered in two modules."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.wte = nn.Embedding(11, 8)
        self.mix = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.lm_head.weight = self.wte.weight
        scale = torch.full((8,), 0.5)
        self.mix.register_buffer("scale", scale)
        self.lm_head.register_buffer("scale", scale)

    def forward(self, x):
        h = torch.tanh(self.mix(self.wte(x)) * self.mix.scale)
        return self.lm_head(h * self.lm_head.scale).mean(1)


def _batches(model):
    if isinstance(model, TiedLM):
        g = torch.Generator().manual_seed(3)
        return [(torch.randint(0, 11, (16, 5), generator=g), torch.randint(0, 11, (16,), generator=g))
                for _ in range(4)]  # fmt: skip
    return make_batches(n=4)


MODELS = [SharedTwice, Repeated, TiedLM]
RUNS = {
    "sweep": dict(),
    "sweep_max_memory": dict(max_memory=10**9),
    "grid_2": dict(strategy="grid", candidates=2),
    "grid_3_chunked": dict(strategy="grid", candidates=3, max_memory=1),
    "seeds_2": dict(strategy="seeds", candidates=2),
    "generic_grid_2": dict(strategy="grid", candidates=2, optimizer=lambda p: torch.optim.RMSprop(p, lr=1e-3)),
}


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("make", MODELS, ids=lambda m: m.__name__)
def test_find_restores_aliased_parameters_and_buffers_by_identity(make, run):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = state_of(model)
    kwargs = RUNS[run]
    if kwargs.get("max_memory") == 1:  # the smallest budget: one candidate per chunk
        kwargs = {**kwargs, "max_memory": _one_candidate_bytes(model)}
    res = lrfast.find(model, _batches(model), steps=6, progress=False, **kwargs)
    assert res.steps_run == 6 and (res.info["chunk"] == 1 if run == "grid_3_chunked" else True)
    assert_same_state(before, state_of(model))
    # the user's optimizer still holds the model's parameters and still trains every one of them
    held = [p for g in opt.param_groups for p in g["params"]]
    assert all(a is b for a, b in zip(held, model.parameters()))
    x, y = _batches(model)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before["params"][name]), f"{name} no longer trained by the user's opt"


def _one_candidate_bytes(model) -> int:
    """A budget for one candidate of a 6-step run, next to its cached batches (which the budget counts), as the
    probe measures it (with max_memory: a budget far above any need, so that the 2 candidates fit)."""
    res = lrfast.find(model, _batches(model), steps=6, progress=False, strategy="grid", candidates=2,
                      max_memory=2**40)
    return res.info["memory"]["per_candidate"] + res.info["memory"]["batches"]


@pytest.mark.parametrize("make", MODELS, ids=lambda m: m.__name__)
def test_find_restores_aliases_by_identity_after_an_error_mid_run(make):
    model = make()
    before = state_of(model)
    calls = {"n": 0, "fail": 4}

    def loss_fn(out, y):
        calls["n"] += 1
        if calls["n"] >= calls["fail"]:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)

    # K = 2: from call 8 on, inside or after forward="auto"'s measured steps (the count depends on the loop's
    # threads), every loss call fails, in whichever mode (a batched call failing while auto measures it hands over
    # to the loop, which fails too)
    for kwargs, fail in ((dict(), 4), (dict(strategy="grid", candidates=2), 8)):
        calls["n"], calls["fail"] = 0, fail
        with pytest.raises(RuntimeError, match="boom"):
            lrfast.find(model, _batches(model), loss_fn=loss_fn, steps=6, progress=False, **kwargs)
        assert_same_state(before, state_of(model))


@pytest.mark.parametrize("make", MODELS, ids=lambda m: m.__name__)
def test_aliased_model_grid_candidate_equals_its_k1_run(make):
    """vmap over the arena sees every alias of a weight as the one tensor it is (its grads summed over uses)."""
    model = make()
    lrs = [1e-3, 1e-2]
    grid = lrfast.find(model, _batches(model), strategy="grid", lrs=lrs, steps=5, progress=False,
                       forward="vmap")
    for k, lr in enumerate(lrs):
        one = lrfast.find(model, _batches(model), strategy="grid", lrs=[lr], steps=5, progress=False)
        np.testing.assert_allclose(grid.losses[k], one.losses[0], rtol=1e-5)
    assert grid.info["forward"].startswith("vmap"), grid.info["forward"]
