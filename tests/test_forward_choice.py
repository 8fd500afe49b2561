"""forward= for K > 1 candidates (issue 19: never slower than K separate runs): "vmap", "loop", or "auto", which
measures both on the run's first steps (a warm-up of each, then a timed call of each, interleaved, and one more
timed pair when the first is close) and keeps the batched call only where it measured faster than the loop; with
K >= 4 candidates sharing their masks, probes come first (the first 1, 2, ... candidates batched, the others
looped), a batched call whose cost a candidate cannot win at K is never run at K, and one that can is timed at K
against the loop's cost a candidate in the probes (the loop timed at K only when the two are close). The measured
steps are steps of the run, so the measurement costs only the slower mode's extra time."""

from __future__ import annotations

import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from _helpers import make_batches, make_mlp

import lrfast
from lrfast.engine import forward as F


def _find(forward, strategy="grid", steps=12, **kw):
    model = make_mlp(batchnorm=True, dropout=0.2)
    kw = {"lrs": [1e-3, 1e-2, 1e-1]} if strategy == "grid" else {"candidates": 3}
    return lrfast.find(model, make_batches(n=12, batch=16), optimizer="adam", strategy=strategy, steps=steps,
                       forward=forward, progress=False, **kw)  # fmt: skip


def _slow_vmap(monkeypatch, seconds=0.05):
    """The batched call made slower by `seconds` a call, so that auto picks the loop whatever the machine."""
    run = F.BatchedStep._run

    def slow(self, item):
        if self.mode == "vmap":
            time.sleep(seconds)
        return run(self, item)

    monkeypatch.setattr(F.BatchedStep, "_run", slow)


def _fake_clock(monkeypatch, ms: dict):
    """auto's clock advanced by ms[mode] milliseconds a call of that mode (and by nothing else), so that what auto
    measures is exactly `ms`, whatever the machine (exact fractions: equal calls measure equal); returns the modes of
    the calls, in order."""
    now, modes, run = [Fraction(0)], [], F.BatchedStep._run

    def timed(self, item):
        modes.append(self.mode)
        now[0] += Fraction(ms[self.mode]) / 1000
        return run(self, item)

    monkeypatch.setattr(F.BatchedStep, "_run", timed)
    monkeypatch.setattr(F, "_clock", lambda: now[0])
    return modes


@pytest.mark.parametrize("strategy", ["grid", "seeds"])
def test_auto_measures_on_the_first_steps_then_runs_the_faster_mode(strategy):
    auto, vm = _find("auto", strategy), _find("vmap", strategy)
    picked = auto.info["forward"].split(" ")[0]
    assert picked in ("vmap", "loop") and "forward='auto' measured" in auto.info["forward"]
    assert auto.timings["forward_choice"] > 0 and "forward_choice" not in vm.timings
    # step 0 is the batched call's, from the same state: bitwise the forced vmap run's
    np.testing.assert_array_equal(auto.losses[:, :1], vm.losses[:, :1])
    # the rest: the two modes interleaved, then the one kept; equal to rounding (a few ulp a step)
    np.testing.assert_allclose(auto.losses, vm.losses, rtol=1e-5, atol=0)


def test_auto_runs_two_candidates_on_a_cpu_as_a_loop_without_measuring_and_vmap_can_be_forced():
    model, batches = make_mlp(), make_batches(n=12, batch=16)
    runs = {f: lrfast.find(model, batches, optimizer="adam", strategy="grid", lrs=[1e-3, 1e-2], steps=6, forward=f,
                           progress=False) for f in ("auto", "loop", "vmap")}  # fmt: skip
    auto = runs["auto"]
    assert auto.info["forward"].startswith("loop (K=2): forward='auto': 2 candidates on a CPU, where a batched call "
                                           "of 2 measured slower than 2 module calls")  # fmt: skip
    assert "forward_choice" not in auto.timings  # nothing measured
    assert any("forward='vmap' forces the batched call" in n for n in auto.info["notes"])
    np.testing.assert_array_equal(auto.losses, runs["loop"].losses)
    assert runs["vmap"].info["forward"].startswith("vmap (K=2)")


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = torch.nn.Conv1d(1, 4, 3, padding=1), torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.out(self.conv(x[:, None]).relu().flatten(1))


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.out = torch.nn.MultiheadAttention(4, 2, batch_first=True), torch.nn.Linear(8, 3)

    def forward(self, x):
        seq = x.view(-1, 2, 4)
        return self.out(self.attn(seq, seq, seq, need_weights=False)[0].flatten(1))


