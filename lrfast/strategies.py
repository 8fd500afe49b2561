"""What K candidates mean, and how their curves become one answer (pure numpy, no torch state touched):

- "sweep": the classic range test, K = 1.
- "seeds": K replicas of one sweep that differ only in randomness: replica k sees the S cached batches in its own
  order (a permutation drawn from (seed, k)) and its own dropout masks. Answer: the median of the replicas'
  suggestions, with an interval (the 10th-90th percentile of them) and a band around the median curve.
- "grid": K fixed LRs, each trained S steps from the same weights on the same batches. Score: mean raw loss over the
  last 10 % of the steps (inf when the candidate diverged or stopped early). Answer: the largest LR whose score is
  within `tolerance` (relative) of the best score: the fastest rate that trains about as well as the best one."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

STRATEGIES = ("sweep", "seeds", "grid")
BAND = (10.0, 90.0)  # percentiles of the seeds band and of result.interval
TAIL = 0.1  # grid score: mean raw loss over this last fraction of the steps


def check(strategy, candidates, lrs, tolerance) -> int:
    """Every strategy argument error, before anything is touched; returns K."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not a strategy; use one of: {', '.join(STRATEGIES)}")
    if lrs is not None:
        if strategy != "grid":
            raise ValueError(f"lrs=... is only for strategy='grid' (got strategy={strategy!r}); pass "
                             "strategy='grid', lrs=[...], or drop lrs")  # fmt: skip
        try:
            values = np.asarray(lrs, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise ValueError(f"lrs={lrs!r} must be a list of positive finite numbers, e.g. lrs=[1e-3, 1e-2]") from e
        if values.size == 0 or not np.all(np.isfinite(values)) or not np.all(values > 0):
            raise ValueError(f"lrs={lrs!r} must be a non-empty list of positive finite numbers, e.g. "
                             "lrs=[1e-3, 3e-3, 1e-2]")  # fmt: skip
        if candidates is not None and candidates != values.size:
            raise ValueError(f"candidates={candidates!r} but lrs has {values.size} values; pass one of them, or "
                             "make them agree")  # fmt: skip
        candidates = values.size
    if candidates is None:
        candidates = {"sweep": 1, "seeds": 8, "grid": 8}[strategy]
    if isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral) or candidates < 1:
        raise ValueError(f"candidates={candidates!r} must be an integer >= 1; e.g. candidates=8")
    if strategy == "grid" and lrs is None and candidates == 1:
        raise ValueError(
            "candidates=1 with strategy='grid': a grid of one LR log-spaced from min_lr to max_lr is max_lr alone, "
            "and a grid compares LRs; pass candidates >= 2, or lrs=[lr] to train one fixed LR of your choice"
        )
    if strategy == "sweep" and candidates > 1:
        raise ValueError(
            f"candidates={candidates} with strategy='sweep': K identical sweeps would give K identical curves; use "
            "strategy='seeds' (K replicas differing in batch order and dropout) or strategy='grid' (K fixed LRs)"
        )
    if not isinstance(tolerance, numbers.Real) or isinstance(tolerance, bool) or not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance={tolerance!r} must be a finite number >= 0 (relative to the best grid score); "
                         "e.g. tolerance=0.05")  # fmt: skip
    return int(candidates)


def orders(strategy: str, k: int, steps: int, seed: int) -> np.ndarray:
    """[K, S] index of the cached batch candidate k trains on at step t: everyone in loader order, except seeds,
    where replica k's order is a permutation drawn from (seed, k), so it does not depend on K."""
    if strategy != "seeds":
        return np.broadcast_to(np.arange(steps), (k, steps))
    return np.stack([np.random.default_rng([seed, j]).permutation(steps) for j in range(k)])


def grid_scores(losses: np.ndarray) -> np.ndarray:
    """[K] mean raw loss over the last TAIL of the steps; inf where a candidate stopped or has a non-finite loss."""
    tail = losses[:, -max(1, int(math.ceil(TAIL * losses.shape[1]))):]
    with np.errstate(all="ignore"):
        scores = tail.mean(axis=1)
    return np.where(np.isfinite(scores), scores, np.inf)


def grid_suggestion(lrs: np.ndarray, scores: np.ndarray, tolerance: float) -> float | None:
    """The largest LR whose score <= best + tolerance * |best|; None when every candidate diverged."""
    best = np.min(scores)
    if not np.isfinite(best):
        return None
    ok = scores <= best + tolerance * abs(best)
    return float(np.max(lrs[ok]))


def band(curves: np.ndarray, q: tuple[float, float] = BAND) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(median, low, high) over candidates, per step, of the candidates still running (NaN where none is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns after every replica stopped
        return np.nanmedian(curves, axis=0), *np.nanpercentile(curves, q, axis=0)


def median_interval(values, q: tuple[float, float] = BAND) -> tuple[float | None, tuple[float, float] | None]:
    """Median and percentile interval of the replicas' suggestions, in log space (LRs are scale quantities);
    replicas without a suggestion are left out."""
    v = np.array([x for x in values if x is not None and x > 0], dtype=np.float64)
    if v.size == 0:
        return None, None
    logs = np.log(v)
    lo, hi = np.percentile(logs, q)
    return float(np.exp(np.median(logs))), (float(np.exp(lo)), float(np.exp(hi)))
