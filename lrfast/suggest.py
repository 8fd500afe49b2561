"""Learning-rate suggestions from one range-test curve, compatible with the suggestion rules of the usual peers.

``steepest`` follows Lightning >= 2.5.3 ``_LRFinder.suggestion`` (d loss / d lr, non-uniform spacing); ``steepest_log``
follows Lightning < 2.5.3 (unit-spacing gradient, its index offset included); ``torch_lr_finder`` follows
torch-lr-finder's ``LRFinder.plot(suggest_lr=True)``; ``valley``, ``slide``, ``minimum`` and ``steep`` follow fastai's
``Learner.lr_find`` preprocessing and its ``SuggestionMethod`` functions.

Every function takes the ``lrs`` and the smoothed ``losses`` of one range test and ``steps_run``: how many of its
points were recorded (an lrfast curve is padded with NaN after the step it stopped at; a NaN recorded before the stop
is a point of the curve, as it is in the peers' lists). The curve is cut there, never at its last finite point, then
the peer's own slicing and NaN handling apply. Without ``steps_run`` the whole curve is taken as recorded. The answer
is a Python float, or ``None`` where the peer has no answer (too few points, empty or all-NaN curve).

fastai and Lightning compute in float32 tensors (``torch.tensor`` of their lists); by default everything here is
float64, so an answer equals the peer's code run in float64, and a float32 run of the peer may break a near-tie
differently. ``float32=True`` computes as the peer does: on float32 copies of the curve (``lrfast.find(like=...)``
does this); then fastai's methods return the float32 LR it returns, Lightning's the recorded float64 LR.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = [
    "METHODS",
    "all_methods",
    "points_needed",
    "minimum",
    "slide",
    "steep",
    "steepest",
    "steepest_log",
    "suggest",
    "torch_lr_finder",
    "valley",
]


def _curve(lrs, losses, steps_run: int | None, float32: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate, convert (float64, or float32 as the peer computes) and cut at the points recorded; also return the
    length before the cut."""
    dtype = np.float32 if float32 else np.float64
    x = np.asarray(lrs, dtype=np.float64).astype(dtype)
    y = np.asarray(losses, dtype=np.float64).astype(dtype)
    for name, arr in (("lrs", x), ("losses", y)):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got an array of shape {arr.shape}")
    if x.shape != y.shape:
        raise ValueError(f"lrs and losses must have the same length, got len(lrs)={x.size} and len(losses)={y.size}")
    full = y.size
    if steps_run is None:
        return x, y, full
    if isinstance(steps_run, bool) or not 0 <= int(steps_run) <= full or int(steps_run) != steps_run:
        raise ValueError(f"steps_run={steps_run!r} must be an integer from 0 to the curve's {full} points")
    return x[: int(steps_run)], y[: int(steps_run)], full


def steepest(lrs, losses, skip_begin: int = 10, skip_end: int = 1, *, steps_run: int | None = None,
             float32: bool = False) -> float | None:  # fmt: skip
    """Lightning >= 2.5.3: lr at the most negative ``torch.gradient(losses, spacing=[lrs])`` over the finite points
    of ``[skip_begin:-skip_end]``. ``np.gradient(y, x)`` is bit-identical to ``torch.gradient`` with coordinates.
    The answer is the recorded LR (float64, as Lightning returns ``results["lr"][idx]``)."""
    x, y, _ = _curve(lrs, losses, steps_run, float32)
    index = np.arange(y.size)[skip_begin:-skip_end]
    x, y = x[skip_begin:-skip_end], y[skip_begin:-skip_end]
    finite = np.isfinite(y)
    x, y, index = x[finite], y[finite], index[finite]
    if y.size < 2:
        return None
    with np.errstate(all="ignore"):
        return float(np.asarray(lrs, dtype=np.float64)[index[np.argmin(np.gradient(y, x))]])


