"""The loop's threads (engine/forward.py: BatchedStep._start_threads, _Threads, _replica): on a CPU arena the loop
runs its K candidates side by side on min(K, n) threads of torch's n, each calling its own replica of the model with
a share of the n. The first call runs its first two candidates one after another on all n (timed: the cost the
threads must beat), the rest on the threads; every other step of a candidate is a K = 1 run's at its share, so the
curves of candidates 2.. equal those runs' bitwise (_helpers.torch_threads), those of 0 and 1 to the rounding of one
step on n threads; the user's model, its state and torch's thread count are left as they were."""

import itertools
import threading

import numpy as np
import pytest
import torch
from _helpers import assert_same_state, make_batches, make_mlp, state_of, threads_measure_faster, torch_threads
from torch import nn

import lrfast
import lrfast.engine.forward as F

LRS = [1e-3, 1e-2, 1e-1, 3e-1]


class Recording(nn.Module):
    """An MLP (BatchNorm: running stats per candidate) that records the thread of each forward in a list its
    replicas share (a replica's attributes are the model's)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = make_mlp(batchnorm=True, dropout=dropout)
        self.threads: list[str] = []

    def forward(self, x):
        self.threads.append(threading.current_thread().name)
        return self.net(x)


class TiedRNN(nn.Module):
    """An LSTM (its flat-weight list follows a replica's parameters) and an output layer tied to the embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(7, 6)
        self.rnn = nn.LSTM(6, 6, batch_first=True)
        self.out = nn.Linear(6, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.rnn(self.emb(x))[0][:, -1])


def _grid(model, lrs, batches=None, **kw):
    return lrfast.find(model, batches or make_batches(n=12, batch=16), optimizer="adam", strategy="grid", lrs=lrs,
                       steps=8, forward="loop", progress=False, **kw)  # fmt: skip


def _tokens(n: int = 8):
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 7, (4, 5), generator=g), torch.randint(0, 7, (4,), generator=g)) for _ in range(n)]


def test_the_loop_runs_candidates_on_threads_each_its_k1_curve_and_validation_bitwise(monkeypatch):
    """4 candidates on 2 threads of 1 (torch set to 2): every step's forwards on both threads but the first call's
    first two, and each candidate's training and validation curves (eval mode, its own running stats) bitwise its
    K = 1 run's on 1 thread from candidate 2 on; candidates 0 and 1 made their first step on 2 threads, as a K = 1
    run on 2 does: their losses within 1e-6 of the run's on 1 (their validation, through Adam's first step of
    +-lr on grads that are rounding noise and BatchNorm's eval statistics, as far as a K = 1 run's on 2 is)."""
    threads_measure_faster(monkeypatch)
    model, val = Recording(), make_batches(n=2, batch=16, seed=7)
    with torch_threads(2):
        grid = _grid(model, LRS, val_loader=val, val_batches=2, val_every=2)
    assert grid.info["forward"] == ("loop (K=4): forward='loop'; on 2 threads (measured 250.00 ms a candidate on 2 "
                                    "threads side by side, 1000.00 one after another)")  # fmt: skip
    assert not any("threads" in n for n in grid.info["notes"]), grid.info["notes"]
    assert len(set(model.threads[-len(LRS) :])) == 2  # the last step's 4 forwards on 2 threads
    for k, lr in enumerate(LRS):
        with torch_threads(1):
            one = _grid(Recording(), [lr], val_loader=val, val_batches=2, val_every=2)
        if k >= 2:
            np.testing.assert_array_equal(grid.losses[k], one.losses[0])
            np.testing.assert_array_equal(grid.val_losses[k], one.val_losses[0])
        else:
            np.testing.assert_allclose(grid.losses[k], one.losses[0], rtol=1e-6)


def test_candidates_the_threads_do_not_divide_run_one_after_another_where_that_measured_cheaper(monkeypatch):
    """3 candidates on 2 threads: a candidate measured 100 ms one after another (the first call's first two) and
    90 ms on the threads (call 2: 270 ms for 3): the threads are kept, but 3 x 100 ms one after another costs less
    than 2 rounds of 2 x 90 on the threads (the second leaving one idle), so from call 3 on the 3 run one after
    another on the calling thread on both of torch's threads, which it keeps between calls (no count switched)."""
    times = itertools.chain([0.0, 0.1, 1.0, 1.1, 5.0, 6.0, 6.27], itertools.count(10))
    monkeypatch.setattr(F, "_wall", lambda: next(times))
    seen = []

    class Counting(Recording):
        def forward(self, x):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return super().forward(x)

    with torch_threads(2):
        grid = _grid(Counting(), LRS[:3])
    assert grid.info["forward"] == ("loop (K=3): forward='loop'; on 2 threads (measured 90.00 ms a candidate on 2 "
                                    "threads side by side, 100.00 one after another)")  # fmt: skip
    assert len({t for t, _ in seen[3:6]}) == 2  # call 2 on the threads
    assert seen[6:] == [("MainThread", 2)] * 3 * 6  # calls 3-8: one after another on both threads
    for k, lr in enumerate(LRS[:3]):
        with torch_threads(1):
            one = _grid(Recording(), [lr])
        np.testing.assert_allclose(grid.losses[k], one.losses[0], rtol=1e-6)


