"""LRFindResult: the curves of a range test ([K, S] arrays, NaN where a candidate did not run), its suggestion,
timings and notes, with JSON round-trip and a plot."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from lrfast import peers, strategies
from lrfast import suggest as _suggest

SCHEMA = "lrfast.LRFindResult"
SCHEMA_VERSION = 1


@dataclass
class LRFindResult:
    lrs: np.ndarray  # [K, S] learning rate of candidate k at step t (the largest param group's)
    losses: np.ndarray  # [K, S] raw training loss, NaN where not run
    smoothed: np.ndarray  # [K, S] debiased-EMA loss, NaN where not run
    steps_run: int
    method: str = "valley"
    timings: dict = field(default_factory=dict)  # seconds: setup, steps, total
    info: dict = field(default_factory=dict)
    strategy: str = "sweep"  # "sweep" | "seeds" | "grid" (see lrfast.strategies)
    tolerance: float = 0.05  # grid: suggestion = the largest LR whose score <= best + tolerance * |best|
    val_losses: np.ndarray | None = None  # [K, S] validation loss after step t's update, NaN where not evaluated
    on: str = "train"  # the curve suggestions use: "train" (smoothed training loss) or "val" (validation loss)
    runs: np.ndarray | None = None  # [K] steps candidate k ran (recorded the step it stopped at); None: steps_run each
    like: str | None = None  # the peer whose range test this reproduces (lrfast.peers): its curve lengths, rounding

    def __post_init__(self):
        self.lrs, self.losses, self.smoothed = (np.asarray(a, dtype=np.float64) for a in
                                                (self.lrs, self.losses, self.smoothed))  # fmt: skip
        if self.lrs.ndim == 1:
            self.lrs, self.losses, self.smoothed = self.lrs[None], self.losses[None], self.smoothed[None]
        if not (self.lrs.shape == self.losses.shape == self.smoothed.shape):
            raise ValueError(
                f"lrs, losses and smoothed must have one shape [K, S]; got {self.lrs.shape}, {self.losses.shape}, "
                f"{self.smoothed.shape}"
            )
        if self.strategy not in strategies.STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not a strategy; use one of: "
                             f"{', '.join(strategies.STRATEGIES)}")  # fmt: skip
        if self.val_losses is not None:
            self.val_losses = np.asarray(self.val_losses, dtype=np.float64).reshape(self.lrs.shape)
        if self.on not in ("train", "val") or (self.on == "val" and self.val_losses is None):
            raise ValueError(f"on={self.on!r}: use 'train', or 'val' with a val_loader (validation losses)")
        if self.method not in _suggest.METHODS:
            raise ValueError(f"suggestion={self.method!r} is not a method; use one of: {', '.join(_suggest.METHODS)}")
        steps = self.lrs.shape[1]
        self.runs = np.full(self.k, min(int(self.steps_run), steps), dtype=np.int64) if self.runs is None else \
            np.asarray(self.runs, dtype=np.int64).reshape(self.k)  # fmt: skip
        if self.like is not None and self.like not in peers.PEERS:
            raise ValueError(f"like={self.like!r} is not a peer; use one of: {', '.join(peers.PEERS)}")

    @property
    def k(self) -> int:
        return self.lrs.shape[0]

    @property
    def suggestion(self) -> float | None:
        """The suggested LR, None when there is none. sweep: by `method` (as the peer that defined it computes it);
        seeds: the median of the replicas' suggestions by `method`; grid: the largest LR whose score is within
        `tolerance` of the best score."""
        if self.strategy == "grid":
            return strategies.grid_suggestion(self.lrs[:, 0], self.scores, self.tolerance)
        if self.strategy == "seeds":
            return strategies.median_interval(self.replica_suggestions()[self.method])[0]
        return self.suggest(self.method)

    def why_no_suggestion(self) -> str | None:
        """None when there is a suggestion; else why there is none and what to change (find() puts this in
        info["notes"]; the CLI prints it; the Lightning callback warns with it)."""
        if self.suggestion is not None:
            return None
        total = self.lrs.shape[1]
        stopped = (f"the run stopped at step {self.steps_run} of {total}, where the smoothed loss passed "
                   "early_stop_threshold x its best or was not finite" if self.steps_run < total
                   else f"the run recorded {total} steps")  # fmt: skip
        if self.strategy == "grid":
            return (f"no suggestion: every grid candidate diverged or stopped early ({stopped}), so no score is "
                    "finite; lower max_lr (or pass smaller lrs=[...]), or raise early_stop_threshold")  # fmt: skip
        if self.on == "val":
            lrs, val = self._val_columns()
            recorded = int(np.isfinite(val).sum(axis=1).max()) if val.size else 0
            what = f"{recorded} validation point(s) (every val_every steps)"
            total = lrs.shape[1]
        else:
            recorded = int(np.isfinite(self.smoothed).sum(axis=1).max())
            what = f"{recorded} finite point(s)"
        need, cut = _suggest.points_needed(self.method, total)
        median = " for any replica (seeds: the median of their suggestions)" if self.strategy == "seeds" else ""
        fixes = []
        if self.steps_run < self.lrs.shape[1]:
            fixes += ["start lower (min_lr smaller than where the loss blows up)",
                      "raise early_stop_threshold (or None) if a noisy first loss tripped it",
                      "smooth more (smooth closer to 1) for noisy losses"]  # fmt: skip
        else:
            fixes += [f"run more steps (steps >= {max(need, 2 * need - recorded)})"]
        if self.on == "val":
            fixes.append("score the validation set more often (smaller val_every)")
        fewer = [f"{m} ({n})" for m in _suggest.METHODS if (n := _suggest.points_needed(m, total)[0]) < need]
        if fewer:
            fixes.append(f"or pick a method that needs fewer points: {', '.join(fewer)}")
        return (f"no suggestion{median}: {stopped}, leaving {what}, and suggestion={self.method!r} needs at least "
                f"{need} on a {total}-point curve ({cut}); to get one: {'; '.join(fixes)}")

    @property
    def interval(self) -> tuple[float, float] | None:
        """seeds: the 10th-90th percentile of the replicas' suggestions by `method`; None for other strategies."""
        if self.strategy != "seeds":
            return None
        return strategies.median_interval(self.replica_suggestions()[self.method])[1]

    @property
    def scores(self) -> np.ndarray:
        """grid: [K] mean raw loss over the last 10 % of the steps (on="val": of the evaluations; inf where
        diverged)."""
        return strategies.grid_scores(self._val_columns()[1] if self.on == "val" else self.losses)

    def _val_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(lrs, val_losses) [K, E] at the E steps where the validation set was scored."""
        evaluated = ~np.all(np.isnan(self.val_losses), axis=0)
        return self.lrs[:, evaluated], self.val_losses[:, evaluated]

    def recorded(self, k: int = 0) -> int:
        """How many points of curve(k) candidate k recorded: the steps it ran (the one it stopped at included),
        or with like= the points the peer's own list would hold: the peers do not stop on a NaN loss, so a candidate
        lrfast stopped at a NaN has S points, NaN after it. on="val": the validation scores before it stopped."""
        runs, steps = int(self.runs[k]), self.lrs.shape[1]
        if self.on == "val":
            evaluated = np.flatnonzero(~np.all(np.isnan(self.val_losses), axis=0))
            return int(np.sum(evaluated < (runs if runs == steps else runs - 1)))  # scored after a live step's update
        if self.like is not None and 0 < runs < steps and np.isnan(self.smoothed[k, runs - 1]):
            return steps
        return runs

    def curve(self, k: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(lrs, losses) of candidate k that suggestions use: the smoothed training curve, or (on="val") the
        validation losses at the steps where they were scored."""
        if self.on == "val":
            lrs, val = self._val_columns()
            return lrs[k], val[k]
        return self.lrs[k], self.smoothed[k]

    @property
    def band(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(median, 10th, 90th percentile) of the smoothed curves over the candidates, per step."""
        return strategies.band(self.smoothed)

    def replica_suggestions(self) -> dict[str, list[float | None]]:
        """Every method's suggestion for every candidate: {method: [K values]}."""
        per = [self.suggestions(k) for k in range(self.k)]
        return {m: [p[m] for p in per] for m in _suggest.METHODS}

    def suggest(self, method: str | None = None, k: int = 0) -> float | None:
        """Candidate k's suggestion by `method` (steepest, steepest_log, torch_lr_finder, valley, slide, minimum,
        steep) on the smoothed curve of the steps it ran (on="val": on the validation losses)."""
        return _suggest.suggest(method or self.method, *self.curve(k), **self._rule_options(k))

    def suggestions(self, k: int = 0) -> dict[str, float | None]:
        return _suggest.all_methods(*self.curve(k), **self._rule_options(k))

    def _rule_options(self, k: int) -> dict:
        """The cut at candidate k's recorded points, and the peer's float32 arithmetic under like=."""
        return {"steps_run": self.recorded(k), "float32": self.like is not None and peers.PEERS[self.like].float32}

    def plot(self, path: str | os.PathLike | None = None, ax=None, **kwargs):
        """Log-x loss curve with the suggestion marked; returns the matplotlib Axes. Writes `path` if given."""
        from lrfast.plot import plot_result

        return plot_result(self, path=path, ax=ax, **kwargs)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "method": self.method,
            "strategy": self.strategy,
            "tolerance": self.tolerance,
            "suggestion": self.suggestion,
            "interval": self.interval,
            "steps_run": int(self.steps_run),
            "lrs": _nan_to_none(self.lrs),
            "losses": _nan_to_none(self.losses),
            "smoothed": _nan_to_none(self.smoothed),
            "val_losses": None if self.val_losses is None else _nan_to_none(self.val_losses),
            "on": self.on,
            "runs": self.runs.tolist(),
            "like": self.like,
            "timings": self.timings,
            "info": self.info,
        }

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the result as JSON, atomically (a temp file in the same folder, then rename)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".lrfast-", suffix=".json.tmp", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1, default=_jsonable)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; any other file the user writes follows the umask
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LRFindResult:
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"from_json({os.fspath(path)!r}): not valid JSON ({e}); pass a file written by "
                             "LRFindResult.to_json") from e  # fmt: skip
        return cls.from_dict(d, source=os.fspath(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "dict") -> LRFindResult:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ValueError(f"from_json({source!r}): not an lrfast result (schema != {SCHEMA!r}); pass a file "
                             "written by LRFindResult.to_json")  # fmt: skip
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"from_json({source!r}): schema_version {d.get('schema_version')!r}, this lrfast reads "
                             f"{SCHEMA_VERSION}; re-run the range test or use the lrfast that wrote it")  # fmt: skip
        missing = [key for key in ("lrs", "losses", "smoothed", "steps_run") if key not in d]
        if missing:
            raise ValueError(f"from_json({source!r}): missing field(s) {', '.join(missing)}; the file is truncated "
                             "or was edited")  # fmt: skip
        arrays = [np.array(_none_to_nan(d[key]), dtype=np.float64) for key in ("lrs", "losses", "smoothed")]
        return cls(*arrays, steps_run=int(d["steps_run"]), method=d.get("method", "valley"),
                   timings=d.get("timings", {}), info=d.get("info", {}), strategy=d.get("strategy", "sweep"),
                   tolerance=float(d.get("tolerance", 0.05)), on=d.get("on", "train"), runs=d.get("runs"),
                   like=d.get("like"),
                   val_losses=None if d.get("val_losses") is None else np.array(_none_to_nan(d["val_losses"]),
                                                                                  dtype=np.float64))  # fmt: skip

    def __repr__(self) -> str:
        s = self.suggestion
        sug = "None" if s is None else f"{s:.3g}"
        return (f"LRFindResult(suggestion={sug} ({self.method}), strategy={self.strategy}, "
                f"candidates={self.k}, steps_run={self.steps_run}, "
                f"total={self.timings.get('total', float('nan')):.2f}s)")  # fmt: skip


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _nan_to_none(a: np.ndarray) -> list:
    """JSON has no NaN/inf: NaN (not run) -> null, +-inf -> "inf" / "-inf"."""
    return [[None if math.isnan(x) else (x if math.isfinite(x) else str(x)) for x in row] for row in a.tolist()]


def _none_to_nan(rows) -> list:
    return [[math.nan if x is None else float(x) for x in row] for row in rows]


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
