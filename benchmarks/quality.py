"""Suggestion quality: how good is each LR finder's suggestion, measured against the outcome of real training?

Ground truth per workload: the validation loss (on a held-out 20 % of the data, never trained on) after N steps of
training at a constant LR with the workload's optimizer, for every LR of a dense log grid and several seeds (a seed
sets the model's init and the batch order), run as K candidates in one lrfast grid pass per seed (`strategy="grid",
lrs=grid, val_every=N`: the validation set is scored after the last update). A candidate whose validation loss is
not finite (diverged) or is above the untrained model's (same seed) counts as the untrained model's: the cap, "no
better than not training". The outcome curve is the mean over the seeds per LR.

Contestants, on the same workloads, data and optimizer, each over several seeds: lrfast's sweep (its default range
exp 1e-7 -> 10, 100 steps; the one run scored by every method of lrfast.suggest.METHODS), lrfast strategy="seeds"
(8 replicas, the median valley), lrfast strategy="grid" (8 LRs over the sweep range, 100 steps), lrfast's peer-exact
modes like="lightning" | "fastai" | "torch_lr_finder", Lightning's own `Tuner.lr_find` and torch-lr-finder (each
with its own defaults). Per contestant and workload: the suggestion per seed; its regret = (outcome at the
suggestion - best outcome) / |best outcome|, the outcome interpolated linearly in log10(LR) on the mean curve (a
suggestion outside the grid is clamped to the grid's edge and counted in `clamped`; no suggestion is a failure); the
mean and max regret over the seeds; the spread = max - min of log10(suggestion) over the seeds (decades); wall
seconds per call.

Workloads (tasks()): mlp (digits MLP, Adam, N 300), lenet (LeNet-5 on digits 28x28, Adam, N 300), chargpt (a 2x64
char GPT on stdlib bytes, ctx 32, AdamW, N 200), cnn (a BatchNorm CNN on noisy CIFAR-like 16x16 images, SGD momentum
0.9, N 200); torch's defaults otherwise. Ground-truth LRs: 19 over 6 decades (1e-6 -> 1; SGD 1e-5 -> 10). Seeds
0..T-1 for the truth, 0..S-1 for each contestant; the validation loss is the mean over the held-out samples scored.

Rows go to benchmarks/results/<device>/quality.csv (one per workload x contestant x method) and quality_truth.csv
(workload, lr, seed, outcome); quality.md and quality.png are rendered from the two CSVs (--quick: into a temp
folder unless --out). Every part's time is printed, so the sizes can be tuned to the machine (a full run measured
12-15 minutes on the shared 2-core CPU).

    python -m benchmarks.quality [--device cpu|cuda] [--workloads mlp,lenet,chargpt,cnn] [--seeds 5]
        [--truth-seeds 3] [--contestants lrfast_sweep,...] [--quick] [--out DIR] [--threads N]
    python -m benchmarks.quality --render benchmarks/results/cpu/quality.csv
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrfast
from benchmarks import contestants as C
from benchmarks import report
from benchmarks import workloads as W

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("mlp", "lenet", "chargpt", "cnn")
VAL_FRACTION, SPLIT_SEED = 0.2, 1234  # the held-out split: the last 20 % of one fixed permutation
CNN_NOISE = 5.0  # the BN CNN's images: 0.5 x class pattern + 5 x unit noise (noise 1: validation loss 1e-4 at best)
QUICK_STEPS = 30  # --quick: ground-truth N and every finder's steps (the full run keeps each finder's default)
# the LR of every optimizer built here: torch-lr-finder and like="torch_lr_finder" start their range there (its
# README's example); the other finders set the LR themselves
OPTIMIZER_LR = 1e-7
PEER_LIKE = ("lightning", "fastai", "torch_lr_finder")
CONTESTANTS = ("lrfast_sweep", "lrfast_seeds", "lrfast_grid", *(f"lrfast_like_{p}" for p in PEER_LIKE), "lightning",
               "torch_lr_finder")  # fmt: skip
# the rows of each contestant: one per suggestion method it reports
METHODS = {"lrfast_sweep": tuple(lrfast.suggest.METHODS), "lrfast_seeds": ("median valley of 8 replicas",),
           "lrfast_grid": ("grid K=8 (largest LR within 5 % of the best score)",),
           **{f"lrfast_like_{p}": (f"like={p!r}",) for p in PEER_LIKE},
           "lightning": ("suggestion() (steepest)",), "torch_lr_finder": ("plot() suggestion (steepest)",)}  # fmt: skip
COLUMNS = [
    "workload", "contestant", "method", "seeds", "suggestions", "median_suggestion", "mean_regret", "max_regret",
    "spread_decades", "failures", "clamped", "wall_s_per_call", "best_lr", "best_outcome", "optimizer",
    "truth_steps", "truth_seeds", "truth_lrs", "grid_min_lr", "grid_max_lr", "finder_range", "note", "model",
    "batch_size", "val_samples", "quick", *report.CONDITIONS, "lightning", "torch_lr_finder",
]  # fmt: skip
TRUTH_COLUMNS = ["workload", "lr", "seed", "outcome", "val_loss", "capped", "init_loss", "optimizer", "steps",
                 "batch_size", "val_samples", *report.CONDITIONS]  # fmt: skip


def _adam(params, lr):
    return torch.optim.Adam(params, lr=lr)


def _adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr)


def _sgd_momentum(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


@dataclass(frozen=True)
class Task(W.Workload):
    """A workload (benchmarks/workloads.Workload: `steps` is N, the ground truth's training steps at each constant
    LR; `optimizer` in words, for the CSV) with what the ground truth needs."""

    make_optimizer: Callable | None = None  # (params, lr) -> torch.optim.Optimizer
    grid: tuple[float, float, int] = (1e-6, 1.0, 19)  # the ground truth's LRs: np.geomspace(*grid)
    val_n: int = 359  # held-out samples scored, in one batch

    @property
    def lrs(self) -> np.ndarray:
        return np.geomspace(*self.grid)


def tasks(quick: bool = False) -> dict[str, Task]:
    """The workloads, full size or tiny (--quick). Full, on the shared 2-core CPU (3 truth seeds, 5 per contestant):
    mlp ~35 s, lenet ~5-8 min (its K = 19 vmap pass: 75-120 s a seed), chargpt ~4 min, cnn ~2 min."""
    data = W.lrfast_data()
    n = (lambda full: QUICK_STEPS) if quick else (lambda full: full)
    adam_grid = (1e-5, 1e-1, 9) if quick else (1e-6, 1.0, 19)
    hidden, lenet_batch = (32, 16) if quick else (256, 64)
    ctx, layers, width, heads, gpt_batch = (16, 1, 32, 2, 8) if quick else (32, 2, 64, 2, 16)
    cnn_width, images, cnn_batch = (4, 640, 16) if quick else (8, 2560, 64)
    return {
        "mlp": Task("mlp", f"digits MLP 64-{hidden}-{hidden}-10", data.digits, partial(data.mlp, hidden=hidden), 64,
                    n(300), "Adam (torch defaults)", make_optimizer=_adam, grid=adam_grid, val_n=359),
        "lenet": Task("lenet", "LeNet-5, digits 28x28", partial(data.digits, 28), data.lenet5, lenet_batch, n(300),
                      "Adam (torch defaults)", make_optimizer=_adam, grid=adam_grid, val_n=359),
        "chargpt": Task("chargpt", f"char GPT {layers}x{width}, ctx {ctx}, stdlib bytes", partial(W.stdlib_bytes, ctx),
                        partial(W.GPT, 256, ctx, layers, width, heads), gpt_batch, n(200), "AdamW (torch defaults)",
                        loss=W.lm_loss, make_optimizer=_adamw, grid=adam_grid, val_n=64 if quick else 256),
        "cnn": Task("cnn", f"BatchNorm CNN (width {cnn_width}), CIFAR-like generated, noise {CNN_NOISE:g}, pooled to "
                    "16x16", partial(pooled_images, images), partial(W.bn_cnn, width=cnn_width), cnn_batch, n(200),
                    "SGD momentum 0.9", make_optimizer=_sgd_momentum,
                    grid=(1e-4, 1.0, 9) if quick else (1e-5, 10.0, 19), val_n=128 if quick else 512),
    }  # fmt: skip


@dataclass(frozen=True)
class Options:
    device: str = "cpu"
    quick: bool = False

    @property
    def steps(self) -> dict:
        """The finders' steps: their own defaults, QUICK_STEPS under --quick."""
        return {"steps": QUICK_STEPS} if self.quick else {}