@pytest.mark.parametrize("make, kind", [(_Conv, "convolutions"), (_Attention, "attention")])
def test_auto_runs_convolutions_and_attention_on_a_cpu_as_a_loop_without_measuring(make, kind):
    torch.manual_seed(0)
    model, batches = make(), make_batches(n=12, batch=16)
    runs = {f: lrfast.find(model, batches, optimizer="adam", strategy="grid", lrs=[1e-3, 1e-2, 1e-1], steps=6,
                           forward=f, progress=False) for f in ("auto", "loop", "vmap")}  # fmt: skip
    auto = runs["auto"]
    assert auto.info["forward"].startswith(f"loop (K=3): forward='auto': the model runs {kind} on a CPU, where the "
                                           "batched call measured slower than the loop")  # fmt: skip
    assert "forward_choice" not in auto.timings
    np.testing.assert_array_equal(auto.losses, runs["loop"].losses)
    assert runs["vmap"].info["forward"].startswith("vmap (K=3)")


def test_the_memory_probe_records_the_kinds_of_layer_the_forward_runs():
    from lrfast import optimizers
    from lrfast.batches import Split
    from lrfast.engine.arena import Arena
    from lrfast.engine.memory import estimate_bytes

    x, y = make_batches(n=1, batch=4)[0]
    for model, want in ((_Conv(), {"convolutions"}), (_Attention(), {"attention"}), (make_mlp(), set())):
        ops = set()
        arena = Arena(optimizers.resolve("adam", model), 1, torch.device("cpu"))
        estimate_bytes(model, arena, Split((x,), {}, y), None, ops)
        assert ops == want


@pytest.mark.parametrize("kw, probed", [(dict(lrs=[1e-3, 1e-2]), False), (dict(lrs=[1e-3, 1e-2, 3e-2], forward="loop"),
                                        False), (dict(lrs=[1e-3, 1e-2], max_memory=2**40), True),
                                        (dict(lrs=[1e-3, 1e-2, 3e-2]), True)])  # fmt: skip
def test_a_cpu_loop_without_max_memory_makes_no_memory_probe_forward(monkeypatch, kw, probed):
    """2 candidates (auto's cost model: a loop whatever the probe sees) or forward='loop': the loop holds one
    candidate's activations at a time, so the chunk size needs only the arena's bytes, and the set-up makes no forward
    of its own; with max_memory, or where auto may batch (3 candidates of an MLP), the probe's forward runs."""
    from lrfast import optimizers
    from lrfast.engine import memory
    from lrfast.engine.arena import Arena

    probes, estimate = [], memory.estimate_bytes
    monkeypatch.setattr(memory, "estimate_bytes", lambda *a: probes.append(1) or estimate(*a))
    model = make_mlp(batchnorm=True)
    res = lrfast.find(model, make_batches(), strategy="grid", steps=4, progress=False, **kw)
    assert len(probes) == probed
    assert res.info["forward"].startswith(f"loop (K={len(kw['lrs'])})") or probed
    arena = Arena(optimizers.resolve("adam", model), 1, torch.device("cpu")).nbytes_per_candidate
    buffers, got = sum(b.nbytes for b in model.buffers()), res.info["memory"]
    if probed:
        assert got["per_candidate"] > got["arena"] + got["buffers"] == arena + buffers and got["activations"] > 0
    else:
        assert got == {"arena": arena, "buffers": buffers, "per_candidate": arena + buffers, "budget": got["budget"],
                       "batches": res.info["cache"]["on_device"]}  # fmt: skip
    assert res.info["chunk"] == len(kw["lrs"])


