"""forward= for K > 1 candidates (issue 19: never slower than K separate runs): "vmap", "loop", or "auto", which
times a step of each at set-up and keeps the faster. The measurement leaves no trace in the run: the curve of an
auto run is bitwise the curve of the mode it picked (RNG, BatchNorm buffers and grads put back)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import make_batches, make_mlp

import lrfast


def _find(forward, strategy="grid", **kw):
    model = make_mlp(batchnorm=True, dropout=0.2)
    kw = {"lrs": [1e-3, 1e-2, 1e-1]} if strategy == "grid" else {"candidates": 3}
    return lrfast.find(model, make_batches(n=12, batch=16), optimizer="adam", strategy=strategy, steps=12,
                       forward=forward, progress=False, **kw)  # fmt: skip


@pytest.mark.parametrize("strategy", ["grid", "seeds"])
def test_auto_runs_the_mode_it_measured_faster_with_no_trace_of_the_measurement(strategy):
    auto = _find("auto", strategy)
    picked = auto.info["forward"].split(" ")[0]
    assert picked in ("vmap", "loop") and "forward='auto' measured" in auto.info["forward"]
    assert auto.timings["forward_choice"] > 0
    again = _find(picked, strategy)
    np.testing.assert_array_equal(auto.losses, again.losses)
    np.testing.assert_array_equal(auto.smoothed, again.smoothed)


def test_loop_and_vmap_give_the_same_grid_curves_to_rounding():
    """Grid candidates share the batches and the dropout masks: the loop's K plain calls and the batched call
    compute the same sums in other orders (a few ulp a step, over 12 steps of training)."""
    vm, lp = _find("vmap"), _find("loop")
    assert vm.info["forward"] == "vmap (K=3)" and lp.info["forward"] == "loop (K=3): forward='loop'"
    assert "forward_choice" not in vm.timings
    np.testing.assert_allclose(lp.losses, vm.losses, rtol=1e-5, atol=0)


def test_a_bad_forward_is_refused():
    with pytest.raises(ValueError, match="forward"):
        lrfast.find(make_mlp(), make_batches(n=2), forward="batched", candidates=2, strategy="grid")


def test_the_loop_gives_each_grid_candidate_its_k1_curve_bitwise():
    """The loop calls the model itself with candidate k's parameters and grads pointed at row k of the arena (as a
    K = 1 run does with row 0), and rewinds the dropout generator per candidate: bitwise the K = 1 curves."""
    lrs = [1e-3, 1e-2, 1e-1]
    grid = lrfast.find(make_mlp(batchnorm=True, dropout=0.2), make_batches(n=12, batch=16), optimizer="adam",
                       strategy="grid", lrs=lrs, steps=12, forward="loop", progress=False)  # fmt: skip
    for k, lr in enumerate(lrs):
        one = lrfast.find(make_mlp(batchnorm=True, dropout=0.2), make_batches(n=12, batch=16), optimizer="adam",
                          strategy="grid", lrs=[lr], steps=12, progress=False)  # fmt: skip
        np.testing.assert_array_equal(grid.losses[k], one.losses[0])