# ---------------------------------------------------------------------------------------------- data


def split(dataset: TensorDataset) -> tuple[TensorDataset, TensorDataset]:
    """(train, held-out): the held-out part is the last VAL_FRACTION of a fixed permutation, never trained on."""
    n = len(dataset)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    cut = n - int(round(VAL_FRACTION * n))
    return (TensorDataset(*(t[perm[:cut]] for t in dataset.tensors)),
            TensorDataset(*(t[perm[cut:]] for t in dataset.tensors)))  # fmt: skip


def pooled_images(n: int) -> TensorDataset:
    """workloads.cifar_like with CNN_NOISE x the noise (a best validation loss near 0.7, not 1e-4: a relative regret
    needs one), 2x2 average-pooled to 16x16 (4x fewer FLOPs; the class patterns are 8x8 upsampled, nothing lost)."""
    x, y = W.cifar_like(n, noise=CNN_NOISE).tensors
    return TensorDataset(F.avg_pool2d(x, 2), y)


def val_loader(task: Task, val: TensorDataset) -> DataLoader:
    return DataLoader(TensorDataset(*(t[: task.val_n] for t in val.tensors)), batch_size=task.val_n)


def fresh(task: Task, train: TensorDataset, seed: int, device: str):
    """The seed's model (torch.manual_seed(seed) before it is built) and its shuffled loader (seeded generator)."""
    torch.manual_seed(seed)
    model = task.model().to(device)
    return model, W.lrfast_data().loader(train, batch_size=task.batch_size, shuffle=True, seed=seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss: Callable, device: str) -> float:
    """Mean loss over the loader's batches in eval mode, as lrfast scores its val_loader."""
    model.eval()
    try:
        losses = [float(loss(model(x.to(device)), y.to(device))) for x, y in loader]
    finally:
        model.train()
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------- ground truth