def steepest_log(lrs, losses, skip_begin: int = 10, skip_end: int = 1, *, steps_run: int | None = None,
                 float32: bool = False) -> float | None:  # fmt: skip
    """Lightning < 2.5.3: argmin of the unit-spacing gradient over the finite losses of ``[skip_begin:-skip_end]``,
    returned as ``lrs[argmin + skip_begin]`` exactly as Lightning indexes it (shifted when NaN/inf were dropped)."""
    x, y, _ = _curve(lrs, losses, steps_run, float32)
    x = np.asarray(lrs, dtype=np.float64)[: x.size]
    y = y[skip_begin:-skip_end]
    y = y[np.isfinite(y)]
    if y.size < 2:
        return None
    with np.errstate(all="ignore"):
        return float(x[int(np.argmin(np.gradient(y))) + skip_begin])


def torch_lr_finder(lrs, losses, skip_start: int = 10, skip_end: int = 5, *, steps_run: int | None = None,
                    float32: bool = False) -> float | None:  # fmt: skip
    """torch-lr-finder: ``lrs[argmin(np.gradient(losses))]`` over ``[skip_start:-skip_end]`` (no NaN filtering);
    ``None`` where it cannot compute the gradient (fewer than 2 points left: a curve under 17 points by default)."""
    if skip_start < 0 or skip_end < 0:
        raise ValueError(f"skip_start and skip_end cannot be negative, got {skip_start} and {skip_end}")
    x, y, _ = _curve(lrs, losses, steps_run, float32)
    window = slice(skip_start, None if skip_end == 0 else -skip_end)
    x, y = x[window], y[window]
    if y.size < 2:
        return None
    with np.errstate(all="ignore"):
        return float(x[np.argmin(np.gradient(y))])


def _fastai_curve(lrs, losses, num_it: int | None, steps_run: int | None, float32: bool):
    """fastai ``lr_find``: ``[num_it//10:-5]`` of the steps run, then cut at the first NaN loss.

    fastai slices with the *requested* ``num_it``, not with the number of steps run; the default here is the length
    of the curve as given (padding included), which is ``num_it`` for an lrfast curve padded with NaNs."""
    x, y, full = _curve(lrs, losses, steps_run, float32)
    start = (full if num_it is None else num_it) // 10
    x, y = x[start:-5], y[start:-5]
    nan = np.flatnonzero(np.isnan(y))
    if nan.size:
        x, y = x[: nan[0]], y[: nan[0]]
    return x, y


def valley(lrs, losses, num_it: int | None = None, *, steps_run: int | None = None,
           float32: bool = False) -> float | None:  # fmt: skip
    """fastai ``valley``: the lr 1/3 + 1/6 into the longest strictly decreasing run (fastai's index arithmetic,
    including ``max_start = max_end - lds[max_end]`` and negative-index wrap-around)."""
    x, y = _fastai_curve(lrs, losses, num_it, steps_run, float32)
    n = y.size
    if n == 0:
        return None
    lds = np.ones(n, dtype=np.int64)
    max_start, max_end = 0, 0
    for i in range(1, n):
        longer = lds[:i][y[:i] > y[i]]
        if longer.size:
            lds[i] = longer.max() + 1
        # fastai updates max_end inside its j loop; lds[i] can only pass lds[max_end] by reaching its final value.
        if lds[max_end] < lds[i]:
            max_end = i
            max_start = max_end - int(lds[max_end])
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(x[idx])


def slide(lrs, losses, lr_diff: int = 15, thresh: float = 0.005, adjust_value: float = 1.0,
          num_it: int | None = None, *, steps_run: int | None = None,
          float32: bool = False) -> float | None:  # fmt: skip
    """fastai ``slide``: slide a window of ``lr_diff`` points down from the end of ``np.gradient(losses)`` while the
    gradients at its ends differ by more than ``thresh``; return the last left-end lr times ``adjust_value``."""
    if lr_diff < 0:
        raise ValueError(f"lr_diff must be >= 0, got {lr_diff}")
    x, y = _fastai_curve(lrs, losses, num_it, steps_run, float32)
    if y.size < 2 or y.size <= lr_diff:  # fastai raises here (np.gradient / lrs[l_idx] out of range)
        return None
    r_idx = -1
    l_idx = r_idx - lr_diff
    local_min_lr = x[l_idx]
    with np.errstate(all="ignore"):
        grad = np.gradient(y)
        while (l_idx >= -y.size) and (abs(grad[r_idx] - grad[l_idx]) > thresh):
            local_min_lr = x[l_idx]
            r_idx -= 1
            l_idx -= 1
    return float(local_min_lr) * adjust_value


