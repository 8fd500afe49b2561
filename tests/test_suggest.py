"""lrfast.suggest against literal transcriptions of the peers' suggestion code (compared with ==).

The oracles below copy each peer's code as written; the only changes are float64 tensors (lrfast computes in float64,
the peers in float32) and, for fastai's valley loop, indexing a Python list instead of a tensor (same comparisons,
~100x faster). A peer that raises is read as "no answer" (None).
"""

import math

import numpy as np
import pytest
import torch

from lrfast import suggest as sg

F64 = torch.float64
PEER_ERRORS = (IndexError, ValueError, RuntimeError)


# ----------------------------------------------------------------------------------------------------------- oracles
def steps_run(lrs, losses):
    """What the peers' recorders hold: here the curves' trailing NaN losses are steps not run (lrfast's methods are
    told so with steps_run=ran(...))."""
    lrs, losses = list(map(float, lrs)), list(map(float, losses))
    while losses and math.isnan(losses[-1]):
        lrs.pop()
        losses.pop()
    return lrs, losses


def lightning_suggestion(results_lr, results_loss, skip_begin=10, skip_end=1):
    """Lightning >= 2.5.3 _LRFinder.suggestion."""
    losses = torch.tensor(results_loss[skip_begin:-skip_end], dtype=F64)
    lrs = torch.tensor(results_lr[skip_begin:-skip_end], dtype=F64)
    is_finite = torch.isfinite(losses)
    losses = losses[is_finite]
    lrs = lrs[is_finite]
    if len(losses) < 2:
        return None
    gradients = torch.gradient(losses, spacing=[lrs])[0]
    min_grad = torch.argmin(gradients).item()
    all_losses_idx = torch.arange(len(results_loss))
    idx_non_skipped = all_losses_idx[skip_begin:-skip_end]
    idx_finite = idx_non_skipped[is_finite]
    return results_lr[idx_finite[min_grad].item()]


def lightning_old_suggestion(results_lr, results_loss, skip_begin=10, skip_end=1):
    """Lightning < 2.5.3 _LRFinder.suggestion (numpy version, offset included)."""
    losses = np.array(results_loss[skip_begin:-skip_end])
    losses = losses[np.isfinite(losses)]
    if len(losses) < 2:
        return None
    min_grad = np.gradient(losses).argmin()
    return results_lr[min_grad + skip_begin]


def torch_lr_finder_plot(history_lr, history_loss, skip_start=10, skip_end=5):
    """torch-lr-finder LRFinder.plot(suggest_lr=True): the suggested lr, or None."""
    if skip_end == 0:
        lrs, losses = history_lr[skip_start:], history_loss[skip_start:]
    else:
        lrs, losses = history_lr[skip_start:-skip_end], history_loss[skip_start:-skip_end]
    min_grad_idx = None
    try:
        min_grad_idx = (np.gradient(np.array(losses))).argmin()
    except ValueError:
        pass
    return None if min_grad_idx is None else lrs[min_grad_idx]


def fa_valley(lrs, losses, num_it):
    n = len(losses)
    max_start, max_end = 0, 0
    losses = losses.tolist()
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx]), None


def fa_slide(lrs, losses, num_it, lr_diff=15, thresh=0.005, adjust_value=1.0):
    losses = losses.numpy()
    loss_grad = np.gradient(losses)
    r_idx = -1
    l_idx = r_idx - lr_diff
    local_min_lr = lrs[l_idx]
    while (l_idx >= -len(losses)) and (abs(loss_grad[r_idx] - loss_grad[l_idx]) > thresh):
        local_min_lr = lrs[l_idx]
        r_idx -= 1
        l_idx -= 1
    suggestion = float(local_min_lr) * adjust_value
    return suggestion, None


def fa_minimum(lrs, losses, num_it):
    lr_min = lrs[losses.argmin()].item()
    return lr_min / 10, None


def fa_steep(lrs, losses, num_it):
    grads = (losses[1:] - losses[:-1]) / (lrs[1:].log() - lrs[:-1].log())
    lr_steep = lrs[grads.argmin()].item()
    return lr_steep, None