def test_auto_keeps_the_loop_when_the_loop_measured_faster(monkeypatch):
    _slow_vmap(monkeypatch)
    auto, lp = _find("auto"), _find("loop")
    assert auto.info["forward"].startswith("loop (K=3): forward='auto' measured")
    assert any("forward='vmap' forces the batched call" in n for n in auto.info["notes"])
    assert auto.timings["forward_choice"] >= 0.1  # the slowed batched calls are measured steps
    # far apart: one timed loop call decided, against the batched call's best of 2 (one call may have stalled)
    assert auto.info["forward"].endswith("ms batched (vmap), the batched call best of 2")
    np.testing.assert_allclose(auto.losses, lp.losses, rtol=1e-5, atol=0)


def test_auto_interleaves_the_modes_and_decides_a_clear_measurement_on_one_timed_pair(monkeypatch):
    modes = _fake_clock(monkeypatch, {"vmap": 10.0, "loop": 20.0})
    auto = _find("auto")
    assert modes == ["vmap", "loop", "loop", "vmap"] + ["vmap"] * 8
    assert auto.info["forward"] == ("vmap (K=3): forward='auto' measured 20.00 ms a step as a loop, 10.00 ms batched "
                                    "(vmap)")  # fmt: skip
    assert auto.timings["forward_choice"] == pytest.approx(0.06)


@pytest.mark.parametrize(("vmap_ms", "kept"), [(11.0, "loop"), (10.0, "loop"), (9.0, "vmap")])
def test_auto_measures_a_close_call_twice_and_keeps_the_batched_call_only_when_faster(monkeypatch, vmap_ms, kept):
    """Within CLOSE (1.25x) one more timed pair is measured; a tie goes to the loop, which runs each candidate at the
    K = 1 step's speed (never slower than K separate runs)."""
    modes = _fake_clock(monkeypatch, {"vmap": vmap_ms, "loop": 10.0})
    auto = _find("auto")
    # a timed loop call follows a loop call (after a batched call the loop's threads start late: _Threads)
    assert modes[:7] == ["vmap", "loop", "loop", "vmap", "loop", "loop", "vmap"] and set(modes[7:]) == {kept}
    assert auto.info["forward"].startswith(f"{kept} (K=3): forward='auto' measured 10.00 ms a step as a loop, "
                                           f"{vmap_ms:.2f} ms batched (vmap), best of 2 each")  # fmt: skip
    assert any("kept only when it measures faster" in n for n in auto.info["notes"]) == (kept == "loop")


def test_auto_that_runs_out_of_steps_before_deciding_says_so():
    auto = _find("auto", steps=3)
    said = ("forward='auto' decided nothing: the run ended within its measured steps (3 calls measured, 1 more "
            "planned; more steps decide)")  # fmt: skip
    assert auto.info["forward"] == f"vmap (K=3): {said}"


def _row_clock(monkeypatch, vmap_ms: dict, loop_ms: float):
    """auto's clock advanced by vmap_ms[m] milliseconds a candidate for a batched call of m rows (a list: one value
    per call of m rows, the last repeated) and by loop_ms a candidate for the loop (and by nothing else); returns the
    calls, in order: ("vmap", rows) or ("loop", first candidate)."""
    now, calls, vmap_call, loop = [Fraction(0)], [], F.BatchedStep._vmap_call, F.BatchedStep._loop

    def batched(self, item, rows=None):
        m = rows or self.arena.k
        ms = vmap_ms[m]
        if isinstance(ms, list):
            ms = ms[min(sum(c == ("vmap", m) for c in calls), len(ms) - 1)]
        calls.append(("vmap", m))
        now[0] += Fraction(ms) * m / 1000
        return vmap_call(self, item, rows)

    def looped(self, item, start=0, state=None):
        calls.append(("loop", start))
        now[0] += Fraction(loop_ms) * (self.arena.k - start) / 1000
        return loop(self, item, start, state)

    monkeypatch.setattr(F.BatchedStep, "_vmap_call", batched)
    monkeypatch.setattr(F.BatchedStep, "_loop", looped)
    monkeypatch.setattr(F, "_clock", lambda: now[0])
    return calls