def minimum(lrs, losses, num_it: int | None = None, *, steps_run: int | None = None,
            float32: bool = False) -> float | None:  # fmt: skip
    """fastai ``minimum``: one tenth of the lr at the lowest loss (first one on ties)."""
    x, y = _fastai_curve(lrs, losses, num_it, steps_run, float32)
    if y.size == 0:
        return None
    return float(x[np.argmin(y)]) / 10


def steep(lrs, losses, num_it: int | None = None, *, steps_run: int | None = None,
          float32: bool = False) -> float | None:  # fmt: skip
    """fastai ``steep``: lr at the start of the steepest forward difference of loss against ln(lr)."""
    x, y = _fastai_curve(lrs, losses, num_it, steps_run, float32)
    if y.size < 2:
        return None
    with np.errstate(all="ignore"):
        grads = (y[1:] - y[:-1]) / (np.log(x[1:]) - np.log(x[:-1]))
    return float(x[np.argmin(grads)])


METHODS: dict[str, Callable[..., float | None]] = {
    "steepest": steepest,
    "steepest_log": steepest_log,
    "torch_lr_finder": torch_lr_finder,
    "valley": valley,
    "slide": slide,
    "minimum": minimum,
    "steep": steep,
}


# Methods that pick poorly on lrfast's own curves (debiased EMA, both endpoints hit): the suggestion-quality benchmark
# (benchmarks/results/cpu/quality.md: validation loss after 200-300 constant-LR steps, 4 workloads x 5 seeds) has
# their mean regret ((loss at the suggestion - best loss) / best loss) at 4.6 (steep) to 16.7 (steepest), against 0.34
# for valley. They stay
# for comparison (and each is right on its own peer's curve: like=); find() says so in its notes.
POOR_ON_LRFAST_CURVES = {"steepest": 16.70, "slide": 8.25, "steepest_log": 6.63, "torch_lr_finder": 5.32, "steep": 4.57}


def points_needed(method: str, steps: int) -> tuple[int, str]:
    """(the fewest recorded points of a `steps`-step curve with which `method`, default options, can answer; the
    peer's cut that sets it). Fewer finite points than that always give None."""
    fastai = steps // 10 + 5  # fastai cuts [num_it // 10 : -5]
    need = {
        "steepest": (13, "Lightning drops the first 10 and the last point, then needs 2"),
        "steepest_log": (13, "Lightning drops the first 10 and the last point, then needs 2"),
        "torch_lr_finder": (17, "torch-lr-finder drops the first 10 and the last 5, then needs 2"),
        "valley": (fastai + 1, "fastai drops the first 10 % of the steps and the last 5"),
        "minimum": (fastai + 1, "fastai drops the first 10 % of the steps and the last 5"),
        "steep": (fastai + 2, "fastai drops the first 10 % of the steps and the last 5, then needs 2"),
        "slide": (fastai + 16, "fastai drops the first 10 % of the steps and the last 5, then slides a window of 15"),
    }
    if method not in need:
        raise ValueError(f"suggestion method={method!r} is not a known method; use one of: {', '.join(METHODS)}")
    return need[method]


def suggest(method: str, lrs, losses, **options) -> float | None:
    """Run the suggestion method named ``method`` (a key of ``METHODS``) with its ``options``."""
    try:
        func = METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"suggestion method={method!r} is not a known method; use one of: {', '.join(METHODS)}"
        ) from None
    return func(lrs, losses, **options)


def all_methods(lrs, losses, **options) -> dict[str, float | None]:
    """Every method of ``METHODS`` with its default options (and ``options``: steps_run, float32), by name."""
    return {name: func(lrs, losses, **options) for name, func in METHODS.items()}