def test_threaded_loop_on_a_tied_lstm_equals_its_k1_runs_and_restores_the_model_by_identity(monkeypatch):
    threads_measure_faster(monkeypatch)
    model = TiedRNN()
    before = state_of(model)
    params = list(model.parameters())
    with torch_threads(2):
        grid = _grid(model, LRS[:3], _tokens())
    assert model.out.weight is model.emb.weight and list(model.parameters()) == params
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert_same_state(before, state_of(model))
    for k, lr in enumerate(LRS[:3]):
        with torch_threads(1):
            one = _grid(TiedRNN(), [lr], _tokens())
        if k >= 2:  # candidates 0 and 1 made their first step on 2 threads
            np.testing.assert_array_equal(grid.losses[k], one.losses[0])
        else:
            np.testing.assert_allclose(grid.losses[k], one.losses[0], rtol=1e-6)


def test_a_model_drawing_random_numbers_runs_one_candidate_after_another_and_says_why():
    model = Recording(dropout=0.2)
    with torch_threads(2):
        grid = _grid(model, LRS)
    assert set(model.threads) == {"MainThread"}
    assert any("not on threads side by side: the model draws random numbers" in n for n in grid.info["notes"])
    for k, lr in enumerate(LRS):  # the masks candidate 0 draws, as in a K = 1 run (the same count of threads)
        with torch_threads(2):
            one = _grid(Recording(dropout=0.2), [lr])
        np.testing.assert_array_equal(grid.losses[k], one.losses[0])


def test_a_model_with_hooks_runs_one_candidate_after_another_and_says_why():
    model = Recording()
    seen = []
    model.net[0].register_forward_hook(lambda m, i, o: seen.append(threading.current_thread().name))
    with torch_threads(2):
        grid = _grid(model, LRS)
    assert set(seen) == {"MainThread"} and len(seen) >= 8 * len(LRS)
    assert any("not on 2 threads side by side: net.0 has hooks" in n for n in grid.info["notes"])


def test_the_loop_keeps_its_threads_only_where_they_measured_faster(monkeypatch):
    """A candidate measured 4 ms one after another (on all of torch's threads, the faster of the first call's first
    two, 5 and 4 ms) and 8 a candidate on the threads (32 ms for the 4 of the second call, which follows a call on
    them): the loop runs one candidate after another from the third call on, and says so."""
    # the first two candidates; the other two on the threads (not timed: after serial work); call 2
    times = iter([0.0, 0.005, 1.0, 1.004, 5.0, 6.0, 6.032])
    monkeypatch.setattr(F, "_wall", lambda: next(times))
    model = Recording()
    with torch_threads(2):
        grid = _grid(model, LRS)
    assert grid.info["forward"] == "loop (K=4): forward='loop'"
    assert ("the loop runs the 4 candidates one after another: it measured 8.00 ms a candidate on 2 threads side by "
            "side, 4.00 one after another") in grid.info["notes"]  # fmt: skip
    first = len(LRS)  # call 1: candidates 0 and 1 one after another, 2 and 3 on the threads (no set-up forward: a
    # CPU loop without max_memory makes no memory probe)
    assert len(set(model.threads[first : first + len(LRS)])) == 2  # call 2 on both threads
    assert set(model.threads[first + len(LRS) :]) == {"MainThread"}


def test_candidates_whose_steps_measure_under_threads_from_ms_run_one_after_another_each_its_k1_curve(monkeypatch):
    """The first call's first two candidates measured 1 ms each on all of torch's threads (under THREADS_FROM_MS):
    no thread starts, no step is run twice, and the note says why."""
    times = iter([0.0, 0.001, 1.0, 1.001])
    monkeypatch.setattr(F, "_wall", lambda: next(times))
    model = Recording()
    with torch_threads(2):
        grid = _grid(model, LRS)
    assert grid.info["forward"] == "loop (K=4): forward='loop'" and set(model.threads) == {"MainThread"}
    assert ("the loop runs the 4 candidates one after another, not on threads: a candidate's step measured 1.00 ms on "
            f"all of torch's threads, under the {F.THREADS_FROM_MS:g} ms from which threads pay for the whole "
            "step") in grid.info["notes"]  # fmt: skip
    assert len(model.threads) == 8 * len(LRS)  # each candidate once a step (a CPU loop makes no memory probe)
    for k, lr in enumerate(LRS):
        with torch_threads(2):
            one = _grid(Recording(), [lr])
        np.testing.assert_array_equal(grid.losses[k], one.losses[0])