def _grid8(forward, steps=12, lrs=None):
    lrs = list(np.geomspace(1e-3, 1e-1, 8)) if lrs is None else lrs
    return lrfast.find(make_mlp(batchnorm=True, dropout=0.2), make_batches(n=12, batch=16), optimizer="adam",
                       strategy="grid", lrs=lrs, steps=steps, forward=forward, progress=False)  # fmt: skip


def test_auto_probes_the_batched_call_on_1_then_2_candidates_and_takes_the_loop_when_its_cost_grows(monkeypatch):
    """K = 8: the first steps batch candidate 0, then candidates 0-1, the others in the loop; 10 then 11 ms a
    candidate batched extrapolates to 10 x 1.1^3 = 13.31 at 8, above CLOSE x the loop's 8: after one more timed
    call at 2 that measures so again, the loop runs the rest, and no batched call of 8 rows is ever made."""
    calls = _row_clock(monkeypatch, {1: 10.0, 2: 11.0}, 8.0)
    auto = _grid8("auto")
    probes = [("vmap", 1), ("loop", 1)] * 2 + [("vmap", 2), ("loop", 2)] * 3
    assert calls == probes + [("loop", 0)] * 7
    measured = ("measured the batched call (vmap) on 1 then 2 candidates at 10.00 then 11.00 ms a candidate, "
                "extrapolated ~13.31 at 8 against the loop's 8.00 ms a candidate")  # fmt: skip
    assert auto.info["forward"] == f"loop (K=8): forward='auto' {measured}"
    assert any(n.startswith(f"the 8 candidates run as a per-candidate loop: forward='auto' {measured} (the batched")
               for n in auto.info["notes"])  # fmt: skip
    assert auto.timings["forward_choice"] == pytest.approx((2 * (10 + 7 * 8) + 3 * (2 * 11 + 6 * 8)) / 1000)


def test_auto_times_the_last_probe_twice_before_taking_the_loop_and_one_stalled_call_does_not_decide(monkeypatch):
    """The first timed call on 2 candidates stalls (40 ms a candidate: 10 x 4^3 = 640 at 8, far above the loop's 8):
    the loop is not chosen on it; the second, at 6 (the best of the two), extrapolates to ~2.16 at 8, clearly below
    the loop: the batched call at K decides, and is kept."""
    calls = _row_clock(monkeypatch, {1: 10.0, 2: [6.0, 40.0, 6.0], 8: 3.0}, 8.0)
    auto = _grid8("auto")
    probes = [("vmap", 1), ("loop", 1)] * 2 + [("vmap", 2), ("loop", 2)] * 3
    assert calls == probes + [("vmap", 8)] * 7
    assert auto.info["forward"] == ("vmap (K=8): forward='auto' measured 24.00 ms a step batched (vmap) against "
                                    "~64.00 as a loop (8 x its 8.00 ms a candidate in the probes)")  # fmt: skip


def test_one_stalled_batched_call_at_k_does_not_decide_for_the_loop(monkeypatch):
    """The probes leave the batched call the win (10 then 6 ms a candidate: ~2.16 at 8), but its one timed call at
    K stalls (20 ms a candidate, 160 against ~64 as a loop; the digits MLP at K = 16 once measured 20.6 ms against
    its steady ~5.4): it is timed once more, and the best of the two (3 ms a candidate) keeps it."""
    calls = _row_clock(monkeypatch, {1: 10.0, 2: 6.0, 8: [3.0, 20.0, 3.0]}, 8.0)
    auto = _grid8("auto")
    probes = [c for m in (1, 2) for c in [("vmap", m), ("loop", m)] * 2]
    assert calls == probes + [("vmap", 8)] * 8
    assert auto.info["forward"] == ("vmap (K=8): forward='auto' measured 24.00 ms a step batched (vmap), best of 2, "
                                    "against ~64.00 as a loop (8 x its 8.00 ms a candidate in the probes)")  # fmt: skip
    assert auto.timings["forward_choice"] == pytest.approx((2 * (10 + 7 * 8) + 2 * (2 * 6 + 6 * 8) + 8 * (3 + 20 + 3))
                                                           / 1000)  # fmt: skip


