"""like=: the range tests of PyTorch Lightning, fastai and torch-lr-finder, reproduced on lrfast's engine, so that on
the same model, weights, batches and optimizer a user gets the peer's own curve and LR (to float rounding).

What differs between the peers, and from lrfast's own test (k = step index from 0, N = steps, b = smoothing):

- lrfast: LRs min*(max/min)^(k/(N-1)); smoothed avg/(1-b^(k+1)); stops at > 4 x best or not finite; 1e-7 -> 10,
  b 0.98; valley.
- lightning: min, then min*(max/min)^((k+1)/N); avg/(1-b^(k+2)); > 4 x best, from k = 1; 1e-8 -> 1, b 0.98;
  steepest on float32 copies.
- fastai: min*(max/min)^(k/N); avg/(1-b^(k+1)) in float32; > 4 x best; 1e-7 -> 10, b 0.98; valley, a float32 LR.
- torch_lr_finder: as lrfast; s0 = loss, s = f*loss + (1-f)*s; > 5 x best; the optimizer's lr -> 10, f 0.05;
  torch_lr_finder.

The peers do not stop on a NaN loss: their lists go on to N with NaN (lrfast stops that candidate and pads it with
NaN, and the suggestion sees the peer's length). Every peer sets all param groups to the same LR (lrfast keeps their
ratios). fastai smooths in float32 with torch.lerp: like="fastai" takes its float32 beta, and smooths in float64
(the rest of fastai's float32 rounding: a few float32 ulp of the smoothed loss)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPTIMIZER_LR = "the optimizer's lr"  # torch-lr-finder starts at the optimizer's own LR


@dataclass(frozen=True)
class Peer:
    name: str
    title: str  # the code it follows
    defaults: dict  # the find options it sets where they are left at lrfast's defaults
    modes: tuple[str, ...]  # the schedules it has
    float32: bool  # its suggestion computes on float32 copies of its lists
    debias: int | None  # smoothed = avg / (1 - b^(k + debias)); None: seeded with the first loss, not debiased


PEERS = {
    "lightning": Peer("lightning", "PyTorch Lightning 2.6 Tuner.lr_find",
                      dict(min_lr=1e-8, max_lr=1.0, early_stop_threshold=4.0, smooth=0.98, suggestion="steepest"),
                      ("exp", "linear"), True, 2),
    "fastai": Peer("fastai", "fastai 2.8 Learner.lr_find",
                   dict(min_lr=1e-7, max_lr=10.0, early_stop_threshold=4.0, smooth=0.98, suggestion="valley"),
                   ("exp",), True, 1),
    "torch_lr_finder": Peer("torch_lr_finder", "torch-lr-finder 0.2 LRFinder.range_test",
                            dict(min_lr=OPTIMIZER_LR, max_lr=10.0, early_stop_threshold=5.0, smooth=0.95,
                                 suggestion="torch_lr_finder"), ("exp", "linear"), False, None),
}  # fmt: skip


def sweep(like: str, min_lr: float, max_lr: float, steps: int, mode: str) -> np.ndarray:
    """The peer's S learning rates, computed with its own Python arithmetic (so they equal its lists bitwise)."""
    lo, hi, n = float(min_lr), float(max_lr), steps
    if like == "lightning":  # _ExponentialLR / _LinearLR: the first step keeps the base LR, then r = (k + 1) / N
        at = [0.0] + [(k + 1) / n for k in range(1, n)]
    elif like == "fastai":  # SchedExp at pos = train_iter / num_it
        at = [k / n for k in range(n)]
    else:  # torch-lr-finder's ExponentialLR / LinearLR: r = k / (N - 1)
        at = [k / (n - 1) for k in range(n)]
    if mode == "exp":
        lrs = [lo if r == 0.0 else lo * (hi / lo) ** r for r in at]
    else:
        lrs = [lo if r == 0.0 else lo + r * (hi - lo) for r in at]
    return np.array(lrs, dtype=np.float64)


def smoothing(like: str | None, smooth: float, steps: int) -> tuple[list[float], list[float], list[float]]:
    """Per step k: (a, c, d) with avg = a*avg + c*loss and smoothed = avg / d, as the peer computes them in Python
    (lrfast's own test: like=None)."""
    if like is not None and PEERS[like].debias is None:  # torch-lr-finder: smooth_f = 1 - smooth, to 15 digits
        f = float(f"{1.0 - smooth:.15g}")
        if f == 0:  # smooth_f = 0: the raw losses
            return [0.0] * steps, [1.0] * steps, [1.0] * steps
        return [0.0] + [1 - f] * (steps - 1), [1.0] + [f] * (steps - 1), [1.0] * steps
    offset = 1 if like is None else PEERS[like].debias
    a = float(np.float32(smooth)) if like == "fastai" else smooth  # fastai: torch.lerp(loss, avg, beta) in float32
    return [a] * steps, [1.0 - a] * steps, [1.0 - smooth ** (k + offset) for k in range(steps)]


def check(like: str | None, mode: str) -> None:
    if like is None:
        return
    if like not in PEERS:
        raise ValueError(f"like={like!r} is not a peer; use one of: {', '.join(PEERS)} (or None: lrfast's own test)")
    if mode not in PEERS[like].modes:
        raise ValueError(f"like={like!r} has no mode={mode!r} schedule; use one of: {', '.join(PEERS[like].modes)}")
