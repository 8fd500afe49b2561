"""matplotlib plot of a range test: loss vs LR on a log axis, the suggestion marked."""

from __future__ import annotations

import os

import numpy as np


def plot_result(result, path: str | os.PathLike | None = None, ax=None, raw: bool = True, methods=None):
    """Draw `result` on `ax` (a new figure when None): the smoothed curve of each candidate, the raw losses
    faintly, and a marker at the suggestion (and at each of `methods`, if given). Saves to `path` if given."""
    if ax is None and path is not None:  # a figure of its own, no pyplot: no GUI backend, no global state
        from matplotlib.figure import Figure

        ax = Figure(figsize=(6.4, 4.2)).subplots()
    elif ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6.4, 4.2))
    for k in range(result.k):
        ran = ~np.isnan(result.smoothed[k])
        lrs = result.lrs[k][ran]
        if raw:
            ax.plot(lrs, result.losses[k][ran], color=f"C{k % 10}", alpha=0.25, lw=0.8)
        ax.plot(lrs, result.smoothed[k][ran], color=f"C{k % 10}", lw=1.6,
                label="smoothed loss" if result.k == 1 else f"candidate {k}")  # fmt: skip
    marks = [result.method] + [m for m in (methods or []) if m != result.method]
    for i, method in enumerate(marks):
        lr = result.suggest(method)
        if lr is None:
            continue
        t = int(np.nanargmin(np.abs(np.log(result.lrs[0]) - np.log(lr))))
        ax.plot([lr], [result.smoothed[0][t]], "o", ms=8, color=f"C{(i + 3) % 10}",
                label=f"{method}: {lr:.3g}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(f"LR range test ({result.steps_run} steps)")
    ax.legend(loc="best", fontsize=8)
    if path is not None:
        ax.figure.savefig(os.fspath(path), dpi=120, bbox_inches="tight")
    return ax