def test_auto_probes_larger_while_undecided_then_measures_at_k_and_keeps_the_faster(monkeypatch):
    """10 then 9 ms a candidate (at 8: ~7.29, between the loop's 8 / CLOSE and 8 x CLOSE): one more probe, on 4
    candidates; 6.5 there extrapolates to ~4.69, clearly below the loop: the batched call at K = 8 (a warm-up and a
    timed call) against the loop's 8 ms a candidate in the probes decides, no loop step of 8 candidates run."""
    calls = _row_clock(monkeypatch, {1: 10.0, 2: 9.0, 4: 6.5, 8: 4.0}, 8.0)
    auto = _grid8("auto")
    probes = [c for m in (1, 2, 4) for c in [("vmap", m), ("loop", m)] * 2]
    assert calls == probes + [("vmap", 8)] * 6
    assert auto.info["forward"] == ("vmap (K=8): forward='auto' measured 32.00 ms a step batched (vmap) against "
                                    "~64.00 as a loop (8 x its 8.00 ms a candidate in the probes)")  # fmt: skip


def test_auto_after_the_probes_times_the_loop_at_k_when_the_batched_call_at_k_is_close(monkeypatch):
    """The probes leave the batched call a chance (6.5 on 4 extrapolates to ~4.69 at 8), but at K it measures 7 ms a
    candidate, 56 against ~64 as a loop: within CLOSE, so one timed pair at K (a loop warm-up, the loop, the batched
    call) decides, the loop measured at K this time."""
    calls = _row_clock(monkeypatch, {1: 10.0, 2: 9.0, 4: 6.5, 8: 7.0}, 8.0)
    auto = _grid8("auto")
    probes = [c for m in (1, 2, 4) for c in [("vmap", m), ("loop", m)] * 2]
    assert calls == probes + [("vmap", 8)] * 2 + [("loop", 0), ("loop", 0), ("vmap", 8)] + [("vmap", 8)]
    assert auto.info["forward"] == ("vmap (K=8): forward='auto' measured 64.00 ms a step as a loop, 56.00 ms batched "
                                    "(vmap), the batched call best of 2")  # fmt: skip


def test_auto_takes_the_loop_when_the_last_probe_extrapolates_to_no_win_at_k(monkeypatch):
    """10 then 9 ms a candidate: undecided, one more probe on 4 (= K / 2, the last); 8.5 there extrapolates to
    ~8.03 at 8, within CLOSE of the loop's 8 but not below it: the loop runs the rest, no full-K batched call."""
    calls = _row_clock(monkeypatch, {1: 10.0, 2: 9.0, 4: 8.5}, 8.0)
    auto = _grid8("auto")
    probes = [c for m in (1, 2, 4) for c in [("vmap", m), ("loop", m)] * 2] + [("vmap", 4), ("loop", 4)]
    assert calls == probes + [("loop", 0)] * 5
    assert auto.info["forward"] == ("loop (K=8): forward='auto' measured the batched call (vmap) on 1 then 2 then 4 "
                                    "candidates at 10.00 then 9.00 then 8.50 ms a candidate, extrapolated ~8.03 at 8 "
                                    "against the loop's 8.00 ms a candidate")  # fmt: skip


def test_probes_run_only_with_shared_masks_and_from_4_candidates():
    """Seeds draw each candidate's masks in turn (randomness "different"): a loop over some of them would change
    the others' masks, so they measure at K at once; so does a grid of 3 (one probe size, nothing to extrapolate)."""
    assert F._schedule(8, "different") == list(F.MEASURE) == F._schedule(3, "same")
    assert F._schedule(4, "same")[:4] == [("probe", False, 1), ("probe", True, 1), ("probe", False, 2),
                                          ("probe", True, 2)]  # fmt: skip


