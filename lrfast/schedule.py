"""LR tables [K, S]: one exponential or linear sweep from min_lr to max_lr, both endpoints hit exactly."""

from __future__ import annotations

import numpy as np

MODES = ("exp", "linear")


def sweep(min_lr: float, max_lr: float, steps: int, mode: str = "exp") -> np.ndarray:
    """The S learning rates of one range test (float64). exp: min*(max/min)^(i/(S-1)), as torch-lr-finder;
    linear: evenly spaced. lr[0] == min_lr and lr[-1] == max_lr exactly."""
    if mode == "exp":
        lrs = np.geomspace(min_lr, max_lr, steps)
    elif mode == "linear":
        lrs = np.linspace(min_lr, max_lr, steps)
    else:
        raise ValueError(f"mode={mode!r} is not a schedule; use one of: {', '.join(MODES)}")
    lrs[0], lrs[-1] = min_lr, max_lr
    return lrs


def table(min_lr: float, max_lr: float, steps: int, mode: str = "exp", k: int = 1) -> np.ndarray:
    """[K, S] table: candidate k's learning rate at step t. K copies of the same sweep."""
    return np.ascontiguousarray(np.broadcast_to(sweep(min_lr, max_lr, steps, mode), (k, steps)))


def grid(min_lr: float, max_lr: float, k: int, steps: int, lrs=None) -> np.ndarray:
    """[K, S] table of K fixed learning rates, log-spaced from min_lr to max_lr (both hit), or `lrs` as given."""
    values = np.asarray(lrs, dtype=np.float64) if lrs is not None else np.geomspace(min_lr, max_lr, k)
    if lrs is None:
        values[0], values[-1] = min_lr, max_lr
    return np.ascontiguousarray(np.repeat(values[:, None], steps, axis=1))