def fastai_lr_find(func, recorder_lrs, recorder_losses, num_it, **kwargs):
    """fastai Learner.lr_find after the fit: slice with num_it, cut at the first NaN, call the suggestion func."""
    lrs = torch.tensor(recorder_lrs[num_it // 10 : -5], dtype=F64)
    losses = torch.tensor(recorder_losses[num_it // 10 : -5], dtype=F64)
    nan_idxs = torch.nonzero(torch.isnan(losses.view(-1)))
    if len(nan_idxs) > 0:
        drop_idx = min(nan_idxs)
        lrs = lrs[:drop_idx]
        losses = losses[:drop_idx]
    try:
        with np.errstate(all="ignore"):
            return func(lrs, losses, num_it, **kwargs)[0]
    except PEER_ERRORS:
        return None


def ran(losses) -> int:
    """How many steps of a curve padded with NaN were run (the fixtures' convention)."""
    return len(steps_run(losses, losses)[1])


def oracle(name, lrs, losses, **kwargs):
    """The peer's answer on an lrfast curve of planned length len(lrs) (trailing NaN losses = steps not run)."""
    run_lrs, run_losses = steps_run(lrs, losses)
    if name == "steepest":
        return lightning_suggestion(run_lrs, run_losses, **kwargs)
    if name == "steepest_log":
        return lightning_old_suggestion(run_lrs, run_losses, **kwargs)
    if name == "torch_lr_finder":
        return torch_lr_finder_plot(run_lrs, run_losses, **kwargs)
    func = {"valley": fa_valley, "slide": fa_slide, "minimum": fa_minimum, "steep": fa_steep}[name]
    return fastai_lr_find(func, run_lrs, run_losses, kwargs.pop("num_it", len(lrs)), **kwargs)


# ------------------------------------------------------------------------------------------------------------ curves
KINDS = ["u_shape", "trailing_nan", "mid_nan", "inf", "neg_inf", "monotone_down", "monotone_up", "constant"]
LENGTHS = [17, 50, 100, 333]
METHOD_NAMES = list(sg.METHODS)


def make_curve(seed, n, kind):
    rng = np.random.default_rng(seed)
    lrs = 1e-7 * (10 / 1e-7) ** (np.arange(n) / n)  # fastai/Lightning exponential schedule
    t = np.arange(n) / n
    raw = 2.3 - 1.5 * np.exp(-(((t - 0.65) / 0.2) ** 2)) + np.exp(np.clip(12 * (t - 0.85), None, 3))
    raw = raw + rng.normal(0, 0.05, n)
    if kind == "monotone_down":
        raw = np.sort(raw + rng.uniform(0, 0.01, n))[::-1]
    elif kind == "monotone_up":
        raw = np.sort(raw + rng.uniform(0, 0.01, n))
    elif kind == "constant":
        raw = np.full(n, 1.75)
    losses = raw.copy()
    if kind not in ("monotone_down", "monotone_up", "constant"):  # smoothed like the recorders (debiased EMA)
        avg = 0.0
        for i in range(n):
            avg = 0.98 * avg + 0.02 * raw[i]
            losses[i] = avg / (1 - 0.98 ** (i + 1))
    if kind == "trailing_nan":
        losses[n - rng.integers(1, n // 2) :] = np.nan
    elif kind == "mid_nan":
        losses[rng.choice(n, size=rng.integers(1, 4), replace=False)] = np.nan
        losses[n - rng.integers(0, n // 3) :] = np.nan
    elif kind in ("inf", "neg_inf"):
        losses[rng.choice(n, size=rng.integers(1, 4), replace=False)] = np.inf if kind == "inf" else -np.inf
    return lrs, losses


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_matches_peer_transcription_on_random_curves(name, n, kind):
    for seed in range(4):
        lrs, losses = make_curve(seed, n, kind)
        got = sg.METHODS[name](lrs, losses, steps_run=ran(losses))
        want = oracle(name, lrs, losses)
        assert got == want, (name, n, kind, seed)
        assert got is None or type(got) is float


@pytest.mark.parametrize(
    "kwargs", [{"lr_diff": 3}, {"lr_diff": 0, "thresh": 0.0}, {"thresh": 1e-4, "adjust_value": 0.5}]
)
def test_slide_matches_fastai_with_non_default_options(kwargs):
    for seed, n in enumerate(LENGTHS * 2):
        lrs, losses = make_curve(seed, n, KINDS[seed % len(KINDS)])
        assert sg.slide(lrs, losses, steps_run=ran(losses), **kwargs) == oracle("slide", lrs, losses, **kwargs)


def test_fastai_methods_slice_with_the_planned_num_it_not_the_steps_run():
    n = 30
    lrs = [float(i + 1) for i in range(n)]
    losses = [5.0 + i for i in range(20)] + [math.nan] * 10  # 20 of the 30 planned steps were run
    losses[2] = 0.5  # the minimum sits at index 2: inside [20//10:], outside fastai's [30//10:]
    assert sg.minimum(lrs, losses, steps_run=20) == fastai_lr_find(fa_minimum, lrs[:20], losses[:20], num_it=30) == 0.4
    assert sg.minimum(lrs, losses, num_it=20, steps_run=20) == fastai_lr_find(fa_minimum, lrs[:20], losses[:20],
                                                                              num_it=20) == 0.3  # fmt: skip
    assert sg.valley(lrs, losses, steps_run=20) == oracle("valley", lrs, losses)


def test_steepest_gradient_is_identical_to_torch_gradient_with_coordinates():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 400))
        x = np.exp(np.sort(rng.uniform(np.log(1e-7), np.log(10.0), n)))  # non-uniform (jittered exp schedule)
        y = rng.normal(size=n).cumsum()
        ours = np.gradient(y, x)
        theirs = torch.gradient(torch.tensor(y), spacing=[torch.tensor(x)])[0].numpy()
        assert np.array_equal(ours, theirs)  # bit-identical, not just within 1 ulp
        lrs, losses = np.r_[np.zeros(10), x, 1.0], np.r_[np.zeros(10), y, 0.0]
        assert sg.steepest(lrs, losses) == lightning_suggestion(list(lrs), list(losses))


def test_steepest_matches_lightning_with_repeated_lrs():
    lrs = np.r_[np.linspace(0.1, 1, 10), [1.0, 1.0, 2.0, 3.0, 3.0, 5.0], 9.0]
    losses = np.r_[np.ones(10), [3.0, 2.0, 1.5, 1.0, 0.0, 2.0], 9.0]
    assert sg.steepest(lrs, losses) == lightning_suggestion(list(lrs), list(losses))


# ------------------------------------------------------------------------------------------------- hand-computed cases
# 12 planned steps: fastai keeps [12//10:-5] = indices 1..6; the tail has lower losses that must be ignored.
HAND_LRS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5]
HAND_LOSSES = [9.0, 8.0, 7.5, 5.0, 6.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1, 0.05]


def test_fastai_methods_on_a_hand_computed_curve():
    # window [8, 7.5, 5, 6, 2, 1.5]: decreasing-run lengths 1,2,3,3,4,5 -> max_end=5, max_start=0, idx=0+1+0
    assert sg.valley(HAND_LRS, HAND_LOSSES) == 1e-4
    # slope vs ln(lr) (all steps ln 10): -0.5, -2.5, +1, -4, -0.5 -> steepest forward step starts at 1e-2
    assert sg.steep(HAND_LRS, HAND_LOSSES) == 1e-2
    # lowest window loss 1.5 at lr 1.0
    assert sg.minimum(HAND_LRS, HAND_LOSSES) == 0.1
    # np.gradient = [-0.5, -1.5, -0.75, -1.5, -2.25, -0.5]; |g[-1]-g[-3]| = 1 > .5, |g[-2]-g[-4]| = 1.5 > .5,
    # |g[-3]-g[-5]| = 0 stops: last left end was lrs[-4] of the window
    assert sg.slide(HAND_LRS, HAND_LOSSES, lr_diff=2, thresh=0.5) == 1e-3
    assert sg.slide(HAND_LRS, HAND_LOSSES, lr_diff=2, thresh=0.5, adjust_value=2.0) == 2e-3
    for name in ("valley", "steep", "minimum"):
        assert sg.METHODS[name](HAND_LRS, HAND_LOSSES) == oracle(name, HAND_LRS, HAND_LOSSES)
    assert sg.slide(HAND_LRS, HAND_LOSSES, lr_diff=2, thresh=0.5) == oracle(
        "slide", HAND_LRS, HAND_LOSSES, lr_diff=2, thresh=0.5
    )


def test_valley_wraps_to_the_last_lr_when_the_longest_run_is_the_first_two_points():
    # lds = [1, 2, 2, 2, 2, 2]: max_end=1, max_start=1-2=-1, sections=2/3, idx=-1 -> fastai's lrs[-1]
    losses = [9.0, 5.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert sg.valley(HAND_LRS, losses) == 1.0 == oracle("valley", HAND_LRS, losses)


def test_fastai_cuts_at_the_first_nan_inside_the_window():
    losses = list(HAND_LOSSES)
    losses[4] = math.nan  # window becomes [8, 7.5, 5]
    assert sg.minimum(HAND_LRS, losses) == 1e-4
    assert sg.steep(HAND_LRS, losses) == 1e-4
    assert sg.valley(HAND_LRS, losses) == 1e-5  # lds 1,2,3: max_end=2, max_start=-1, idx=-1+1+0


def test_steepest_and_steepest_log_on_a_hand_computed_curve():
    # Lightning window [10:-1] = indices 10..12: lrs [1, 2, 10], losses [3, 2, 0]
    lrs = [0.01 * (i + 1) for i in range(10)] + [1.0, 2.0, 10.0, 20.0]
    losses = [5.0] * 10 + [3.0, 2.0, 0.0, -100.0]
    # d loss / d lr: [-1, -8/9*3 + 7/8*2 + 1/72*0, -2/8] = [-1, -0.9167, -0.25] -> lr 1.0
    assert sg.steepest(lrs, losses) == 1.0
    # unit spacing: [-1, -1.5, -2] -> index 2 -> lr 10.0
    assert sg.steepest_log(lrs, losses) == 10.0


def test_steepest_log_keeps_lightnings_index_offset_after_dropping_non_finite_losses():
    lrs = [0.01 * (i + 1) for i in range(10)] + [1.0, 2.0, 3.0, 4.0, 5.0]
    losses = [5.0] * 10 + [4.0, math.nan, 3.0, 0.0, 9.0]
    # finite window [4, 3, 0]: unit gradient argmin 2 -> Lightning < 2.5.3 returns lr[2 + 10] = 3.0 (not 4.0)
    assert sg.steepest_log(lrs, losses) == 3.0 == lightning_old_suggestion(lrs, losses)
    # Lightning >= 2.5.3 maps the index back correctly: gradient vs lrs [1, 3, 4] = [-0.5, -2.1667, -3] -> 4.0
    assert sg.steepest(lrs, losses) == 4.0 == lightning_suggestion(lrs, losses)


def test_torch_lr_finder_on_a_hand_computed_curve():
    lrs = [i / 100 for i in range(18)]
    losses = [5.0] * 10 + [3.0, 2.5, 0.5] + [-1.0] * 5  # window [10:-5] = [3, 2.5, 0.5]: gradient [-.5, -1.25, -2]
    assert sg.torch_lr_finder(lrs, losses) == 0.12
    assert sg.torch_lr_finder(lrs[:16], losses[:16]) is None  # 16 points: torch-lr-finder cannot suggest


# --------------------------------------------------------------------------------------------------------- None cases
@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize("n", [0, 1, 5])
def test_every_method_returns_none_on_too_short_curves(name, n):
    lrs, losses = np.geomspace(1e-5, 1, n), np.linspace(3, 1, n)
    assert sg.METHODS[name](lrs, losses) is None
    assert oracle(name, lrs, losses) is None


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_returns_none_on_an_all_nan_curve(name):
    """A run stopped at its first step on a NaN (lrfast's own test): one point recorded, no answer."""
    assert sg.METHODS[name](np.geomspace(1e-5, 1, 40), np.full(40, np.nan), steps_run=1) is None


def test_steepest_returns_none_when_fewer_than_two_points_remain():
    lrs = np.geomspace(1e-5, 1, 12)
    assert sg.steepest(lrs, np.linspace(3, 1, 12)) is None  # [10:-1] leaves one point
    assert sg.steepest_log(lrs, np.linspace(3, 1, 12)) is None
    losses = np.linspace(3, 1, 20)
    losses[11:19] = np.inf  # window [10:19] keeps a single finite loss
    assert sg.steepest(np.geomspace(1e-5, 1, 20), losses) is None
    assert sg.steepest_log(np.geomspace(1e-5, 1, 20), losses) is None


def test_steps_run_cuts_the_padding_of_steps_not_run():
    lrs, losses = np.geomspace(1e-5, 1, 13), np.r_[np.linspace(3, 1, 13)]
    padded_lrs, padded_losses = np.r_[lrs, np.geomspace(2, 9, 7)], np.r_[losses, np.full(7, np.nan)]
    # window [10:-1] of the 13 steps run = indices 10, 11 (equal slopes, first wins); the NaN pad is not a step
    assert sg.steepest(padded_lrs, padded_losses, steps_run=13) == sg.steepest(lrs, losses) == lrs[10]
    assert sg.steepest(padded_lrs, padded_losses, steps_run=13) == oracle("steepest", padded_lrs, padded_losses)
    assert sg.torch_lr_finder(padded_lrs, padded_losses, steps_run=13) is None  # 13 steps run < 17
    with pytest.raises(ValueError, match="steps_run"):
        sg.steepest(lrs, losses, steps_run=14)


def test_slide_returns_none_when_the_window_does_not_fit():
    assert sg.slide(HAND_LRS, HAND_LOSSES) is None  # 6 points <= lr_diff=15
    assert sg.slide(HAND_LRS, HAND_LOSSES, lr_diff=5) is not None
    with pytest.raises(ValueError, match="lr_diff"):
        sg.slide(HAND_LRS, HAND_LOSSES, lr_diff=-1)


# ------------------------------------------------------------------------------------------------------ API and errors
def test_mismatched_lengths_raise_value_error_naming_both_arguments():
    with pytest.raises(ValueError, match=r"lrs.*losses.*len\(lrs\)=3.*len\(losses\)=4"):
        sg.valley([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])


def test_non_1d_input_raises_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="losses must be 1-D"):
        sg.steepest(np.ones(20), np.ones((20, 1)))
    with pytest.raises(ValueError, match="lrs must be 1-D"):
        sg.steep(1e-3, 2.0)


def test_unknown_method_error_names_the_argument_the_value_and_the_valid_methods():
    with pytest.raises(ValueError) as info:
        sg.suggest("foo", HAND_LRS, HAND_LOSSES)
    message = str(info.value)
    assert "method='foo'" in message and "suggestion" in message
    assert all(name in message for name in sg.METHODS)


def test_suggest_dispatches_by_name_with_options():
    for name in sg.METHODS:
        assert sg.suggest(name, HAND_LRS, HAND_LOSSES) == sg.METHODS[name](HAND_LRS, HAND_LOSSES)
    assert sg.suggest("slide", HAND_LRS, HAND_LOSSES, lr_diff=2, thresh=0.5) == 1e-3


def test_all_methods_returns_every_method_by_name():
    lrs, losses = make_curve(0, 100, "u_shape")
    result = sg.all_methods(lrs, losses)
    assert list(result) == ["steepest", "steepest_log", "torch_lr_finder", "valley", "slide", "minimum", "steep"]
    assert result == {name: oracle(name, lrs, losses) for name in sg.METHODS}
    assert all(type(v) is float for v in result.values())


def test_inputs_may_be_lists_or_torch_tensors():
    lrs, losses = make_curve(1, 50, "u_shape")
    for name, func in sg.METHODS.items():
        assert func(list(lrs), list(losses)) == func(torch.tensor(lrs), torch.tensor(losses)) == func(lrs, losses)