def test_probe_steps_give_each_candidate_its_k1_curve(monkeypatch):
    """A probe's step batches the first m candidates and loops over the others from the same generator state (the
    same dropout masks, BatchNorm statistics per candidate): every row stays its K = 1 run (to rounding; the
    loop's rows bitwise), whatever the probes decide."""
    lrs = list(np.geomspace(1e-3, 1e-1, 8))
    _row_clock(monkeypatch, {1: 10.0, 2: 9.0, 4: 6.5, 8: 4.0}, 8.0)  # probes 1, 2, 4, then the batched call
    auto = _grid8("auto", lrs=lrs)
    monkeypatch.undo()
    for k, lr in enumerate(lrs):
        one = _grid8("auto", lrs=[lr])
        np.testing.assert_allclose(auto.losses[k], one.losses[0], rtol=1e-5, atol=0)
        if k >= 4:  # looped in every probe step (the first 6): bitwise its K = 1 run there
            np.testing.assert_array_equal(auto.losses[k, :6], one.losses[0, :6])


def test_a_batched_call_failing_while_auto_measures_it_at_k_selects_the_loop_from_the_state_before(monkeypatch):
    """The probes' batched calls ran; the first one of all 8 candidates runs out of memory after its forward has
    updated BatchNorm's running statistics: the loop runs that step and the rest, from the buffers and the
    generator as they were before the call (the candidates looped from the start are bitwise a forced loop's,
    their validation losses, in eval mode on the running statistics, included), and a note says why."""
    _row_clock(monkeypatch, {1: 10.0, 2: 9.0, 4: 6.5, 8: 4.0}, 8.0)  # probes 1, 2 and 4, then the call of 8 rows
    loss, call = F.BatchedStep._loss, F.BatchedStep._vmap_call

    def full(self, item, rows=None):
        self._whole = rows is None
        return call(self, item, rows)

    def failing(self, *args):
        out = loss(self, *args)
        if getattr(self, "_whole", False):  # once
            self._whole = False
            raise torch.OutOfMemoryError("injected: out of memory in the batched call")
        return out

    monkeypatch.setattr(F.BatchedStep, "_vmap_call", full)
    monkeypatch.setattr(F.BatchedStep, "_loss", failing)
    val = dict(val_loader=make_batches(n=2, seed=9), val_every=2)
    lrs = list(np.geomspace(1e-3, 1e-1, 8))
    auto = lrfast.find(make_mlp(batchnorm=True, dropout=0.2), make_batches(n=12, batch=16), optimizer="adam",
                       strategy="grid", lrs=lrs, steps=12, forward="auto", progress=False, **val)  # fmt: skip
    monkeypatch.undo()
    lp = lrfast.find(make_mlp(batchnorm=True, dropout=0.2), make_batches(n=12, batch=16), optimizer="adam",
                     strategy="grid", lrs=lrs, steps=12, forward="loop", progress=False, **val)  # fmt: skip
    why = ("vmap failed on step 7 (forward='auto' measuring it on 8 candidates): OutOfMemoryError: injected: out of "
           "memory in the batched call")  # fmt: skip
    assert auto.info["forward"] == f"loop (K=8): {why}"
    assert f"the 8 candidates run as a per-candidate loop (K module calls per step, slower than one batched call): " \
        f"{why}" in auto.info["notes"]
    np.testing.assert_allclose(auto.losses, lp.losses, rtol=1e-5, atol=0)
    # candidates 4-7 ran in the loop at every step: bitwise the forced loop's, validation too once the loop
    # scores them (from step 7; the probes' steps score in the batched call)
    np.testing.assert_array_equal(auto.losses[4:], lp.losses[4:])
    np.testing.assert_array_equal(auto.val_losses[4:, 6:], lp.val_losses[4:, 6:])


def test_loop_and_vmap_give_the_same_grid_curves_to_rounding():
    """Grid candidates share the batches and the dropout masks: the loop's K plain calls and the batched call
    compute the same sums in other orders (a few ulp a step, over 12 steps of training)."""
    vm, lp = _find("vmap"), _find("loop")
    assert vm.info["forward"] == "vmap (K=3)" and lp.info["forward"] == "loop (K=3): forward='loop'"
    note = "the 3 candidates run as a per-candidate loop (K module calls per step): forward='loop'"
    assert lp.info["notes"][0] == note
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


