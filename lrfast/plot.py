"""matplotlib plots of a range test: loss vs LR on a log axis, the suggestion marked. sweep: the curve; seeds: the
median curve, the 10th-90th percentile band over replicas and the suggestion's interval; grid: score vs LR (left)
and the K training curves (right)."""

from __future__ import annotations

import os

import numpy as np


def plot_result(result, path: str | os.PathLike | None = None, ax=None, raw: bool = True, methods=None):
    """Draw `result` on `ax` (a new figure when None) and save it to `path` if given; returns the Axes (grid: the
    score Axes; pass ax=(score_ax, curves_ax) to place both panels, a single Axes draws the scores only).
    sweep: the smoothed curve, the raw losses faintly, a marker at the suggestion (and at each of `methods`)."""
    panels = 2 if result.strategy == "grid" and ax is None else 1
    if ax is None and path is not None:  # a figure of its own, no pyplot: no GUI backend, no global state
        from matplotlib.figure import Figure

        ax = Figure(figsize=(6.4 * panels, 4.2)).subplots(1, panels)
    elif ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(1, panels, figsize=(6.4 * panels, 4.2))
    axes = list(np.atleast_1d(ax))
    if result.strategy == "grid":
        _grid(result, axes)
    elif result.strategy == "seeds":
        _seeds(result, axes[0], raw)
    else:
        _sweep(result, axes[0], raw, methods)
    for a in axes:
        a.set_xscale("log")
        a.set_xlabel("learning rate" if a is axes[0] else "step")
        a.legend(loc="best", fontsize=8)
    if len(axes) > 1:
        axes[1].set_xscale("linear")
    if path is not None:
        axes[0].figure.savefig(os.fspath(path), dpi=120, bbox_inches="tight")
    return axes[0]


def _sweep(result, ax, raw, methods) -> None:
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
    _limit_y(ax, result.smoothed)
    ax.set_ylabel("loss")
    ax.set_title(f"LR range test ({result.steps_run} steps)")


def _seeds(result, ax, raw) -> None:
    lrs = result.lrs[0]
    median, lo, hi = result.band
    if raw:
        for k in range(result.k):
            ax.plot(lrs, result.smoothed[k], color="C0", alpha=0.15, lw=0.6)
    ran = ~np.isnan(median)
    ax.fill_between(lrs[ran], lo[ran], hi[ran], color="C0", alpha=0.25, label="10th-90th percentile")
    ax.plot(lrs[ran], median[ran], color="C0", lw=1.8, label=f"median of {result.k} replicas")
    lr, interval = result.suggestion, result.interval
    if interval is not None:
        ax.axvspan(*interval, color="C3", alpha=0.12, label=f"interval {interval[0]:.3g}-{interval[1]:.3g}")
    if lr is not None:
        ax.axvline(lr, color="C3", lw=1.2, label=f"{result.method} (median): {lr:.3g}")
    ax.set_ylabel("smoothed loss")
    ax.set_title(f"LR range test, {result.k} seeds ({result.steps_run} steps)")


def _grid(result, axes) -> None:
    lrs, scores = result.lrs[:, 0], result.scores
    finite = np.isfinite(scores)
    ax = axes[0]
    ax.plot(lrs[finite], scores[finite], "o-", color="C0", label="score (mean loss, last 10 % of steps)")
    if (~finite).any():
        top = scores[finite].max() if finite.any() else 1.0
        ax.plot(lrs[~finite], np.full((~finite).sum(), top), "x", color="C3", ms=8, label="diverged")
    lr = result.suggestion
    if lr is not None:
        ax.axvline(lr, color="C3", lw=1.2, label=f"suggestion (tolerance {result.tolerance:g}): {lr:.3g}")
    ax.set_ylabel("score")
    ax.set_title(f"LR grid, {result.k} candidates ({result.lrs.shape[1]} steps each)")
    if len(axes) > 1:
        for k in range(result.k):
            axes[1].plot(result.losses[k], color=f"C{k % 10}", lw=1.0, label=f"lr {lrs[k]:.3g}")
        axes[1].set_ylabel("loss")
        axes[1].set_title("training curves")


def _limit_y(ax, smoothed) -> None:
    """Scale the y axis to the smoothed curves: a raw loss spiking 40x at divergence would flatten the curve."""
    finite = smoothed[np.isfinite(smoothed)]
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
        ax.set_ylim(lo - pad, hi + pad)