def ground_truth(task: Task, train, val, seeds, o: Options) -> list[dict]:
    """Rows (workload, lr, seed, outcome, ...): the capped validation loss after task.steps steps at each LR."""
    rows, lrs, vl = [], task.lrs, val_loader(task, val)
    for seed in seeds:
        model, loader = fresh(task, train, seed, o.device)
        init = evaluate(model, vl, task.loss, o.device)
        res = lrfast.find(model, loader, optimizer=partial(task.make_optimizer, lr=OPTIMIZER_LR), loss_fn=task.loss,
                          strategy="grid", lrs=lrs.tolist(), steps=task.steps, val_loader=vl, val_batches=1,
                          val_every=task.steps, early_stop_threshold=None, progress=False, seed=seed,
                          device=o.device)  # fmt: skip
        for lr, v in zip(lrs, np.asarray(res.val_losses)[:, -1]):  # the last column: after the last update
            capped = not (math.isfinite(v) and v <= init)
            rows.append({"workload": task.name, "lr": float(lr), "seed": seed, "outcome": init if capped else float(v),
                         "val_loss": float(v), "capped": int(capped), "init_loss": init})  # fmt: skip
    return rows


def mean_curve(truth_rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(lrs ascending, mean outcome over the seeds per LR) from truth rows (in memory or read from the CSV)."""
    by: dict[float, list[float]] = {}
    for r in truth_rows:
        by.setdefault(float(r["lr"]), []).append(float(r["outcome"]))
    lrs = np.array(sorted(by))
    return lrs, np.array([np.mean(by[lr]) for lr in lrs])


def score(suggestions: list, lrs: np.ndarray, curve: np.ndarray) -> dict:
    """Regret (mean, max), spread, failures and clamped count of one contestant's suggestions (one per seed)."""
    ok = [s for s in suggestions if s is not None and math.isfinite(s) and s > 0]
    x, grid = np.log10(np.array(ok, dtype=float)), np.log10(lrs)
    best = float(np.min(curve))
    regret = (np.interp(np.clip(x, grid[0], grid[-1]), grid, curve) - best) / max(abs(best), 1e-12)
    return {
        "failures": len(suggestions) - len(ok), "clamped": int(np.sum((x < grid[0]) | (x > grid[-1]))),
        "mean_regret": float(regret.mean()) if ok else None, "max_regret": float(regret.max()) if ok else None,
        "spread_decades": float(x.max() - x.min()) if ok else None,
        "median_suggestion": float(statistics.median(ok)) if ok else None,
        "best_lr": float(lrs[int(np.argmin(curve))]), "best_outcome": best,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- contestants
# Each runs one finder on (model, loader) and returns {method: suggestion or None} for the methods in METHODS.


def _lrfast(model, loader, task: Task, seed: int, o: Options, **kw) -> lrfast.LRFindResult:
    return lrfast.find(model, loader, optimizer=partial(task.make_optimizer, lr=OPTIMIZER_LR), loss_fn=task.loss,
                       seed=seed, device=o.device, progress=False, **o.steps, **kw)  # fmt: skip


def run_sweep(model, loader, task, seed, o):
    return _lrfast(model, loader, task, seed, o).suggestions()


def run_seeds(model, loader, task, seed, o):
    return {METHODS["lrfast_seeds"][0]: _lrfast(model, loader, task, seed, o, strategy="seeds",
                                                candidates=8).suggestion}  # fmt: skip


def run_grid(model, loader, task, seed, o):
    return {METHODS["lrfast_grid"][0]: _lrfast(model, loader, task, seed, o, strategy="grid", candidates=8).suggestion}


def run_like(model, loader, task, seed, o, peer: str):
    return {f"like={peer!r}": _lrfast(model, loader, task, seed, o, like=peer).suggestion}


@cache
def _lightning_class():
    import pytorch_lightning as pl

    class Wrapped(pl.LightningModule):
        def __init__(self, net, task):
            super().__init__()
            self.net, self.task = net, task

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.task.loss(self.net(x), y)

        def configure_optimizers(self):
            return self.task.make_optimizer(self.parameters(), OPTIMIZER_LR)  # lr_find sets the LR itself

    return Wrapped


def run_lightning(model, loader, task, seed, o):
    import pytorch_lightning as pl
    from pytorch_lightning.tuner import Tuner

    steps = o.steps.get("steps", 100)  # lr_find's num_training default is 100
    # it saves a checkpoint into default_root_dir: a scratch directory that goes away (as benchmarks/contestants.py)
    with tempfile.TemporaryDirectory(prefix="lrfast-bench-lightning-") as scratch, contextlib.chdir(scratch), \
            C._quiet():  # fmt: skip
        trainer = pl.Trainer(accelerator="gpu" if o.device.startswith("cuda") else "cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             max_epochs=math.ceil(steps / max(1, len(loader))) + 1, default_root_dir=scratch)
        finder = Tuner(trainer).lr_find(_lightning_class()(model, task), train_dataloaders=loader, update_attr=False,
                                        **({"num_training": steps} if o.quick else {}))  # fmt: skip
        return {METHODS["lightning"][0]: finder.suggestion()}


def run_torch_lr_finder(model, loader, task, seed, o):
    from torch_lr_finder import LRFinder

    finder = LRFinder(model, task.make_optimizer(model.parameters(), OPTIMIZER_LR), task.loss, device=o.device)
    with C._quiet():  # it prints and draws a tqdm bar with no switch to turn them off
        finder.range_test(loader, **({"num_iter": QUICK_STEPS} if o.quick else {}))
    finder.reset()
    lrs, losses = finder.history["lr"], finder.history["loss"]
    # its suggestion lives in plot(): lrs[10:-5][argmin(np.gradient(losses[10:-5]))], the same maths without a figure
    s = float(lrs[10:-5][int(np.gradient(np.asarray(losses[10:-5], dtype=float)).argmin())]) if len(lrs) >= 17 else None
    return {METHODS["torch_lr_finder"][0]: s}


RUNNERS = {"lrfast_sweep": run_sweep, "lrfast_seeds": run_seeds, "lrfast_grid": run_grid,
           **{f"lrfast_like_{p}": partial(run_like, peer=p) for p in PEER_LIKE}, "lightning": run_lightning,
           "torch_lr_finder": run_torch_lr_finder}  # fmt: skip


def finder_range(c: str, o: Options) -> str:
    """The range a contestant sweeps, in words (its own defaults; --quick shortens every finder to QUICK_STEPS)."""
    n = QUICK_STEPS if o.quick else 100
    if c.startswith("lrfast_like_"):
        return f"{c.removeprefix('lrfast_like_')}'s defaults" + (f", {n} steps" if o.quick else "")
    return {"lrfast_grid": f"8 LRs 1e-7 -> 10, {n} steps", "lightning": f"exp 1e-8 -> 1, {n} steps, early stop 4x "
            "(lr_find defaults)", "torch_lr_finder": f"exp {OPTIMIZER_LR:g} (optimizer LR) -> 10, {n} steps, "
            "diverge_th 5 (range_test defaults)"}.get(c, f"exp 1e-7 -> 10, {n} steps, early stop 4x")  # fmt: skip


def unavailable(contestant: str) -> str | None:
    return C.missing(contestant) if contestant in ("lightning", "torch_lr_finder") else None


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def run_contestant(c: str, task: Task, train, seeds, o: Options, skipped: dict) -> tuple[list[dict], list[float], str]:
    """One call per seed: ([{method: suggestion}] per seed, wall seconds per call, note). A contestant that turns
    out not to be available (like= missing) goes into `skipped` and is not tried again."""
    results, walls, notes = [], [], []
    for seed in seeds:
        if c in skipped:
            break
        model, loader = fresh(task, train, seed, o.device)
        t0 = time.perf_counter()
        try:
            results.append(RUNNERS[c](model, loader, task, seed, o))
        except Exception as e:  # one broken contestant must not sink the table
            if isinstance(e, TypeError) and c.startswith("lrfast_like") and "'like'" in str(e):  # unexpected keyword
                skipped[c] = "not available: like= missing"
                break
            results.append(dict.fromkeys(METHODS[c]))
            notes.append(f"seed {seed} failed: {_first_line(e)}")
        walls.append(time.perf_counter() - t0)
    return results, walls, "; ".join([skipped[c]] if c in skipped else notes)


# ---------------------------------------------------------------------------------------------- rows


def _cells(values) -> str:
    return ";".join("none" if v is None else f"{v:.4g}" for v in values)


def contestant_rows(task: Task, c: str, results, walls, note, truth_rows, base: dict, o: Options) -> list[dict]:
    lrs, curve = mean_curve(truth_rows)
    rows = []
    for m in METHODS[c]:
        sugs = [r.get(m) for r in results]
        scored = score(sugs, lrs, curve) if results else {"best_lr": float(lrs[np.argmin(curve)]),
                                                          "best_outcome": float(np.min(curve))}  # fmt: skip
        rows.append({**base, "contestant": c, "method": m, "seeds": len(results), "suggestions": _cells(sugs),
                     "wall_s_per_call": float(np.median(walls)) if walls else None, "finder_range": finder_range(c, o),
                     "note": note, **scored})  # fmt: skip
    return rows


def base_row(task: Task, truth_seeds: int, o: Options, cond: dict) -> dict:
    lo, hi, k = task.grid
    return {"workload": task.name, "optimizer": task.optimizer, "truth_steps": task.steps, "truth_seeds": truth_seeds,
            "truth_lrs": k, "grid_min_lr": lo, "grid_max_lr": hi, "model": task.title, "batch_size": task.batch_size,
            "val_samples": task.val_n, "quick": int(o.quick), **cond}  # fmt: skip


def run_workload(task: Task, contestants, seeds, truth_seeds, o: Options, cond: dict, skipped: dict, why: dict):
    """(quality rows, truth rows) of one workload; prints the time of every part."""
    train, val = split(task.dataset())
    t0 = time.perf_counter()
    truth = ground_truth(task, train, val, range(truth_seeds), o)
    log(f"{task.name}: ground truth, {truth_seeds} seeds x {task.grid[2]} LRs x {task.steps} steps in one grid pass "
        f"per seed: {time.perf_counter() - t0:.1f} s")  # fmt: skip
    truth = [{**r, "optimizer": task.optimizer, "steps": task.steps, "batch_size": task.batch_size,
              "val_samples": task.val_n, **cond} for r in truth]  # fmt: skip
    base, rows = base_row(task, truth_seeds, o, cond), []
    for c in contestants:
        t0 = time.perf_counter()
        results, walls, note = ([], [], why[c]) if why.get(c) else run_contestant(c, task, train, seeds, o, skipped)
        new = contestant_rows(task, c, results, walls, note, truth, base, o)
        rows += new
        regret = new[0]["mean_regret"]
        log(f"{task.name}: {c:28} {len(walls)} calls in {time.perf_counter() - t0:6.1f} s, "
            f"{new[0]['wall_s_per_call'] or float('nan'):.2f} s/call, mean regret ({new[0]['method']}) "
            f"{float('nan') if regret is None else regret:.3f}  {note}")  # fmt: skip
    return rows, truth


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- render


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _label(r: dict) -> str:
    default = " (default)" if r["contestant"] == "lrfast_sweep" and r["method"] == "valley" else ""
    return f"{r['contestant']} {r['method']}{default}" if r["contestant"] == "lrfast_sweep" else r["contestant"]


def _by_regret(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (math.isnan(_float(r["mean_regret"])), _float(r["mean_regret"])))


def summary_table(rows: list[dict]) -> list[str]:
    """One line per contestant (and method): mean regret (spread in decades) per workload, sorted by the mean of the
    mean regrets over the workloads (n/a: not run); quality.md's first table and README's."""
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((r["contestant"], r["method"]), {})[r["workload"]] = r

    def ran(r):
        return r is not None and r["seeds"] not in ("", "0")

    def mean_of(cells):
        vals = [_float(cells[w]["mean_regret"]) if ran(cells.get(w)) else math.nan for w in workloads]
        return math.inf if any(math.isnan(v) for v in vals) else float(np.mean(vals))

    lines = ["| contestant | " + " | ".join(f"{w} regret (spread)" for w in workloads) + " | mean regret | failures |",
             "|" + "---|" * (len(workloads) + 3)]  # fmt: skip
    for cells in sorted(by.values(), key=mean_of):
        got = [cells.get(w) for w in workloads]
        shown = [f"{report.num(r['mean_regret'], '.2f') or '-'} ({report.num(r['spread_decades'], '.1f') or '-'})"
                 if ran(r) else "n/a" for r in got]  # fmt: skip
        fails = sum(int(r["failures"] or 0) for r in got if ran(r))
        total = mean_of(cells)
        lines.append(f"| {_label(next(iter(cells.values())))} | {' | '.join(shown)} | "
                     f"{f'{total:.2f}' if math.isfinite(total) else '-'} | {fails} |")  # fmt: skip
    return lines


def seeds_run(rows: list[dict]) -> int:
    """Seeds per contestant in this run (rows of contestants that did not run say 0)."""
    return max(int(r["seeds"] or 0) for r in rows)


def definitions(rows: list[dict]) -> str:
    return (
        "Ground truth per workload: validation loss (held-out 20 %, never trained on) after N steps at a constant LR "
        "with the workload's optimizer, for each LR of a log grid, mean over the truth seeds (seed = model init and "
        "batch order), K LRs per seed in one lrfast grid pass; a diverged LR (non-finite loss) or one worse than the "
        "untrained model counts as the untrained model's loss (cap). Regret = (outcome at the suggestion - best "
        "outcome) / |best outcome|, the outcome interpolated linearly in log10(LR) on the mean curve; a suggestion "
        "outside the grid is clamped to its edge (`clamped`); spread = max - min of log10(suggestion) over the "
        f"contestant's {seeds_run(rows)} seeds, in decades; failures = seeds without a suggestion; s/call = median "
        "wall seconds of one finder call (model built outside it). Finders run their own defaults (range in `finder "
        "range`) on the training split."
    )


def workload_table(rows: list[dict]) -> list[str]:
    head = ["contestant", "method", "mean regret", "max regret", "spread (decades)", "median suggestion", "failures",
            "clamped", "s/call", "suggestions per seed", "finder range", "note"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _by_regret(rows):
        cells = [r["contestant"], r["method"], report.num(r["mean_regret"], ".3f"), report.num(r["max_regret"], ".3f"),
                 report.num(r["spread_decades"], ".2f"), report.num(r["median_suggestion"], ".3g"), r["failures"],
                 r["clamped"], report.num(r["wall_s_per_call"], ".2f"), r["suggestions"].replace(";", ", "),
                 r["finder_range"], r["note"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def render_markdown(csv_path: Path) -> str:
    rows = report.read_csv(csv_path)
    if not rows:
        return "# Suggestion quality\n\n(no rows)\n"
    r0 = rows[0]
    out = [f"# Suggestion quality: LR finders against real training, {r0['device']}", "", definitions(rows), "",
           "Summary: mean regret per workload (spread in decades), sorted by the mean over the workloads:", "",
           *summary_table(rows), ""]  # fmt: skip
    for w in dict.fromkeys(r["workload"] for r in rows):
        sub = [r for r in rows if r["workload"] == w]
        s = sub[0]
        out += [f"## {w}: {s['model']}, {s['optimizer']}, batch {s['batch_size']}", "",
                f"Ground truth: {s['truth_lrs']} LRs {report.num(s['grid_min_lr'], 'g')} -> "
                f"{report.num(s['grid_max_lr'], 'g')}, {s['truth_steps']} steps, {s['truth_seeds']} seeds, "
                f"{s['val_samples']} held-out samples; best LR {report.num(s['best_lr'], '.3g')}, validation loss "
                f"{report.num(s['best_outcome'], '.4f')}.", "", *workload_table(sub), ""]  # fmt: skip
    out += [f"Machine: {r0['device']}, {r0['cores']} cores, {r0['threads']} torch threads; Python {r0['python']}, "
            f"torch {r0['torch']}, Lightning {r0['lightning'] or '-'}, torch-lr-finder {r0['torch_lr_finder'] or '-'}, "
            f"lrfast {r0['lrfast'] or '-'} at {r0['commit']}; {r0['date']}."
            + (" A --quick smoke run: tiny models, 30 steps, not a measurement." if r0["quick"] == "1" else ""), "",
            "Reproduce: `python -m benchmarks.quality`; this file and quality.png are rendered from quality.csv and "
            "quality_truth.csv (`python -m benchmarks.quality --render PATH/quality.csv`).", ""]  # fmt: skip
    return "\n".join(out)


def render_png(csv_path: Path) -> None:
    """Per workload: the ground-truth outcome vs LR (each seed, their mean, the best), and under it each contestant's
    suggestions per seed on the same log-x axis."""
    rows, truth = report.read_csv(csv_path), report.read_csv(csv_path.with_name("quality_truth.csv"))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    labels = list(dict.fromkeys(_label(r) for r in rows))
    plt = report.pyplot()
    fig, axes = plt.subplots(2, len(workloads), figsize=(4.6 * len(workloads), 9), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [2, 3]})  # fmt: skip
    for j, w in enumerate(workloads):
        top, bottom = axes[0][j], axes[1][j]
        sub_truth = [t for t in truth if t["workload"] == w]
        for seed in dict.fromkeys(t["seed"] for t in sub_truth):
            pts = sorted((float(t["lr"]), float(t["outcome"])) for t in sub_truth if t["seed"] == seed)
            top.plot(*zip(*pts), color="0.7", lw=0.8)
        lrs, curve = mean_curve(sub_truth)
        top.plot(lrs, curve, color="k", lw=2, label="mean over seeds")
        best = lrs[int(np.argmin(curve))]
        top.plot([best], [curve.min()], "r*", ms=12, label=f"best {best:.2g}")
        s = next(r for r in rows if r["workload"] == w)
        top.set(title=f"{w}: {s['optimizer']}, {s['truth_steps']} steps", xscale="log", ylabel="validation loss")
        top.legend(fontsize=7)
        for i, label in enumerate(labels):
            r = next((r for r in rows if r["workload"] == w and _label(r) == label), None)
            xs = [float(v) for v in (r["suggestions"].split(";") if r and r["suggestions"] else []) if v != "none"]
            bottom.plot(xs, [i] * len(xs), "o", ms=4, alpha=0.7)
        bottom.axvline(best, color="r", lw=0.8)
        for edge in (lrs[0], lrs[-1]):
            bottom.axvline(edge, color="0.5", ls=":", lw=0.8)
        bottom.set(xscale="log", xlabel="LR (suggestions per seed; dotted: the grid's edges)", ylim=(len(labels), -1))
        bottom.set_yticks(range(len(labels)), labels if j == 0 else [""] * len(labels), fontsize=7)
        bottom.grid(True, axis="x", alpha=0.3)
    r0 = rows[0]
    fig.suptitle(f"Suggestion quality: {r0['device']}, torch {r0['torch']}, commit {r0['commit']}, {r0['date']}",
                 fontsize=9)  # fmt: skip
    report.save_png(fig, csv_path.with_suffix(".png"))


def render(csv_path: Path) -> None:
    csv_path.with_suffix(".md").write_text(render_markdown(csv_path))
    render_png(csv_path)


# ---------------------------------------------------------------------------------------------- CLI


def _warm_up(o: Options) -> None:
    """Imports and first-call costs (torch._dynamo, which the first torch.optim instance imports; Lightning; the
    first vmap) land outside every contestant's timing."""
    import importlib

    importlib.import_module("torch._dynamo")
    if unavailable("lightning") is None:
        importlib.import_module("pytorch_lightning")
    task = tasks(quick=True)["mlp"]
    model, loader = fresh(task, task.dataset(), 0, o.device)
    _lrfast(model, loader, task, 0, Options(o.device, quick=True), strategy="grid", candidates=2)


def _names(arg: str | None, choices, what: str, p: argparse.ArgumentParser) -> list[str]:
    names = [n for n in (arg or ",".join(choices)).split(",") if n]
    for n in names:
        if n not in choices:
            p.error(f"--{what}: unknown name {n!r}; choose from {', '.join(choices)}")
    return names


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workloads", help="comma-separated from " + ", ".join(WORKLOADS) + "; default: all")
    p.add_argument("--contestants", help="comma-separated from " + ", ".join(CONTESTANTS) + "; default: all")
    p.add_argument("--seeds", type=int, help="seeds per contestant (default 5; 2 with --quick)")
    p.add_argument("--truth-seeds", type=int, help="ground-truth seeds per LR (default 3; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: tiny models, {QUICK_STEPS} steps, fewer LRs, "
                   "2 seeds")  # fmt: skip
    p.add_argument("--out", type=Path, help="for quality.csv/.md/.png, quality_truth.csv; default "
                   "benchmarks/results/<device> (--quick: a folder in the temp directory)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's; 1 with --quick)")
    p.add_argument("--render", type=Path, help="only render quality.md and quality.png next to this quality.csv")
    args = p.parse_args(None if argv is None else [str(a) for a in argv])
    status = report.render_or_refuse(args, render)
    if status is not None:
        return status
    # --quick: the tiny models are as fast on one thread, and 2 spin-waiting OpenMP threads beside another job on the
    # 2 cores made the quick run 8x slower here (354 s against 42 s)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    workloads = _names(args.workloads, WORKLOADS, "workloads", p)
    contestants = _names(args.contestants, CONTESTANTS, "contestants", p)
    seeds = range(args.seeds or (2 if args.quick else 5))
    truth_seeds = args.truth_seeds or (2 if args.quick else 3)
    o = Options(args.device, args.quick)
    t_start = time.perf_counter()
    _warm_up(o)
    cond = {**report.conditions(o.device), "lightning": report.version("pytorch-lightning"),
            "torch_lr_finder": report.version("torch-lr-finder")}  # fmt: skip
    why, skipped, rows, truth = {c: unavailable(c) for c in contestants}, {}, [], []
    all_tasks = tasks(args.quick)
    for name in workloads:
        t0 = time.perf_counter()
        new, new_truth = run_workload(all_tasks[name], contestants, seeds, truth_seeds, o, cond, skipped, why)
        rows, truth = rows + new, truth + new_truth
        log(f"{name}: {time.perf_counter() - t0:.1f} s in all")
    quick_out = Path(tempfile.gettempdir()) / "lrfast-bench-quality-quick"  # a smoke run leaves results/ alone
    out = args.out or (quick_out if args.quick else ROOT / "benchmarks" / "results" / args.device)
    report.write_csv(rows, out / "quality.csv", COLUMNS)
    report.write_csv(truth, out / "quality_truth.csv", TRUTH_COLUMNS)
    render(out / "quality.csv")
    log(f"wrote {out / 'quality.csv'}, quality_truth.csv, quality.md and quality.png "
        f"({time.perf_counter() - t_start:.1f} s in all)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