class _Counting(torch.nn.Module):
    """make_mlp(batchnorm=True, dropout=0.2), counting its training calls per candidate: by the arena row its first
    weight points at (a view into the arena's [K, N] buffer; not the memory probe's call at set-up, on a copy)."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = make_mlp(batchnorm=True, dropout=0.2), {}

    def forward(self, x):
        w = self.net[0].weight
        if self.training and torch.is_grad_enabled() and w.untyped_storage().nbytes() > w.nbytes:
            self.calls[w.data_ptr()] = self.calls.get(w.data_ptr(), 0) + 1
        return self.net(x)


def _diverging_grid(forward, lrs=(1e-2, 8.0, 9.0), model=None):
    """SGD at 1e-2 runs the 30 steps; at 8 and 9 it stops (7 and 3 steps)."""
    model = make_mlp(batchnorm=True, dropout=0.2) if model is None else model
    return lrfast.find(model, make_batches(n=12, batch=16), optimizer="sgd", strategy="grid", lrs=list(lrs),
                       steps=30, forward=forward, progress=False)  # fmt: skip


def test_the_loop_runs_only_the_candidates_still_running_and_each_is_its_k1_run():
    """A stopped candidate is frozen and its loss not recorded: the loop no longer calls the model for it (K separate
    runs each end at their stop). Bitwise nothing changes: every row, up to its stop, is its K = 1 run."""
    model = _Counting()
    res = _diverging_grid("loop", model=model)
    assert res.runs.tolist() == [30, 7, 3]
    assert sorted(model.calls.values()) == [3, 7, 30]  # one call a step while it runs, none after
    for k, lr in enumerate([1e-2, 8.0, 9.0]):
        one = _diverging_grid("auto", lrs=[lr], model=_Counting())
        assert one.runs[0] == res.runs[k]
        np.testing.assert_array_equal(res.losses[k], one.losses[0])


def test_auto_hands_the_batched_call_over_to_the_loop_once_the_survivors_run_faster_so(monkeypatch):
    """Batched 10 ms a step, the loop 18 ms for its 3 live candidates at its timed call (step 3: 6 a candidate; the
    9.0 LR, row 0, stops there): vmap is kept, and runs while 2 candidates still run (12 ms as a loop), then the loop
    runs the last one (6 ms; the batched call would still run the 3 rows up to it)."""
    modes = _fake_clock(monkeypatch, {"vmap": 10.0, "loop": 18.0})
    res = _diverging_grid("auto", lrs=(9.0, 8.0, 1e-2))
    assert res.runs.tolist() == [3, 7, 30]
    assert modes == ["vmap", "loop", "loop", "vmap"] + ["vmap"] * 3 + ["loop"] * 23
    assert res.info["forward"].startswith("loop (K=3): forward='auto' measured 18.00 ms a step as a loop, 10.00 ms "
                                          "batched (vmap), then 2 of the 3 candidates stopped: the loop over the 1 "
                                          "still running (~6.00 ms at its measured 6.00 ms a candidate, the batched "
                                          "call ~10.00 ms for 3 rows) runs the rest")  # fmt: skip
    assert any(n.startswith("the 3 candidates run as a per-candidate loop from call 8: ") for n in res.info["notes"])


def test_the_batched_call_runs_only_the_rows_up_to_the_last_live_candidate(monkeypatch):
    """A grid's high LRs stop first: the batched call then runs the stacked views' first rows (sliced, no copy); the
    curves are those of the full batched call, and each stopped row the K = 1 run's up to its stop."""
    rows, batched = [], F.BatchedStep._batched

    def counted(self, s, each):
        f = batched(self, s, each)

        def call(params, *args):
            rows.append(next(iter(params.values())).shape[0])
            return f(params, *args)

        return call

    left_out, call = [], F.BatchedStep._vmap_call

    def checked(self, item, rows=None):  # the grads of the rows left out: zero, as the loop leaves a stopped one's
        loss = call(self, item, rows)
        m = self._rows_run()
        left_out.append(all(bool((g[m:] == 0).all()) for g in self.g))
        return loss

    monkeypatch.setattr(F.BatchedStep, "_batched", counted)
    monkeypatch.setattr(F.BatchedStep, "_vmap_call", checked)
    res = _diverging_grid("vmap")
    assert res.info["forward"] == "vmap (K=3)" and res.runs.tolist() == [30, 7, 3]
    assert rows == [3] * 3 + [2] * 4 + [1] * 23 and all(left_out) and len(left_out) == 30
    for k, lr in enumerate([1e-2, 8.0, 9.0]):
        one = _diverging_grid("auto", lrs=[lr])
        assert one.runs[0] == res.runs[k]
        np.testing.assert_allclose(res.losses[k], one.losses[0], rtol=1e-5, atol=0)