def test_torch_thread_count_is_left_as_it_was_after_a_run_and_after_a_failure_on_a_thread(monkeypatch):
    """The loop's threads set torch's count (the caller's and the process default new threads start with) to their
    share while they run: both are put back after the run, also when a candidate's step fails on one of them; the
    failure is raised with the model's state restored."""
    threads_measure_faster(monkeypatch)
    calls = {"n": 0}

    def loss_fn(out, y):  # fails on one of the loop's threads from the 4th step on
        calls["n"] += 1
        if calls["n"] > 12 and threading.current_thread().name.startswith("lrfast-loop"):
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)

    def default_count() -> int:  # a new thread's count
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        return seen[0]

    with torch_threads(2):
        start = default_count()
        _grid(Recording(), LRS)
        assert torch.get_num_threads() == 2 and default_count() == start
        model = Recording()
        before = state_of(model)
        with pytest.raises(RuntimeError, match="boom"):
            _grid(model, LRS, loss_fn=loss_fn)
        assert torch.get_num_threads() == 2 and default_count() == start
    assert_same_state(before, state_of(model))


def test_a_probe_whose_looped_candidates_all_stopped_runs_no_thread(monkeypatch):
    """forward="auto" probing at K = 4 batches candidate 0 and loops over 1-3; once those 3 have diverged, the
    probe's loop has no candidate to run (it ran into a division by zero on its threads), and the run goes on."""
    threads_measure_faster(monkeypatch)
    with torch_threads(2):
        res = lrfast.find(Recording(), make_batches(n=12, batch=16), optimizer="sgd", strategy="grid",
                          lrs=[1e-3, 1e4, 2e4, 3e4], steps=8, progress=False)  # fmt: skip
    assert res.runs.tolist()[0] == 8 and max(res.runs.tolist()[1:]) < 8


def test_the_loop_zeroes_only_the_rows_it_ran_and_stopped_candidates_keep_zero_grads(monkeypatch):
    """A grid whose middle and last LRs diverge within a few steps (SGD): once they stop, each call zeroes only the
    grads of the rows the last call ran (a stopped row once more, at the call after its last, then never), the
    stopped rows' grads stay zero, and the candidates still running have their K = 1 curves bitwise."""
    from lrfast.engine.arena import Arena

    zeroed: list = []
    seen: list = []
    real = Arena.zero_grad

    def spy(self, rows=None):
        zeroed.append(rows)
        real(self, rows)

    monkeypatch.setattr(Arena, "zero_grad", spy)
    real_update = F.BatchedStep.__call__

    def grads_after(self, item):  # each call's grads, row by row: zero or not
        loss = real_update(self, item)
        seen.append([bool(seg.g[k].any()) for k in range(self.arena.k) for seg in self.arena.segments[:1]])
        return loss

    monkeypatch.setattr(F.BatchedStep, "__call__", grads_after)
    lrs = [1e-2, 1e4, 3e-2, 1e5]
    with torch_threads(1):
        res = lrfast.find(make_mlp(), make_batches(n=12, batch=16), optimizer="sgd", strategy="grid", lrs=lrs,
                          steps=12, forward="loop", progress=False)  # fmt: skip
    runs = res.runs.tolist()
    assert runs[0] == runs[2] == 12 and runs[1] < 10 and runs[3] < 10
    last = max(runs[1], runs[3])  # call last + 1 (zeroed[last]) zeroes the last rows that stopped
    assert zeroed[0] is None  # the first call: every row
    for rows in zeroed[last + 1 :]:
        assert rows in {(0, 1), (2, 3)}  # the running rows only, each its own slice
    assert all(s == [True, False, True, False] for s in seen[last:])
    for k in (0, 2):
        with torch_threads(1):
            one = lrfast.find(make_mlp(), make_batches(n=12, batch=16), optimizer="sgd", strategy="grid",
                              lrs=[lrs[k]], steps=12, progress=False)  # fmt: skip
        np.testing.assert_array_equal(res.losses[k], one.losses[0])