class _TinyLSTM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.lstm = torch.nn.Embedding(16, 8), torch.nn.LSTM(8, 12, batch_first=True)
        self.head = torch.nn.Linear(12, 16)

    def forward(self, idx):
        return self.head(self.lstm(self.tok(idx))[0][:, -1])


def _lstm_find(lrs, forward="auto"):
    torch.manual_seed(0)
    model, g = _TinyLSTM(), torch.Generator().manual_seed(1)
    batches = [(x, x[:, 0]) for x in torch.randint(0, 16, (6, 8, 5), generator=g)]
    return lrfast.find(model, batches, strategy="grid", lrs=lrs, steps=6, forward=forward, progress=False)


def test_auto_runs_recurrent_models_as_a_loop_without_trying_vmap():
    """aten::lstm has no vmap batching rule and no per-candidate fallback (it takes a list of weights): auto takes the
    loop at once, and each candidate is its K = 1 run; forced vmap fails on its first step and falls back to the same
    loop, its note naming the op."""
    lrs = [1e-3, 1e-2]
    auto = _lstm_find(lrs)
    assert auto.info["forward"].startswith("loop (K=2): forward='auto': LSTM has no vmap batching rule")
    assert "forward_choice" not in auto.timings and "slower" not in auto.info["notes"][0]
    for k, lr in enumerate(lrs):
        np.testing.assert_array_equal(auto.losses[k], _lstm_find([lr]).losses[0])
    forced = _lstm_find(lrs, forward="vmap")
    assert forced.info["forward"].startswith("loop (K=2): vmap failed on the first step: RuntimeError: Batching rule "
                                             "not implemented for aten::lstm")  # fmt: skip
    np.testing.assert_array_equal(forced.losses, auto.losses)


class _Unused(torch.nn.Module):
    """A parameter the loss never reaches (a head kept for later): the batched backward gives it no grad."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.spare = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.body(x)


def test_a_parameter_the_loss_does_not_use_stays_batched_and_untouched():
    """Its grad is zero in every candidate's row (as the loop's zeroed grads), so Adam leaves it as it was and the
    batched call stays batched; the curves are the loop's to rounding."""
    runs = {fw: lrfast.find(_Unused(), make_batches(n=6), optimizer="adam", strategy="grid", lrs=[1e-3, 1e-1],
                            steps=6, forward=fw, progress=False) for fw in ("vmap", "loop")}  # fmt: skip
    assert runs["vmap"].info["forward"] == "vmap (K=2)", runs["vmap"].info["notes"]
    np.testing.assert_allclose(runs["vmap"].losses, runs["loop"].losses, rtol=1e-5, atol=0)


def test_a_batched_run_in_a_fresh_process_imports_neither_dynamo_nor_sympy():
    """The batched call is vmap of the forward plus plain autograd: a K > 1 run in a fresh process leaves
    torch._dynamo unimported (the functorch grad transform's first call imported it: ~1.5-2 s on the 2-core CPU),
    and sympy too (0.3-0.9 s, which a K = 1 run never pays): the class-index cross-entropy under vmap runs through
    forward._Rules, not the decomposition's torch._check."""
    code = (
        "import sys, torch, lrfast\n"
        "before = 'sympy' in sys.modules\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))\n"
        "b = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(4)]\n"
        "r = lrfast.find(m, b, strategy='grid', candidates=2, steps=4, forward='vmap', progress=False)\n"
        "assert r.info['forward'] == 'vmap (K=2)', r.info['forward']\n"
        "print('torch._dynamo' in sys.modules, before, 'sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    dynamo, sympy_before, sympy_after = out.stdout.split()
    assert dynamo == "False"
    assert sympy_after == "False" or sympy_before == "True"  # True before: imported with torch here, nothing to save
